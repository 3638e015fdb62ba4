"""The model's inputs: flat `{modality}_{field}` tensors holding each modality's OBSERVED rows, and the mask.

`text_input_ids` [n_text, L] holds the rows of the batch that observe text, in batch order; `modality_mask`
[B, k] says which rows observe which modality (without it, every given modality is observed by every row).
Imports torch only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .validation import check_modality_mask


# Inputs whose values are ids or masks, not features: they are never checked for NaN nor cast.
_INTEGER_LIKE_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Keyword arguments of transformers towers that ask for more outputs (`TransformersKwargs`), passed through.
TOWER_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")


# CLIP's / CLAP's input names, each the input of the model's first modality of a kind
CLIP_INPUTS = {"input_ids": "text", "attention_mask": "text", "token_type_ids": "text", "pixel_values": "vision",
               "input_features": "audio", "input_values": "audio"}


def rename_clip_inputs(kinds: dict[str, str], modality_inputs: dict) -> dict:
    """`input_ids` / `attention_mask` / `pixel_values` / `input_features` / `input_values` given as CLIP and CLAP
    take them, renamed `{modality}_{field}` for the first modality of their kind (`kinds`: {modality: kind} in the
    model's order); every other key as it is."""
    renamed = {}
    for key, value in modality_inputs.items():
        if key in CLIP_INPUTS:
            name = next((m for m, kind in kinds.items() if kind == CLIP_INPUTS[key]), None)
            if name is None:
                raise ValueError(f"{key!r} is the input of a {CLIP_INPUTS[key]}-kind modality, and this model has none "
                                 f"(modalities: {kinds}); name inputs '{{modality}}_{{field}}'.")
            key = f"{name}_{key}"
            if key in modality_inputs:
                raise ValueError(f"{key!r} is given twice (also as its CLIP name): pass it once.")
        renamed[key] = value
    return renamed


def group_inputs(modalities: Sequence[str], modality_inputs: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Split flat `{modality}_{field}` keyword arguments by modality (longest modality name wins), in the order
    of `modalities` (so that outputs do not depend on keyword order); None values are dropped."""
    by_length = sorted(modalities, key=len, reverse=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in modality_inputs.items():
        if value is None:
            continue
        name = next((m for m in by_length if key.startswith(m + "_") and len(key) > len(m) + 1), None)
        if name is None:
            raise ValueError(
                f"Unknown input {key!r}: inputs are named '{{modality}}_{{field}}' (e.g. 'text_input_ids', "
                f"'vision_pixel_values') with a modality among {list(modalities)}."
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Input {key!r} must be a torch.Tensor, got {type(value).__name__}.")
        grouped.setdefault(name, {})[key[len(name) + 1 :]] = value
    if not grouped:
        raise ValueError(f"No modality inputs given; expected keys like 'text_input_ids' for the modalities "
                         f"{list(modalities)}.")
    return {name: grouped[name] for name in modalities if name in grouped}


def resolve_modality_mask(modalities: Sequence[str], grouped: dict[str, dict],
                          modality_mask: torch.Tensor | None) -> torch.Tensor:
    """The mask [B, k] of a batch: checked against the rows of each modality's inputs, or (None) built with every
    given modality observed by every row."""
    modalities = list(modalities)
    rows = {name: next(iter(inputs.values())).shape[0] for name, inputs in grouped.items()}
    for name, inputs in grouped.items():
        for field, value in inputs.items():
            if value.shape[0] != rows[name]:
                raise ValueError(
                    f"Inputs of modality {name!r} disagree on the number of rows: {name}_{field} has "
                    f"{value.shape[0]}, expected {rows[name]}."
                )
    k = len(modalities)
    if modality_mask is None:
        sizes = set(rows.values())
        if len(sizes) != 1:
            raise ValueError(
                f"Without a modality_mask every modality must have the same number of rows; got {rows}. "
                f"Pass modality_mask [B, {k}] when some rows miss a modality."
            )
        device = next(iter(next(iter(grouped.values())).values())).device
        modality_mask = torch.zeros(sizes.pop(), k, dtype=torch.bool, device=device)
        for name in grouped:
            modality_mask[:, modalities.index(name)] = True
        return modality_mask
    check_modality_mask(modality_mask, k, context=f" (modalities {modalities})")
    for index, name in enumerate(modalities):
        expected, given = int(modality_mask[:, index].sum()), rows.get(name, 0)
        if given != expected:
            raise ValueError(
                f"modality_mask marks {expected} rows as observing {name!r} but its inputs have {given} rows "
                f"(inputs hold the observed rows only, in batch order)."
            )
    return modality_mask


def split_tower_flags(inputs: dict) -> tuple[dict, dict]:
    """(inputs without them, the `TOWER_OUTPUT_FLAGS` among keyword arguments `inputs`)."""
    flags = {key: inputs[key] for key in TOWER_OUTPUT_FLAGS if inputs.get(key) is not None}
    return {key: value for key, value in inputs.items() if key not in TOWER_OUTPUT_FLAGS}, flags


def feature_inputs(name: str, modalities: Sequence[str], given: dict, accepted: frozenset[str]):
    """(tower inputs, tower flags) of modality `name` from the keyword arguments of a `get_*_features` call.

    Inputs are the tower's own names (`input_ids`, as a tokenizer returns them) or prefixed with the modality
    (`text_input_ids`, as the processor returns them); other modalities' prefixed inputs are left aside (one
    processor batch may hold several) and `modality_mask`, when given, must mark as many rows as the inputs have.
    A name that is neither, or that the tower does not take (`accepted`), is an error.
    """
    given, flags = split_tower_flags(given)
    modality_mask = given.pop("modality_mask", None)
    by_length = sorted(modalities, key=len, reverse=True)
    inputs: dict[str, torch.Tensor] = {}
    for key, value in given.items():
        if value is None:
            continue
        owner = next((m for m in by_length if key.startswith(m + "_") and key[len(m) + 1:] in accepted), None)
        if key in accepted:
            field = key
        elif owner == name:
            field = key[len(name) + 1:]
        elif owner is not None or any(key.startswith(m + "_") for m in modalities if m != name):
            continue  # another modality's input
        else:
            raise ValueError(f"Unknown input {key!r} for modality {name!r}: its tower takes {sorted(accepted)} (also "
                             f"as '{name}_<field>').")
        if field in inputs:
            raise ValueError(f"Input {field!r} of modality {name!r} is given twice (as {field!r} and "
                             f"'{name}_{field}').")
        inputs[field] = value
    if not inputs:
        raise ValueError(f"No inputs given for modality {name!r}: pass its tower's inputs ({sorted(accepted)}) or the "
                         f"processor's '{name}_<field>' ones.")
    if modality_mask is not None:
        check_modality_mask(modality_mask, len(modalities), context=f" (modalities {list(modalities)})")
        expected, rows = int(modality_mask[:, list(modalities).index(name)].sum()), next(iter(inputs.values())).shape[0]
        if expected != rows:
            raise ValueError(f"modality_mask marks {expected} rows as observing {name!r} but its inputs have {rows}.")
    return inputs, flags


def cast_features(inputs: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point features (pixel values, waveforms, spectrograms) in the tower's `dtype`; ids and masks as
    they are."""
    if dtype is None:
        return inputs
    return {field: value.to(dtype) if torch.is_floating_point(value) and field not in _INTEGER_LIKE_FIELDS else value
            for field, value in inputs.items()}


def check_feature_inputs(name: str, inputs: dict[str, torch.Tensor]) -> None:
    """Some input for modality `name`, and no NaN or inf in its floating-point features."""
    if not inputs:
        raise ValueError(f"No inputs given for modality {name!r}.")
    for field, value in inputs.items():
        if field in _INTEGER_LIKE_FIELDS or not torch.is_floating_point(value):
            continue
        if not bool(torch.isfinite(value).all()):
            bad_rows = (~torch.isfinite(value.flatten(1) if value.dim() > 1 else value.unsqueeze(1))).any(1)
            raise ValueError(
                f"Input {name}_{field} contains NaN or inf (rows {bad_rows.nonzero().flatten().tolist()[:10]} of "
                f"that modality's inputs)."
            )


def check_finite_embeddings(name: str, projected: torch.Tensor) -> None:
    """The projected tower output [n, D] of modality `name` is finite and its norm does not overflow (finite inputs
    can overflow inside a tower; unit-normalising would turn that into NaN or a zero vector, silently)."""
    norms = torch.linalg.vector_norm(projected, dim=-1)  # [n]
    if bool(torch.isfinite(norms).all()):
        return
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    raise ValueError(
        f"The {name} tower gave non-finite embeddings (NaN, inf or an overflowing norm) for {len(bad)} of its "
        f"{norms.shape[0]} rows (rows {bad[:10]} of the {name} inputs): check those inputs for values far outside "
        f"the range the tower was trained on, and the tower's weights."
    )


__all__ = ["CLIP_INPUTS", "TOWER_OUTPUT_FLAGS", "cast_features", "check_feature_inputs", "check_finite_embeddings",
           "feature_inputs", "group_inputs", "rename_clip_inputs", "resolve_modality_mask", "split_tower_flags"]
