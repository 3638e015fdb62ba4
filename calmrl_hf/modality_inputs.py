"""The model's inputs: flat `{modality}_{field}` tensors holding each modality's OBSERVED rows, and the mask.

`text_input_ids` [n_text, L] holds the rows of the batch that observe text, in batch order; `modality_mask`
[B, k] says which rows observe which modality (without it, every given modality is observed by every row).
Imports torch only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .validation import check_modality_mask, empty_rows_check


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
                          modality_mask: torch.Tensor | None,
                          pending: list[PendingCheck] | None = None, unpaired: bool = False) -> torch.Tensor:
    """The mask [B, k] of a batch: checked against the rows of each modality's inputs, or (None) built with every
    given modality observed by every row; with `unpaired` and modalities given with different numbers of rows (one
    image and N candidate texts, as CLIP takes them), each modality's rows are rows of their own. With `pending`, the checks that read the mask's values (rows observing
    nothing, observed rows per modality) are appended to it for `raise_bad_values` instead of read here."""
    modalities = list(modalities)
    rows = {name: next(iter(inputs.values())).shape[0] for name, inputs in grouped.items()}
    for name, inputs in grouped.items():
        for field, value in inputs.items():
            if value.dim() == 0 or value.shape[0] != rows[name]:
                raise ValueError(
                    f"Inputs of modality {name!r} disagree on the number of rows: {name}_{field} has "
                    f"{value.shape[0] if value.dim() else 'no'} rows (shape {list(value.shape)}), expected "
                    f"{rows[name]}."
                )
    k = len(modalities)
    if modality_mask is None:
        device = next(iter(next(iter(grouped.values())).values())).device
        sizes = set(rows.values())
        if len(sizes) == 1:  # paired: every row observes every given modality
            modality_mask = torch.zeros(sizes.pop(), k, dtype=torch.bool, device=device)
            for name in grouped:
                modality_mask[:, modalities.index(name)] = True
        elif unpaired:  # CLIP's separate image and text batches: each modality's inputs are rows of their own
            modality_mask = torch.zeros(sum(rows.values()), k, dtype=torch.bool, device=device)
            start = 0
            for name in grouped:  # in the model's order, as the inputs' rows are laid out
                modality_mask[start:start + rows[name], modalities.index(name)] = True
                start += rows[name]
        else:
            raise ValueError(
                f"Without a modality_mask every modality must have the same number of rows; got {rows}. "
                f"Pass modality_mask [B, {k}] when some rows miss a modality."
            )
        return modality_mask
    deferred = pending is not None
    check_modality_mask(modality_mask, k, context=f" (modalities {modalities})", every_row_observed=not deferred)
    if deferred:
        def counts(values: list[int]) -> str | None:
            for name, expected in zip(modalities, values):
                if rows.get(name, 0) != expected:
                    return (f"modality_mask marks {expected} rows as observing {name!r} but its inputs have "
                            f"{rows.get(name, 0)} rows (inputs hold the observed rows only, in batch order).")
            return None

        pending.append(PendingCheck(*empty_rows_check(modality_mask)))
        pending.append(PendingCheck(modality_mask.sum(dim=0), counts))
        return modality_mask
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
    """Some input for modality `name` (a shape check, free). Its values are checked where its tower runs
    (`towers.run_tower` -> `check_tower_inputs`), or for a whole batch at the model's door (`_embed_batch`)."""
    if not inputs:
        raise ValueError(f"No inputs given for modality {name!r}.")


# ---------------------------------------------------------------------------------------------- the door's checks
# Shape and dtype checks read no tensor (free on any device); value checks (ids in range, NaN, mask rows of zeros,
# mask row counts) are collected as `PendingCheck`s and read together by `raise_bad_values`: ONE device-to-host
# copy for a whole batch, whatever its number of modalities.

# The modalities whose inputs were checked already (`inputs_checked`): `towers.run_tower` does not read them again.
_CHECKED: contextvars.ContextVar = contextvars.ContextVar("calmrl_inputs_checked", default=frozenset())
_ALL = "*"


@contextlib.contextmanager
def inputs_checked(names: Sequence[str] | None = None) -> Iterator[None]:
    """Within it, `run_tower` skips the value checks of modalities `names` (None: every modality), whose inputs the
    caller checked already (`_embed_batch`, for the whole batch with one sync; placeholder rows, built here)."""
    token = _CHECKED.set(_CHECKED.get() | frozenset([_ALL] if names is None else names))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def values_checked(name: str) -> bool:
    """Whether the inputs of modality `name` were checked already (inside `inputs_checked`)."""
    checked = _CHECKED.get()
    return _ALL in checked or name in checked


