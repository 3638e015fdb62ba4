"""A teacher: a copy of the model whose detached embeddings give the objective targets the towers cannot move.

CalMRL's imputed column is a function of the same row's own embeddings, with gradient: the towers can lower the
loss by agreeing with their own imputations instead of with the missing modality. A teacher's embeddings (and the
PPCA posterior computed from them) do not depend on the student's weights, so they cannot chase the student.

- `"frozen"`: the model as the run starts (after the imputer's warm start), never updated.
- `"ema"`: an exponential moving average of the model's parameters, updated after every optimizer step,
  t <- decay * t + (1 - decay) * theta. Its imputer stays the run start's fit (the PPCA parameters are
  closed-form statistics; averaging them is not a fit).

Memory: one more copy of the model's weights (no gradients, no optimizer state), half of it in bfloat16
(`teacher_dtype="bfloat16"`; the imputer stays float32), and one no-grad forward of the towers per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from safetensors.torch import load, save

from ..modeling_calmrl import CalMRLModel


TEACHER_FILE = "teacher.safetensors"


class Teacher:
    """The teacher of a run (`kind` "frozen" or "ema"), built from the model it teaches."""

    def __init__(self, model: CalMRLModel, kind: str, decay: float, dtype: str | None = None):
        if kind not in ("frozen", "ema"):
            raise ValueError(f"teacher = {kind!r}; expected 'frozen' or 'ema'.")
        self.kind, self.decay = kind, decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()  # a fixed function: no dropout, whatever the student's mode
        if dtype is not None:
            self.model.to(getattr(torch, dtype))  # the imputer keeps float32 (`PPCAImputer._apply`)

    @torch.no_grad()
    def embed(self, inputs: dict[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's unit-norm embeddings [B, k, D] (in `dtype`, the student's) and mask [B, k] of a batch of
        model inputs (`{modality}_{field}` tensors and `modality_mask`)."""
        embeddings, mask = self.model.embed_modalities(**inputs)
        return embeddings.to(dtype), mask

    @torch.no_grad()
    def impute(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's imputation [B, k, D] of every missing slot from its own embeddings of the row (its PPCA
        posterior mean, as its config says: renormalised, with or without the anchor); observed slots hold the
        embeddings given."""
        exclude_anchor = not self.model.config.impute_from_anchor
        imputed, _ = self.model._impute_missing(embeddings, modality_mask, exclude_anchor)
        return imputed

    @torch.no_grad()
    def update(self, student: CalMRLModel) -> None:
        """After an optimizer step: t <- decay * t + (1 - decay) * theta for every parameter (EMA teacher only)."""
        if self.kind != "ema":
            return
        for (name, mine), theirs in zip(self.model.named_parameters(), student.parameters()):
            if mine.shape != theirs.shape:
                raise RuntimeError(f"The teacher's {name} has shape {list(mine.shape)}, the model's "
                                   f"{list(theirs.shape)}: the model was changed after the teacher was built.")
            mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - self.decay)

    def state_bytes(self) -> bytes:
        """The teacher's weights and buffers as safetensors bytes (tied tensors stored apart)."""
        state = {name: tensor.detach().clone().contiguous() for name, tensor in self.model.state_dict().items()}
        return save(state, metadata={"format": "pt", "teacher": self.kind})

    def load_bytes(self, data: bytes) -> None:
        """Restore what `state_bytes` wrote (every key, no other)."""
        state = load(data)
        device = next(self.model.parameters()).device
        self.model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, strict=True)


__all__ = ["TEACHER_FILE", "Teacher"]
