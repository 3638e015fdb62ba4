"""Checks at the door of every public function that takes embeddings [B, k, d] and a modality mask [B, k], and the
message for unknown names (config keys, training arguments, recipe keys).

One home for the rules the objectives, the imputer, the model and the evaluation share, so that they fail with
the same words. Imports torch and the standard library only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

import torch


# A value check not read yet: (values, a 1-D integer or bool tensor; message(values as a list), the error message or
# None). Checks are read together where a batch enters the model (`modality_inputs.raise_bad_values`: one read for
# all), or alone by `read_check`.
ValueCheck = tuple[torch.Tensor, Callable[[list[int]], str | None]]


def _kind(value) -> str:
    return str(getattr(value, "dtype", type(value).__name__))


def read_check(check: ValueCheck) -> None:
    """Read one check's values (one sync) and raise ValueError with its message if it fails."""
    values, message = check
    problem = message(values.reshape(-1).tolist())
    if problem is not None:
        raise ValueError(problem)


def empty_rows_check(modality_mask: torch.Tensor, name: str = "modality_mask") -> ValueCheck:
    """The check that every row of a mask [B, k] observes a modality."""
    def message(flags: list[int]) -> str | None:
        empty = [row for row, flag in enumerate(flags) if flag]
        if not empty:
            return None
        return (f"Rows {empty[:10]}{' ...' if len(empty) > 10 else ''} observe no modality ({len(empty)} such rows "
                f"of {name}); every row needs at least one.")

    return ~modality_mask.any(dim=1), message


def check_modality_mask(modality_mask, num_modalities: int, *, rows: int | None = None, name: str = "modality_mask",
                        context: str = "", every_row_observed: bool = True) -> torch.Tensor:
    """A bool tensor [rows (or B), k], True = observed; with `every_row_observed`, each row observes a modality.

    `context` is appended to the shape message (e.g. " to match embeddings [4, 3, 16]"). Returns the mask.
    """
    expected = f"[{'B' if rows is None else rows}, {num_modalities}]"
    if not isinstance(modality_mask, torch.Tensor) or modality_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor {expected} (True = observed), got {_kind(modality_mask)}.")
    if (modality_mask.dim() != 2 or modality_mask.shape[1] != num_modalities
            or (rows is not None and modality_mask.shape[0] != rows)):
        raise ValueError(f"{name} must have shape {expected}{context}, got {list(modality_mask.shape)}.")
    if every_row_observed:
        read_check(empty_rows_check(modality_mask, name))
    return modality_mask


def check_embeddings(embeddings, modality_mask, *, name: str = "embeddings", mask_name: str = "modality_mask",
                     rows: str = "B", num_modalities: int | None = None, dim: int | None = None,
                     min_rows: int = 1, every_row_observed: bool = True,
                     mask_optional: bool = True) -> torch.Tensor | None:
    """Embeddings: a floating-point tensor [rows, k, d] (k and d fixed where given; k, d >= 1 and rows >=
    `min_rows`, 0 or 1); `modality_mask`: a bool [rows, k] on the same device, or None (all observed) where
    `mask_optional`.

    Returns the mask as given (None stays None).
    """
    k, d = ("k" if num_modalities is None else num_modalities), ("d" if dim is None else dim)
    expected = f"[{rows}, {k}, {d}]"
    if not isinstance(embeddings, torch.Tensor) or not torch.is_floating_point(embeddings):
        raise TypeError(f"{name} must be a floating-point tensor {expected}, got {_kind(embeddings)}.")
    shape = embeddings.shape
    if (embeddings.dim() != 3 or (num_modalities is not None and shape[1] != num_modalities)
            or (dim is not None and shape[2] != dim)):
        raise ValueError(f"{name} must have shape {expected}, got {list(shape)}.")
    if shape[0] < min_rows or 0 in shape[1:]:
        sizes = f"{rows}, k, d" if min_rows else "k, d"
        raise ValueError(f"{name} must have {sizes} >= 1, got shape {list(shape)}.")
    if modality_mask is None and mask_optional:
        return None
    check_modality_mask(modality_mask, shape[1], rows=shape[0], name=mask_name,
                        context=f" to match {name} {list(shape)}", every_row_observed=every_row_observed)
    if modality_mask.device != embeddings.device:
        raise ValueError(f"{mask_name} is on {modality_mask.device}, {name} on {embeddings.device}.")
    return modality_mask


def observed_embeddings_check(embeddings: torch.Tensor, modality_mask: torch.Tensor, modality_names=None, *,
                              name: str = "embeddings") -> ValueCheck:
    """The check that every observed slot of embeddings [B, k, d] (`modality_mask` [B, k]) is finite with norm > 0,
    whatever the imputer has been fitted on: an imputation conditioned on a zero or NaN "observation" is silently
    wrong."""
    norms = torch.linalg.vector_norm(embeddings.detach().float(), dim=-1)  # [B, k]
    bad = torch.stack([modality_mask & ~torch.isfinite(norms), modality_mask & (norms == 0)])  # [2, B, k]

    def message(flags: list[int]) -> str | None:  # [non-finite, zero]
        names = list(modality_names) if modality_names is not None else list(range(modality_mask.shape[1]))
        for index, problem in enumerate(("NaN or inf in an observed entry",
                                         "a zero vector (norm 0) in an observed slot")):
            if flags[index]:
                where = bad[index].nonzero()
                row, column = where[0].tolist()
                return (f"{name} has {problem} (row {row}, modality {column} = {names[column]!r}; "
                        f"{where.shape[0]} such slots). An observed embedding must be finite with norm > 0: "
                        f"mark a missing slot False in modality_mask instead.")
        return None

    return bad.flatten(1).any(1), message


def unknown_name_message(kind: str, unknown: Iterable[str], known: Iterable[str]) -> str:
    """"Unknown {kind} 'lr' (did you mean 'learning_rate'?); known ones are [...]."."""
    known = sorted(known)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"Unknown {kind} {', '.join(hints)}; known ones are {known}."


__all__ = ["ValueCheck", "check_embeddings", "check_modality_mask", "empty_rows_check", "observed_embeddings_check",
           "read_check", "unknown_name_message"]