class PendingCheck:
    """A value check not read yet: `values`, a 1-D integer tensor on the inputs' device, and `message(values as a
    list)`, the error message, or None when the values are fine."""

    __slots__ = ("values", "message")

    def __init__(self, values: torch.Tensor, message: Callable[[list[int]], str | None]):
        self.values, self.message = values.reshape(-1).to(torch.long), message


def raise_bad_values(pending: Sequence[PendingCheck], reads: Sequence[torch.Tensor] = ()) -> list[list[int]]:
    """Read every pending check's values, and the integer or bool tensors `reads` (the batch's mask, the imputer's
    fitted modalities: what the steps after the check need on the host), with one device-to-host copy; raise
    ValueError for the first check that fails (with the count of other failures). Returns the values of each of
    `reads`, flattened."""
    tensors = [check.values for check in pending] + [tensor.reshape(-1).to(torch.long) for tensor in reads]
    if not tensors:
        return []
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    flat = torch.cat([t.to(device) for t in tensors]).tolist()  # the one sync
    messages, start = [], 0
    for check in pending:
        size = check.values.numel()
        message = check.message(flat[start:start + size])
        start += size
        if message is not None:
            messages.append(message)
    if messages:
        more = f" ({len(messages) - 1} more problems in this batch's inputs.)" if len(messages) > 1 else ""
        raise ValueError(messages[0] + more)
    values = []
    for tensor in tensors[len(pending):]:
        values.append(flat[start:start + tensor.numel()])
        start += tensor.numel()
    return values


# Checks of values computed inside a step (the towers' outputs) wait for the step's next read (`defer_checks`): the
# imputer step reads them with its own values (`take_deferred_checks`), else `checks_read_together` reads them when
# its block ends. Either way one device-to-host copy, not one per modality.
_DEFERRED: contextvars.ContextVar = contextvars.ContextVar("calmrl_deferred_checks", default=None)


@contextlib.contextmanager
def checks_read_together() -> Iterator[None]:
    """Within it, `defer_checks` holds checks back; what no `take_deferred_checks` took is read when the block ends
    (not on an error). Nested blocks hand their checks to the outermost one."""
    if _DEFERRED.get() is not None:
        yield
        return
    held: list[PendingCheck] = []
    token = _DEFERRED.set(held)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
    raise_bad_values(held)


def defer_checks(checks: Sequence[PendingCheck]) -> None:
    """Hold `checks` for the next read inside `checks_read_together`; outside one, read them now."""
    held = _DEFERRED.get()
    if held is None:
        raise_bad_values(checks)
    else:
        held.extend(checks)


def take_deferred_checks() -> list[PendingCheck]:
    """The checks `defer_checks` holds (none outside `checks_read_together`), for a read that takes them along."""
    held = _DEFERRED.get()
    if held is None:
        return []
    taken = list(held)
    held.clear()
    return taken


def _rows(flags: list[int]) -> str:
    bad = [i for i, flag in enumerate(flags) if flag]
    return f"rows {bad[:10]}{' ...' if len(bad) > 10 else ''} ({len(bad)} of {len(flags)})"


def _row_flags(name: str, field: str, bad: torch.Tensor, problem: str) -> PendingCheck:
    """A check that fails when any of the per-row flags `bad` [n] is set."""
    def message(values: list[int]) -> str | None:
        if not any(values):
            return None
        return f"Input {name}_{field} {problem}: {_rows(values)} of the {name} inputs."
    return PendingCheck(bad, message)


