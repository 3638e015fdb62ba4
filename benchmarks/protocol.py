"""The paper's protocol, shared by the controlled (`benchmarks/synthetic`) and real-signal (`benchmarks/avdigits`)
benchmarks.

Stage 1 stands in for a pretrained backbone: a small full-modality split, drawn from a narrower distribution than
the target data. Stage 2 continues from the stage-1 weights on a vision-text split plus an audio-text split that
are several times larger and drawn like the test split (as MSR-VTT and AudioCaps are for their test sets in the
paper), once per method; every method goes through the library's training loop (`calmrl_hf.training.train`) and
differs from the others only by config (`benchmarks/methods.py`). Test and validation: held-out instances with all
modalities, so the true full-modality embeddings (hence the imputation error and the anchor shift) are known.
Hyperparameters are chosen on the validation split (`tune_methods`) and used unchanged on the test split
(`run_methods`).
"""

from __future__ import annotations

import math

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calmrl_hf import CalMRLModel
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train

from .methods import ALL_METHODS, BASE, hyperparameters_of, inherited
from .true_imputations import TrueImputations, WithTruth, collate_with_truth


@dataclass
class Splits:
    """stage1: full modality (the backbone's data); stage2: vision-text + audio-text instances; stage2_full: the
    same instances with every modality (the oracle's data). Validation and test stay with the benchmark."""

    stage1: object
    stage2: object
    stage2_full: object


@dataclass
class StageSettings:
    steps: int
    learning_rate: float  # stage 2: replaced by each method's tuned learning rate
    batch_size: int
    extra: dict = field(default_factory=dict)  # more CalMRLTrainingArguments (e.g. freeze_modalities)


@dataclass
class Experiment:
    """What a benchmark supplies for one seed. `build_model(**architecture)` returns a freshly initialised model
    whose config's alignment objective is the stage-1 one."""

    build_model: Callable[..., CalMRLModel]
    splits: Splits
    collate_fn: Callable
    stage1: StageSettings
    stage2: StageSettings
    seed: int
    workdir: Path

    def arguments(self, name: str, stage: StageSettings, **extra) -> CalMRLTrainingArguments:
        values = dict(output_dir=str(self.workdir / f"seed{self.seed}" / name), max_steps=stage.steps,
                      seed=self.seed, per_device_train_batch_size=stage.batch_size,
                      learning_rate=stage.learning_rate, warmup_steps=max(1, stage.steps // 20),
                      logging_steps=10 ** 6, save_steps=10 ** 6, **stage.extra)
        values.update(extra)
        return CalMRLTrainingArguments(**values)

    def train_stage1(self, architecture: dict | None = None, head_training: dict | None = None):
        """The stage-1 model (pairwise InfoNCE on the full-modality split) and the run's Accelerator; with
        `architecture` (a matching head) the model is built with it and trained with `head_training` too."""
        torch.manual_seed(self.seed)
        model = self.build_model(**(architecture or {}))
        args = self.arguments("stage1", self.stage1, **(head_training or {}))
        accelerator = build_accelerator(args)
        train(model, self.splits.stage1, args, collate_fn=self.collate_fn, accelerator=accelerator)
        return accelerator.unwrap_model(model), accelerator

    def train_stage2(self, stage1_model: CalMRLModel, accelerator, method_name: str,
                     hyperparameters: dict) -> CalMRLModel:
        """Stage 2 of one method from (a copy of) the stage-1 model (the one built with the method's
        architecture); the base is returned as it is."""
        method = ALL_METHODS[method_name]
        if method.objective is None:
            return stage1_model
        for key, value in method.architecture.items():
            if getattr(stage1_model.config, key) != value:
                raise ValueError(f"{method_name} needs a stage-1 model with {key} = {value!r}, got "
                                 f"{getattr(stage1_model.config, key)!r}.")
        model = copy.deepcopy(stage1_model)
        for key, value in method.config_overrides(hyperparameters).items():
            setattr(model.config, key, value)
        if "temperature" in hyperparameters:  # the contrastive temperature is a (learnable) parameter
            with torch.no_grad():
                model.logit_scale.fill_(-math.log(float(hyperparameters["temperature"])))  # log(1 / T)
        learning_rate = hyperparameters.get("learning_rate", self.stage2.learning_rate)
        args = self.arguments(method_name.split(" ")[0], self.stage2, learning_rate=learning_rate,
                              imputer_warm_start=True, **method.training_arguments(hyperparameters),
                              **method.head_training)
        dataset, collate_fn, imputation_fn = self.splits.stage2_full if method.oracle else self.splits.stage2, \
            self.collate_fn, None
        if method.true_imputations:  # diagnostics: the hidden true embeddings in the imputed columns
            dataset = WithTruth(self.splits.stage2, self.splits.stage2_full)
            collate_fn = collate_with_truth(self.collate_fn)
            imputation_fn = TrueImputations(method.true_imputations, len(dataset), self.seed)
        train(model, dataset, args, collate_fn=collate_fn, warm_start_dataset=self.splits.stage1,
              accelerator=accelerator, imputation_fn=imputation_fn)
        model = accelerator.unwrap_model(model)
        model.eval()
        return model


def run_methods(experiment: Experiment, methods: Sequence[str], tuned: dict[str, dict],
                evaluate: Callable[[CalMRLModel], dict[str, float]]) -> dict[str, dict[str, float]]:
    """Stage 1 once (and once more per architecture a method adds, e.g. a matching head), then stage 2 from the
    stage-1 weights for each method at its tuned hyperparameters; `evaluate(model)` (the test split) on each."""
    stage1 = {}  # architecture -> (stage-1 model, its Accelerator)
    results = {}
    for name in methods:
        method = ALL_METHODS[name]
        key = tuple(sorted(method.architecture.items()))
        if key not in stage1:
            stage1[key] = experiment.train_stage1(method.architecture, method.head_training)
        model = experiment.train_stage2(*stage1[key], name, hyperparameters_of(name, tuned))
        model.eval()
        results[name] = evaluate(model)
    return results


def tune_methods(experiment: Experiment, methods: Sequence[str], evaluate: Callable[[CalMRLModel], dict[str, float]],
                 headline: str, log: Callable[[str], None] = print, chosen: dict | None = None) -> dict[str, dict]:
    """Each method's grid (`Method.grid`), stage 2 from one shared stage-1 model per point, scored by `headline`
    of `evaluate(model)` on the validation split; a method that `inherits` another's tuned values (`chosen`, the
    hyperparameters chosen before) runs each point on top of them. Returns {method: {"best": hyperparameters,
    "grid": [[point, score], ...]}}; ties go to the first point of the grid."""
    stage1_model, accelerator = experiment.train_stage1()
    stage1_model.eval()
    base_score = evaluate(stage1_model)[headline]
    log(f"{BASE}: validation {headline} = {base_score:.2f}")
    tuned = {}
    for name in methods:
        scored = []
        base = inherited(name, chosen or {})
        for point in ALL_METHODS[name].grid():
            model = experiment.train_stage2(stage1_model, accelerator, name, {**base, **point})
            scored.append([point, evaluate(model)[headline]])
            log(f"{name} {point}: validation {headline} = {scored[-1][1]:.2f}")
        best = max(range(len(scored)), key=lambda index: (scored[index][1], -index))
        tuned[name] = {"best": scored[best][0], "grid": scored}
    tuned[BASE] = {"best": {}, "grid": [[{}, base_score]]}
    return tuned
