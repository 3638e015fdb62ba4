"""Batching: decoded examples -> the processor's observed-rows-only tensors + `modality_mask`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import BatchFeature

from .counters import SharedCounts
from .schema import NON_MODALITY_COLUMNS


logger = logging.getLogger(__name__)

# column -> batch key of the columns passed through
PASS_THROUGH_KEYS = {"label": "labels", "index": "index", "id": "ids"}


class CalMRLCollator:
    """A DataLoader `collate_fn`: examples (one key per modality holding the decoded item or None, as
    `with_media_decoding` yields them) -> `CalMRLProcessor` output.

    Args:
        processor (`CalMRLProcessor`): batches the modalities it knows, in its modality order (the example's own
            `modality_mask` is not read: a modality is observed when its value is not None).
        sampling_rate (`int`, *optional*): rate of the examples' audio (None: the feature extractor's, which is
            what `with_media_decoding(..., sampling_rate=feature_extractor.sampling_rate)` gives).
        pass_through (`Sequence[str]`, defaults to `("label", "index", "id")`): columns copied into the batch when
            present in every example of the batch: `label` -> `labels` (int64 tensor [B]; left out if any label is
            None), `index` -> `index` (int64 tensor [B]), `id` -> `ids` (list of str). These keys are not model
            inputs: remove them before `model(**batch)`.

    An example with no observed modality left (e.g. every file failed to decode with `on_error="skip"`) is dropped
    and counted in `dropped_examples` (shared with DataLoader workers), not warned about batch by batch: `train`
    tells the count at each logging step and in total at the end (a loop of one's own reads `dropped_examples`);
    the other examples keep their own modalities, so pairings never shift. Example columns that are neither
    modalities of the processor nor passed through are ignored (logged once).
    """

    def __init__(self, processor, sampling_rate: int | None = None,
                 pass_through: Sequence[str] = ("label", "index", "id")):
        unknown = [c for c in pass_through if c not in PASS_THROUGH_KEYS]
        if unknown:
            raise ValueError(f"pass_through may name {list(PASS_THROUGH_KEYS)}, got {unknown}.")
        self.processor = processor
        self.sampling_rate = sampling_rate
        self.pass_through = tuple(pass_through)
        self._dropped = SharedCounts(["dropped_examples"])
        self._warned_columns: set[str] = set()

    @property
    def dropped_examples(self) -> int:
        """Examples dropped so far because no modality of theirs was observed."""
        return self._dropped["dropped_examples"]

    def __call__(self, examples: list[dict]) -> BatchFeature:
        if not examples:
            raise ValueError("CalMRLCollator got an empty list of examples.")
        names = self.processor.modality_names
        self._warn_unknown_columns(examples, names)
        observed = [any(e.get(name) is not None for name in names) for e in examples]
        kept = [e for e, keep in zip(examples, observed) if keep]
        if len(kept) < len(examples):
            self._dropped.add("dropped_examples", len(examples) - len(kept))
            # counted, not warned: a warning every such batch, from every DataLoader worker, would bury the progress
            # (train() tells the count at each logging step); the ids stay at debug level
            logger.debug("Dropped %d of %d examples with no observed modality (ids: %s).", len(examples) - len(kept),
                         len(examples), [e.get("id") for e, keep in zip(examples, observed) if not keep][:5])
        if not kept:
            raise ValueError(f"No example of this batch of {len(examples)} has an observed modality among {names}.")
        batch = self.processor(sampling_rate=self.sampling_rate,
                               **{name: [e.get(name) for e in kept] for name in names})
        for column in self.pass_through:
            if not all(column in e for e in kept):
                continue
            values = [e[column] for e in kept]
            if column == "id":
                batch[PASS_THROUGH_KEYS[column]] = [str(v) for v in values]
            elif all(v is not None for v in values):
                batch[PASS_THROUGH_KEYS[column]] = torch.tensor(values, dtype=torch.long)  # [B]
        return batch

    def _warn_unknown_columns(self, examples: list[dict], names: list[str]) -> None:
        unknown = {c for c in examples[0] if c not in names and c not in NON_MODALITY_COLUMNS} - self._warned_columns
        if unknown:
            self._warned_columns |= unknown
            logger.warning("CalMRLCollator ignores the columns %s: they are not modalities of the processor %s.",
                           sorted(unknown), names)


def model_inputs(batch) -> dict:
    """The model inputs of a collated batch: every key except the passed-through columns (`labels`, `index`, `ids`)."""
    passed = set(PASS_THROUGH_KEYS) | set(PASS_THROUGH_KEYS.values())
    return {key: value for key, value in dict(batch).items() if key not in passed}


__all__ = ["CalMRLCollator", "model_inputs"]
