"""The stage-2 methods the benchmarks compare, and the hyperparameter grid each one is tuned over.

Every alignment objective runs three ways: on the observed modalities only, on observed + PPCA-imputed
modalities (CalMRL's calibration), and as the oracle (the same stage-2 instances with every modality). Methods
differ only by config; each gets the same tuning budget: 8 grid points over its temperature(s) and the stage-2
learning rate, chosen on a validation split (never the test split).

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

    def config_overrides(self, hyperparameters: dict) -> dict:
        """Config keys to set on the stage-1 model before its stage 2."""
        config = {"alignment_objective": OBJECTIVES[self.objective].config_name, "imputer_method": self.imputer}
        config.update(self.overrides)
        config.update({key: value for key, value in hyperparameters.items() if key != "learning_rate"})
        return config

    def grid(self) -> list[dict]:
        """Every hyperparameter combination this method is tuned over."""
        axes = {**OBJECTIVES[self.objective].temperatures, "learning_rate": LEARNING_RATES}
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


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

METHODS: dict[str, Method] = {BASE: Method(None)}
for _objective, _family in FAMILIES.items():
    if _family.observed_only is not None:
        METHODS[_family.observed_only] = Method(_objective)
    METHODS[_family.calibrated] = Method(_objective, imputer="ppca")
    METHODS[_family.oracle] = Method(_objective, oracle=True)
# CalMRL with the paper's matching term (weight 0.1) and re-ranking; its head trains from stage 1 on, at its own
# rate and warm-up (chosen on the validation split: benchmarks/README.md)
MATCHING_HEAD = "CalMRL (PPCA) + matching head"
METHODS[MATCHING_HEAD] = Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                                architecture={"fusion_num_layers": 1, "fusion_num_attention_heads": 4,
                                              "matching_num_negatives": 4},
                                head_training={"matching_learning_rate": 1e-3, "matching_warmup_steps": 10})

# Diagnostics (`--methods`): one setting of a calibrated method changed at a time, at that method's tuned values.
DIAGNOSTIC_METHODS = {
    "CalMRL (mean imputation)": Method("PMRL", imputer="mean", tuned_as="CalMRL (PPCA)"),
    "CalMRL (zero imputation)": Method("PMRL", imputer="zero", tuned_as="CalMRL (PPCA)"),
    "CalMRL (PPCA, no gradient through imputation)": Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                                                             overrides={"impute_with_grad": False}),
    "CalMRL (PPCA, imputer frozen after warm start)": Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                                                              training={"imputer_statistics": "frozen"}),
    "GRAM + PPCA, imputed without the anchor": Method("GRAM", imputer="ppca", tuned_as="GRAM + PPCA",
                                                      overrides={"impute_from_anchor": False}),
    "TRIANGLE + PPCA, imputed without the anchor": Method("TRIANGLE", imputer="ppca", tuned_as="TRIANGLE + PPCA",
                                                          overrides={"impute_from_anchor": False}),
    "anchor InfoNCE + PPCA, imputed without the anchor": Method("anchor InfoNCE", imputer="ppca",
                                                                tuned_as="anchor InfoNCE + PPCA",
                                                                overrides={"impute_from_anchor": False}),
    "CalMRL (PPCA, imputed without the text)": Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                                                      overrides={"impute_from_anchor": False}),
    "GRAM + mean imputation": Method("GRAM", imputer="mean", tuned_as="GRAM + PPCA"),
    "GRAM + PPCA, no gradient through imputation": Method("GRAM", imputer="ppca", tuned_as="GRAM + PPCA",
                                                          overrides={"impute_with_grad": False}),
}
ALL_METHODS = {**METHODS, **DIAGNOSTIC_METHODS}
TUNED_METHODS = [name for name, method in METHODS.items() if method.objective is not None and not method.tuned_as]


def hyperparameters_of(name: str, tuned: dict[str, dict]) -> dict:
    """The hyperparameters method `name` runs with: its tuned values (or those of the method it is tuned as)."""
    method = ALL_METHODS[name]
    if method.objective is None:
        return {}
    source = method.tuned_as or name
    if source not in tuned:
        raise KeyError(f"No tuned hyperparameters for {source!r}: run the benchmark with --tune first "
                       f"(tuned: {sorted(tuned)}).")
    return dict(tuned[source])