def _per_row(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(value.shape[0], -1)


def _embedding_size(module) -> int | None:
    return module.num_embeddings if isinstance(module, nn.Embedding) else None


def text_limits(tower) -> tuple[int | None, int | None, int | None]:
    """(vocabulary size, longest sequence, token types) a text tower takes, None where it does not say: the rows
    of its input embeddings, of its learned position table (less RoBERTa's padding offset), and of its token-type
    table."""
    vocab = None
    if hasattr(tower, "get_input_embeddings"):
        try:
            vocab = _embedding_size(tower.get_input_embeddings())
        except (NotImplementedError, AttributeError):
            vocab = None
    if vocab is None:
        vocab = getattr(getattr(tower, "config", None), "vocab_size", None)
    base = getattr(tower, "text_model", tower)  # CLIPTextModel keeps its embeddings one level down
    embeddings = getattr(base, "embeddings", None)
    positions = None
    table = getattr(embeddings, "position_embeddings", getattr(embeddings, "position_embedding", None))
    if _embedding_size(table) is not None:
        padding_idx = getattr(embeddings, "padding_idx", None)  # RoBERTa's positions start after its padding id
        positions = table.num_embeddings - (padding_idx + 1 if isinstance(padding_idx, int) else 0)
    types = _embedding_size(getattr(embeddings, "token_type_embeddings", None))
    return vocab, positions, types


def check_tower_inputs(name: str, tower, inputs: dict[str, torch.Tensor]) -> list[PendingCheck]:
    """The inputs of modality `name` against what its `tower` takes. Raises TypeError / ValueError at once for
    what shapes and dtypes show (no sync): float or bool token ids, more tokens than the tower has positions, an
    attention mask of another shape than its ids, zero rows, pixel values that are not [n, C, H, W] / [n, T, C, H,
    W] with the tower's channels, spectrograms with another number of mel bins or frames. Returns the value checks
    for `raise_bad_values`: ids outside the vocabulary or negative, attention-mask rows of zeros (no token: not
    observed) or not 0 / 1, NaN or inf in features."""
    config = getattr(tower, "config", None)
    get = (lambda key: getattr(config, key, None))
    pending: list[PendingCheck] = []
    for field, value in inputs.items():
        if value.dim() == 0 or value.shape[0] == 0:
            raise ValueError(f"Input {name}_{field} has no rows (shape {list(value.shape)}): leave out a modality no "
                             f"row observes (its modality_mask column all False), and pass [n, ...] tensors.")
    ids = inputs.get("input_ids")
    if ids is not None:
        if torch.is_floating_point(ids) or ids.dtype == torch.bool or torch.is_complex(ids):
            raise TypeError(f"Input {name}_input_ids must hold integer token ids (torch.long), got {ids.dtype}: "
                            f"pass the tokenizer's ids as they are (not cast to float).")
        if ids.dim() != 2:
            raise ValueError(f"Input {name}_input_ids must be [n, L] token ids, got shape {list(ids.shape)}.")
        vocab, positions, types = text_limits(tower)
        if positions is not None and ids.shape[1] > positions:
            raise ValueError(f"Input {name}_input_ids has {ids.shape[1]} tokens per row, more than the {positions} "
                             f"positions of the {name} tower ({type(tower).__name__}, max_position_embeddings="
                             f"{get('max_position_embeddings')}): truncate (the processor's max_length).")
        for field, limit in (("input_ids", vocab), ("token_type_ids", types)):
            value = inputs.get(field)
            if value is None:
                continue
            if field != "input_ids" and (torch.is_floating_point(value) or value.dtype == torch.bool):
                raise TypeError(f"Input {name}_{field} must hold integer ids, got {value.dtype}.")
            if field != "input_ids" and value.shape != ids.shape:
                raise ValueError(f"Input {name}_{field} has shape {list(value.shape)}, its input_ids "
                                 f"{list(ids.shape)}: they must match.")
            bad = value < 0 if limit is None else (value < 0) | (value >= limit)
            span = "non-negative" if limit is None else f"in [0, {limit})"
            pending.append(_row_flags(name, field, _per_row(bad).any(1),
                                      f"holds ids outside the {name} tower's "
                                      f"{'vocabulary' if field == 'input_ids' else 'token types'} (expected ids "
                                      f"{span})"))
    mask = inputs.get("attention_mask")
    if mask is not None:
        if torch.is_complex(mask):
            raise TypeError(f"Input {name}_attention_mask must be 0 / 1 (int or bool), got {mask.dtype}.")
        reference = ids if ids is not None else inputs.get("input_values")
        if reference is not None and reference.dim() == 2 and mask.shape != reference.shape:
            source = "input_ids" if ids is not None else "input_values"
            raise ValueError(f"Input {name}_attention_mask has shape {list(mask.shape)} but {name}_{source} has "
                             f"{list(reference.shape)}: one mask entry per token, same shape.")
        if mask.dim() < 2:
            raise ValueError(f"Input {name}_attention_mask must be [n, L], got shape {list(mask.shape)}.")
        rows = _per_row(mask)
        pending.append(_row_flags(name, "attention_mask", ~(rows != 0).any(1),
                                  "has rows of zeros (no token, so nothing observed: drop the row from this modality "
                                  "and mark it False in modality_mask)"))
        if mask.dtype != torch.bool:
            pending.append(_row_flags(name, "attention_mask", ((rows != 0) & (rows != 1)).any(1),
                                      "holds values other than 0 and 1"))
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        if not torch.is_floating_point(pixels):
            raise TypeError(f"Input {name}_pixel_values must be floating point (the image processor's output), got "
                            f"{pixels.dtype}: run the images through the processor.")
        if pixels.dim() not in (4, 5):
            raise ValueError(f"Input {name}_pixel_values must be images [n, C, H, W] or videos [n, T, C, H, W], got "
                             f"{pixels.dim()}-D shape {list(pixels.shape)}.")
        channels = get("num_channels")
        if isinstance(channels, int) and pixels.shape[-3] != channels:
            raise ValueError(f"Input {name}_pixel_values has {pixels.shape[-3]} channels (shape "
                             f"{list(pixels.shape)}, channels at dim -3) but the {name} tower takes {channels}: "
                             f"convert the images (e.g. RGBA -> RGB) before the processor.")
    for field in ("input_values", "input_features"):
        value = inputs.get(field)
        if value is None:
            continue
        if not torch.is_floating_point(value):
            raise TypeError(f"Input {name}_{field} must be floating point, got {value.dtype}.")
        mel, frames, input_dim = get("num_mel_bins"), get("max_length"), get("input_dim")
        if field == "input_values" and isinstance(mel, int):  # AST: [n, frames, mel]
            if value.dim() != 3 or value.shape[-1] != mel:
                raise ValueError(f"Input {name}_input_values must be a spectrogram [n, frames, {mel}] for the {name} "
                                 f"tower ({type(tower).__name__}, num_mel_bins={mel}), got shape "
                                 f"{list(value.shape)}: use the tower's feature extractor.")
            if isinstance(frames, int) and value.shape[1] != frames:
                raise ValueError(f"Input {name}_input_values has {value.shape[1]} frames but the {name} tower takes "
                                 f"{frames} (max_length): the feature extractor pads / truncates to it.")
        elif field == "input_values" and value.dim() != 2:  # a waveform tower (Wav2Vec2-like)
            raise ValueError(f"Input {name}_input_values must be waveforms [n, samples] for the {name} tower "
                             f"({type(tower).__name__}), got shape {list(value.shape)}.")
        elif field == "input_features" and isinstance(mel, int) and (value.dim() != 3 or value.shape[1] != mel):
            raise ValueError(f"Input {name}_input_features must be [n, {mel}, frames] (num_mel_bins={mel}) for the "
                             f"{name} tower ({type(tower).__name__}), got shape {list(value.shape)}.")
        elif field == "input_features" and isinstance(input_dim, int) and value.shape[-1] != input_dim:
            raise ValueError(f"Input {name}_input_features must be [n, {input_dim}] or [n, L, {input_dim}], got "
                             f"shape {list(value.shape)}.")
    for field, value in inputs.items():
        if field in _INTEGER_LIKE_FIELDS or not torch.is_floating_point(value):
            continue
        pending.append(_row_flags(name, field, ~torch.isfinite(_per_row(value)).all(1), "contains NaN or inf"))
    return pending


def finite_embeddings_check(name: str, projected: torch.Tensor) -> PendingCheck:
    """The check that the projected tower output [n, D] of modality `name` is finite and its norm does not overflow
    (finite inputs can overflow inside a tower; unit-normalising would turn that into NaN or a zero vector,
    silently), for `defer_checks`."""
    norms = torch.linalg.vector_norm(projected.detach(), dim=-1)  # [n]

    def message(bad: list[int]) -> str | None:
        rows = [i for i, flag in enumerate(bad) if flag]
        if not rows:
            return None
        return (f"The {name} tower gave non-finite embeddings (NaN, inf or an overflowing norm) for {len(rows)} of "
                f"its {len(bad)} rows (rows {rows[:10]} of the {name} inputs): check those inputs for values far "
                f"outside the range the tower was trained on, and the tower's weights.")

    return PendingCheck(~torch.isfinite(norms), message)


__all__ = ["CLIP_INPUTS", "PendingCheck", "TOWER_OUTPUT_FLAGS", "cast_features", "check_feature_inputs",
           "check_tower_inputs", "checks_read_together", "defer_checks", "finite_embeddings_check", "inputs_checked",
           "raise_bad_values", "take_deferred_checks", "text_limits", "values_checked",
           "feature_inputs", "group_inputs", "rename_clip_inputs", "resolve_modality_mask", "split_tower_flags"]
