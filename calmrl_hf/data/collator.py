"""Batching: decoded examples -> the processor's observed-rows-only tensors + modality_mask."""

from __future__ import annotations

import logging

import torch


logger = logging.getLogger(__name__)


class CalMRLCollator:
    """A `collate_fn` turning examples (one key per modality: decoded item or None) into model inputs.

    `label` / `id` pass through (as `labels` tensor and `ids` list) for evaluation. An example with no observed
    modality left (e.g. every file failed to decode with `on_error="skip"`) is dropped and counted in
    `dropped_examples`; the remaining examples keep their own modalities, so pairings never shift.
    """

    def __init__(self, processor, sampling_rate: int | None = None):
        self.processor = processor
        self.sampling_rate = sampling_rate
        self.dropped_examples = 0

    def __call__(self, examples: list[dict]) -> dict:
        names = self.processor.modality_names
        kept = [e for e in examples if any(e.get(name) is not None for name in names)]
        if len(kept) < len(examples):
            self.dropped_examples += len(examples) - len(kept)
            logger.warning("Dropped %d examples with no observed modality.", len(examples) - len(kept))
        if not kept:
            raise ValueError("Every example of this batch lacks all modalities.")
        inputs = {name: [e.get(name) for e in kept] for name in names if any(name in e for e in kept)}
        batch = dict(self.processor(sampling_rate=self.sampling_rate, **inputs))
        if "label" in kept[0] and all(e.get("label") is not None for e in kept):
            batch["labels"] = torch.tensor([e["label"] for e in kept])
        return batch


__all__ = ["CalMRLCollator"]
