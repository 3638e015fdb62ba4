"""What the objective sees besides the batch's own embeddings: which modalities get imputed columns, where their
imputations come from, and the teacher's term (`teacher.py`).

    loss = alignment(observed + imputed columns) + teacher_weight * teacher_term

- `impute_modalities`: "trained" (the modalities the train data observes whose towers train: imputing a modality
  whose tower does not train in the stage only moves the others towards a fixed guess), "all" (the paper's), or a
  list.
- `imputation_source`: "none" (the default: observed columns only; the imputer still fits, for inference),
  "student" (the paper's: the row's own embeddings, with gradient) or "teacher" (the teacher's PPCA posterior from
  its detached embeddings of the row).
- teacher term, `teacher_form="columns"`: the objective on the row's columns plus the teacher's embeddings of its
  observed modalities as detached columns; `"distillation"`: `alignment.distillation_loss` between the student's
  and the teacher's embeddings of each observed modality.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType

from ..alignment import OBJECTIVES, _distillation_loss, _gather_fn
from ..data.collator import model_inputs
from ..data.schema import dataset_modalities
from ..modeling_calmrl import CalMRLModel, CalMRLOutput
from .arguments import CalMRLTrainingArguments
from .teacher import Teacher

logger = get_logger(__name__)

# (unwrapped model, collated batch) -> (imputations [B, k, D] for the missing slots, the batch without the keys
# the function read): imputations made elsewhere, e.g. a benchmark's true embeddings of the hidden modalities
ImputationFn = Callable[[CalMRLModel, dict], tuple[torch.Tensor, dict]]


def modality_masks(dataset) -> tuple[list[str], Any] | None:
    """(the modality columns, their `modality_mask` column [N, k] as a numpy bool array) of a map-style 🤗 dataset;
    None where that cannot be read without a pass over the data (streaming, torch datasets)."""
    names = dataset_modalities(dataset)
    if ("modality_mask" not in (getattr(dataset, "column_names", None) or [])
            or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "with_format")):
        return None
    masks = dataset.with_format("numpy", columns=["modality_mask"])[:]["modality_mask"]  # [N, k] bool
    if getattr(masks, "ndim", 0) != 2 or masks.shape[1] != len(names):
        return None
    return names, masks.astype(bool)


def observed_modalities(dataset, modalities: list[str]) -> list[str] | None:
    """The modalities of `modalities` that some row of a map-style 🤗 dataset observes (None: unknown)."""
    found = modality_masks(dataset)
    if found is None:
        return None
    names, masks = found
    return [name for name, seen in zip(names, masks.any(axis=0).tolist()) if seen and name in modalities]


def warn_self_reference(model: CalMRLModel, args: CalMRLTrainingArguments, dataset,
                        impute_modalities: list[str] | None) -> None:
    """The paper's calibration (imputations from the row's own embeddings, with gradient) on data that lacks an
    imputable modality: say what it measured as on the benchmarks, once, at the start."""
    if model.config.imputer_method not in ("ppca", "mean") or args.imputation_source != "student":
        return
    found = modality_masks(dataset)
    if found is not None:
        names, masks = found
        imputable = [index for index, name in enumerate(names) if impute_modalities is None or name in
                     impute_modalities]
        if not imputable or masks[:, imputable].all():
            return  # nothing to impute: full-modality data, or no imputable modality
    logger.warning("Training with imputed columns made from the model's own embeddings (imputer_method=%r, "
                   "imputation_source='student', the paper's calibration): on every benchmark here it lowered "
                   "retrieval, the towers learning to agree with their own imputations. imputation_source='none' (the "
                   "default) or 'teacher' (with teacher='frozen') avoid it (docs/training.md).",
                   model.config.imputer_method)


def resolve_impute_modalities(model: CalMRLModel, args: CalMRLTrainingArguments, dataset) -> list[str] | None:
    """The modalities that may get imputed columns (None: every fitted one, the paper's)."""
    modalities = list(model.config.modalities)
    if args.impute_modalities == "all":
        return None
    if args.impute_modalities != "trained":
        unknown = [m for m in args.impute_modalities if m not in modalities]
        if unknown:
            raise ValueError(f"impute_modalities names unknown modalities {unknown}; the model's are {modalities}.")
        return list(args.impute_modalities)
    observed = observed_modalities(dataset, modalities)
    frozen = {model.config.encoder_owner(m) for m in args.freeze_modalities}
    return [m for m in (observed if observed is not None else modalities)
            if model.config.encoder_owner(m) not in frozen]


def check_teacher_supported(model: CalMRLModel, args: CalMRLTrainingArguments, accelerator: Accelerator) -> None:
    """Refuse, before training starts, the settings a teacher does not support."""
    if args.teacher == "none":
        return
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"teacher={args.teacher!r} is not supported under {accelerator.distributed_type.value}: the "
                         f"teacher is a full copy of the model on every process, which sharded training exists to "
                         f"avoid. Train with DDP (or one process), or with teacher='none'.")
    if args.teacher_form == "columns" and model.config.alignment_objective == "triangle":
        raise ValueError("TRIANGLE contrasts the three columns of triangle_modalities: the teacher's columns cannot "
                         "join it. Use teacher_form='distillation'.")
    if args.imputation_source == "teacher" and model.config.imputer_method != "ppca":
        raise ValueError(f"imputation_source='teacher' imputes with the teacher's PPCA posterior; the model's "
                         f"imputer_method is {model.config.imputer_method!r}. Set imputer_method='ppca'.")


