"""The stage-2 methods the benchmarks compare, and the hyperparameter grid each one is tuned over.

Every alignment objective runs three ways: on the observed modalities only, on observed + PPCA-imputed
modalities (CalMRL's calibration), and as the oracle (the same stage-2 instances with every modality). Methods
differ only by config; each gets the same tuning budget: 8 grid points over its temperature(s) and the stage-2
learning rate, chosen on a validation split (never the test split).

The teacher methods (`calmrl_hf.training.teacher`) continue from the same stage-1 model with a frozen or EMA copy
of it whose detached embeddings enter the objective; `CalMRL (teacher PPCA)` imputes the missing columns from the
teacher's embeddings of the row instead of the row's own. Their grids (8 points) are over the teacher's settings
and the learning rate, the temperatures taken from the tuned values of the method they extend (`inherits`). Two
diagnostics put the true missing embeddings (exact, or with a fixed per-row error as large as the PPCA imputer's)
in the imputed columns, detached: the ceiling of any imputer, and what an imputer's error alone costs.

TRIANGLE has no observed-only variant: a triangle needs its three vertices and no vision-text or audio-text
instance has them, so without imputation TRIANGLE cannot continue training on such data at all (its
observed-only reference in the calibration analysis is the stage-1 model).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Objective:
    """An alignment objective: its `CalMRLConfig.alignment_objective` and the grid of its temperature keys."""

    config_name: str
    temperatures: dict[str, tuple[float, ...]]


# Equal budgets: PMRL's two temperatures get 2 x 2 values, the contrastive objectives' one temperature 4 values;
# times 2 learning rates, 8 points each. Around the authors' values (PMRL 0.05 / 0.1, the others 0.07) and the
# larger ones that towers still learning need (tau1 = 0.5 in the pilot of the continued-training issue).
CONTRASTIVE_TEMPERATURES = (0.03, 0.07, 0.2, 0.5)
OBJECTIVES = {
    "PMRL": Objective("pmrl", {"pmrl_tau1": (0.05, 0.5), "pmrl_tau2": (0.1, 0.5)}),
    "GRAM": Objective("gram", {"temperature": CONTRASTIVE_TEMPERATURES}),
    "TRIANGLE": Objective("triangle", {"temperature": CONTRASTIVE_TEMPERATURES}),
    "anchor InfoNCE": Objective("anchor_infonce", {"temperature": CONTRASTIVE_TEMPERATURES}),
    "pairwise InfoNCE": Objective("pairwise_infonce", {"temperature": CONTRASTIVE_TEMPERATURES}),
}
LEARNING_RATES = (1e-4, 3e-4)


@dataclass(frozen=True)
class Method:
    """One stage-2 setting. `objective`: a key of OBJECTIVES (None: no stage 2, the stage-1 model is evaluated);
    `imputer`: `CalMRLConfig.imputer_method`; `oracle`: stage 2 sees every modality of its instances; `overrides`:
    more config keys; `training`: more stage-2 CalMRLTrainingArguments; `tuned_as`: a diagnostic takes the tuned
    hyperparameters of that method instead of being tuned itself; `architecture`: config keys that shape the
    model (a matching head): such a method trains its own stage 1 with them (the head learns where every modality
    is present, as the recipe trains it), with `head_training` (CalMRLTrainingArguments of the head) in both stages."""

    objective: str | None
    imputer: str = "none"
    oracle: bool = False
    overrides: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    tuned_as: str | None = None
    architecture: dict = field(default_factory=dict)
    head_training: dict = field(default_factory=dict)
    axes: dict | None = None  # this method's grid (default: its objective's temperatures x the learning rates)
    inherits: str | None = None  # the grid's points extend that method's tuned values (its temperatures)
    true_imputations: str | None = None  # "exact" | "noisy": the imputed columns are the hidden true embeddings

    def config_overrides(self, hyperparameters: dict) -> dict:
        """Config keys to set on the stage-1 model before its stage 2."""
        config = {"alignment_objective": OBJECTIVES[self.objective].config_name, "imputer_method": self.imputer}
        config.update(self.overrides)
        config.update({key: value for key, value in hyperparameters.items() if key not in TRAINING_KEYS})
        return config

    def training_arguments(self, hyperparameters: dict) -> dict:
        """Stage-2 CalMRLTrainingArguments of this method at `hyperparameters` (its tuned teacher settings)."""
        return {**self.training, **{key: value for key, value in hyperparameters.items()
                                    if key in TRAINING_KEYS and key != "learning_rate"}}

    def grid(self) -> list[dict]:
        """Every hyperparameter combination this method is tuned over."""
        axes = self.axes or {**OBJECTIVES[self.objective].temperatures, "learning_rate": LEARNING_RATES}
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# hyperparameters that are training arguments (the others are config keys)
TRAINING_KEYS = frozenset({"learning_rate", "teacher_weight", "teacher_form", "teacher_ema_decay"})

BASE = "base (stage 1 only)"


@dataclass(frozen=True)
class Family:
    """The three variants of one objective, by method name (observed_only None: the objective cannot train
    without imputation; the stage-1 model is then the reference)."""

    observed_only: str | None
    calibrated: str
    oracle: str


FAMILIES = {
    "PMRL": Family("PMRL (observed only)", "CalMRL (PPCA)", "oracle (stage 2, all modalities)"),
    "GRAM": Family("GRAM (observed only)", "GRAM + PPCA", "GRAM (oracle)"),
    "TRIANGLE": Family(None, "TRIANGLE + PPCA", "TRIANGLE (oracle)"),
    "anchor InfoNCE": Family("anchor InfoNCE (observed only)", "anchor InfoNCE + PPCA", "anchor InfoNCE (oracle)"),
    "pairwise InfoNCE": Family("pairwise InfoNCE (observed only)", "pairwise InfoNCE + PPCA",
                               "pairwise InfoNCE (oracle)"),
}

# the paper's calibration: imputed columns from the row's own embeddings, of every modality its imputer was fitted on
# (the library's default has no imputed columns; asked for, only the modalities whose towers train in the stage)
PAPER = {"imputation_source": "student", "impute_modalities": "all"}
METHODS: dict[str, Method] = {BASE: Method(None)}
for _objective, _family in FAMILIES.items():
    if _family.observed_only is not None:
        METHODS[_family.observed_only] = Method(_objective)
    METHODS[_family.calibrated] = Method(_objective, imputer="ppca", training=PAPER)
    METHODS[_family.oracle] = Method(_objective, oracle=True)

TEACHER_FORMS = ("columns", "distillation")


def teacher_method(objective: str, kind: str) -> Method:
    """`objective` observed-only plus a frozen or EMA teacher; 8 grid points: the teacher term's form x its weight
    (frozen) or the EMA decay (EMA, weight 1) x the learning rate, temperatures those of the observed-only method."""
    second = {"teacher_weight": (0.3, 3.0)} if kind == "frozen" else {"teacher_ema_decay": (0.99, 0.999)}
    return Method(objective, training={"teacher": kind}, inherits=FAMILIES[objective].observed_only,
                  axes={"teacher_form": TEACHER_FORMS, **second, "learning_rate": LEARNING_RATES})


TEACHER_METHODS = {f"{objective} + {kind} teacher": teacher_method(objective, kind.lower() if kind == "EMA" else kind)
                   for objective in ("PMRL", "pairwise InfoNCE") for kind in ("frozen", "EMA")}
METHODS.update(TEACHER_METHODS)
# calibration without self-reference: the missing columns from the frozen teacher's PPCA posterior (detached);
# teacher_weight 0 is imputation alone, > 0 adds the teacher's columns (the information its control has)
METHODS["CalMRL (teacher PPCA)"] = Method(
    "PMRL", imputer="ppca", training={"teacher": "frozen", "imputation_source": "teacher"}, inherits="CalMRL (PPCA)",
    axes={"teacher_weight": (0.0, 0.3, 1.0, 3.0), "learning_rate": LEARNING_RATES})
# the paper's calibration without the columns of towers that do not train in stage 2 (subtitle)
METHODS["CalMRL (PPCA, trained modalities)"] = Method("PMRL", imputer="ppca", training={"imputation_source": "student"})
# diagnostics at PMRL observed-only's values: the hidden true embeddings of the same instances as detached columns
# (the ceiling of any imputer), and the same with a fixed per-row error as large as the PPCA imputer's
STAGE2_MODALITIES = {"impute_modalities": ["vision", "audio"]}
METHODS["PMRL (true missing, detached)"] = Method("PMRL", imputer="ppca", tuned_as="PMRL (observed only)",
                                                  training=STAGE2_MODALITIES, true_imputations="exact")
METHODS["PMRL (noisy true, detached)"] = Method("PMRL", imputer="ppca", tuned_as="PMRL (observed only)",
                                                training=STAGE2_MODALITIES, true_imputations="noisy")
# paired comparisons (method, reference) every report shows: each new method against observed-only, and each
# calibration method against the teacher control with the same information and no imputation
COMPARISONS = [*[(name, FAMILIES[method.objective].observed_only) for name, method in TEACHER_METHODS.items()],
               ("CalMRL (teacher PPCA)", "PMRL (observed only)"), ("CalMRL (teacher PPCA)", "PMRL + frozen teacher"),
               ("CalMRL (PPCA, trained modalities)", "PMRL (observed only)"),
               ("CalMRL (PPCA)", "PMRL (observed only)"),
               ("PMRL (true missing, detached)", "PMRL (observed only)"),
               ("PMRL (noisy true, detached)", "PMRL (observed only)")]
# CalMRL with the paper's matching term (weight 0.1) and re-ranking; its head trains from stage 1 on, at its own
# rate and warm-up (chosen on the validation split: benchmarks/README.md)
MATCHING_HEAD = "CalMRL (PPCA) + matching head"
METHODS[MATCHING_HEAD] = Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)", training=PAPER,
                                architecture={"fusion_num_layers": 1, "fusion_num_attention_heads": 4,
                                              "matching_num_negatives": 4},
                                head_training={"matching_learning_rate": 1e-3, "matching_warmup_steps": 10})

# Diagnostics (`--methods`): one setting of a calibrated method changed at a time, at that method's tuned values.
DIAGNOSTIC_METHODS = {
    "CalMRL (mean imputation)": Method("PMRL", imputer="mean", tuned_as="CalMRL (PPCA)", training=PAPER),
    "CalMRL (zero imputation)": Method("PMRL", imputer="zero", tuned_as="CalMRL (PPCA)", training=PAPER),
    "CalMRL (PPCA, no gradient through imputation)": Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                                                             training=PAPER,
                                                             overrides={"impute_with_grad": False}),
    "CalMRL (PPCA, imputer frozen after warm start)": Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                                                              training={**PAPER, "imputer_statistics": "frozen"}),
    "GRAM + PPCA, imputed without the anchor": Method("GRAM", imputer="ppca", tuned_as="GRAM + PPCA", training=PAPER,
                                                      overrides={"impute_from_anchor": False}),
    "TRIANGLE + PPCA, imputed without the anchor": Method("TRIANGLE", imputer="ppca", tuned_as="TRIANGLE + PPCA",
                                                          training=PAPER,
                                                          overrides={"impute_from_anchor": False}),
    "anchor InfoNCE + PPCA, imputed without the anchor": Method("anchor InfoNCE", imputer="ppca",
                                                                tuned_as="anchor InfoNCE + PPCA", training=PAPER,
                                                                overrides={"impute_from_anchor": False}),
    "CalMRL (PPCA, imputed without the text)": Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)", training=PAPER,
                                                      overrides={"impute_from_anchor": False}),
    "GRAM + mean imputation": Method("GRAM", imputer="mean", tuned_as="GRAM + PPCA", training=PAPER),
    "GRAM + PPCA, no gradient through imputation": Method("GRAM", imputer="ppca", tuned_as="GRAM + PPCA",
                                                          training=PAPER,
                                                          overrides={"impute_with_grad": False}),
}
ALL_METHODS = {**METHODS, **DIAGNOSTIC_METHODS}
TUNED_METHODS = [name for name, method in METHODS.items() if method.objective is not None and not method.tuned_as]


def inherited(name: str, tuned: dict[str, dict]) -> dict:
    """The tuned values a method's grid points extend (`Method.inherits`; nothing for the others)."""
    method = ALL_METHODS[name]
    if method.inherits is None:
        return {}
    if method.inherits not in tuned:
        raise KeyError(f"{name} extends the tuned values of {method.inherits!r}: tune that method first.")
    return dict(tuned[method.inherits])


def hyperparameters_of(name: str, tuned: dict[str, dict]) -> dict:
    """The hyperparameters method `name` runs with: its tuned values (or those of the method it is tuned as)."""
    method = ALL_METHODS[name]
    if method.objective is None:
        return {}
    source = method.tuned_as or name
    if source not in tuned:
        raise KeyError(f"No tuned hyperparameters for {source!r}: run the benchmark with --tune first "
                       f"(tuned: {sorted(tuned)}).")
    return {**inherited(source, tuned), **tuned[source]}