class Calibration:
    """The run's calibration settings and its teacher; `train_step` calls `prepare` before the forward, `loss`
    after it, and `update` after each optimizer step."""

    def __init__(self, model: CalMRLModel, args: CalMRLTrainingArguments, train_dataset, accelerator: Accelerator,
                 imputation_fn: ImputationFn | None = None):
        check_teacher_supported(model, args, accelerator)
        self.args = args
        self.imputation_fn = imputation_fn
        self.teacher: Teacher | None = None
        names = resolve_impute_modalities(model, args, train_dataset)
        if args.imputation_source == "none" and imputation_fn is None:
            names = []  # observed columns only
        if imputation_fn is None:
            warn_self_reference(model, args, train_dataset, names)
        self.impute_modalities = names
        # what the student's imputer may come to fit during the run (the teacher's must have fitted it already)
        self._train_modalities = (observed_modalities(train_dataset, list(model.config.modalities))
                                  if args.imputation_source == "teacher" else None)
        self._teacher_imputer_checked = False
        # flags on the host: the forward reads nothing back to learn them
        self.impute_mask = None if names is None else tuple(m in names for m in model.config.modalities)

    def start(self, model: CalMRLModel) -> None:
        """Build the teacher from the model as the run starts (a resumed run then loads the saved one)."""
        if self.args.teacher != "none":
            self.teacher = Teacher(model, self.args.teacher, self.args.teacher_ema_decay, self.args.teacher_dtype)

    def prepare(self, model: CalMRLModel, batch: dict) -> tuple[dict, dict, tuple | None]:
        """(the model inputs, the forward's extra keyword arguments, the teacher's (embeddings, mask) or None) of
        a collated batch (`model_inputs` of it); `model` unwrapped."""
        extra: dict[str, Any] = {}
        if self.impute_mask is not None:
            extra["impute_modalities"] = self.impute_mask
        if self.imputation_fn is not None:
            imputations, batch = self.imputation_fn(model, batch)
            extra["imputations"] = imputations
        inputs = model_inputs(batch)
        teacher_view = None
        if self.teacher is not None:
            dtype = next(model.projections.parameters()).dtype
            teacher_view = self.teacher.embed(inputs, dtype)
            if self.args.imputation_source == "teacher":
                if not self._teacher_imputer_checked:  # once: the teacher is final (built, or loaded on resume)
                    self._check_teacher_imputer(model)
                extra["imputations"] = self.teacher.impute(*teacher_view)
        return inputs, extra, teacher_view

    def _check_teacher_imputer(self, model: CalMRLModel) -> None:
        """imputation_source='teacher': the student imputes the missing slots of its fitted modalities, with the
        values its teacher's imputer (the run start's fit, never updated) gives them; a modality the student's
        imputer has fitted, or fits from the train data, that the teacher's has not would get a zero column there
        (and rows observing only such modalities would get zero imputations of every other)."""
        names = list(model.config.modalities)
        needed = {name for name, fitted in zip(names, model.imputer.fitted_modalities.tolist()) if fitted}
        if self.args.imputer_statistics != "frozen":  # M-steps in training fit what the data observes
            needed |= set(self._train_modalities if self._train_modalities is not None else names)
        teacher_fitted = self.teacher.model.imputer.fitted_modalities.tolist()
        unfitted = [name for name, fitted in zip(names, teacher_fitted) if name in needed and not fitted]
        if unfitted:
            raise ValueError(f"imputation_source='teacher' imputes with the teacher's imputer, the run start's fit, "
                             f"which has not fitted {unfitted}: the student would impute zero columns there. "
                             f"Fit the imputer before the run (imputer_warm_start=True with a warm_start_dataset "
                             f"observing them, or a model whose imputer is fitted), or use "
                             f"imputation_source='student'.")
        self._teacher_imputer_checked = True

    def loss(self, model: CalMRLModel, outputs: CalMRLOutput, teacher_view: tuple | None) -> torch.Tensor:
        """outputs.loss + teacher_weight * the teacher term (`model` unwrapped: its config and temperature)."""
        if teacher_view is None or self.args.teacher_weight == 0:
            return outputs.loss
        teacher_embeddings, teacher_mask = teacher_view
        config = model.config
        if self.args.teacher_form == "distillation":
            term = _distillation_loss(outputs.embeddings, teacher_embeddings, outputs.modality_mask,
                                      model.temperature, _gather_fn(config))
        else:  # the row's objective columns, then the teacher's observed ones: [B, 2k, D]
            columns = torch.cat([outputs.imputed_embeddings, teacher_embeddings.detach()], dim=1)
            mask = torch.cat([outputs.aligned_mask, teacher_mask], dim=1)
            term = OBJECTIVES[config.alignment_objective].loss(columns, mask, config, model.temperature)
        return outputs.loss + self.args.teacher_weight * term

    def update(self, model: CalMRLModel) -> None:
        if self.teacher is not None:
            self.teacher.update(model)

    def state_bytes(self) -> bytes | None:
        return self.teacher.state_bytes() if self.teacher is not None else None

    def load_bytes(self, data: bytes) -> None:
        if self.teacher is not None:
            self.teacher.load_bytes(data)


__all__ = ["Calibration", "ImputationFn", "check_teacher_supported", "modality_masks", "observed_modalities",
           "resolve_impute_modalities"]
