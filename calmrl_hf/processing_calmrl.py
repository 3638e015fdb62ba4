"""One processor for every modality of a CalMRL model, handling examples where any modality is missing.

`CalMRLProcessor(**{modality: list of items or None})` returns a `BatchFeature` with flat keys
`"{modality}_{field}"` holding the OBSERVED rows of each modality only, in batch order, plus
`modality_mask` [B, k]: exactly what `CalMRLModel.forward` takes. A modality absent from the whole batch has
no keys. Towers then never run on placeholder inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin


DEFAULT_MODALITY_KINDS = {"vision": "vision", "audio": "audio", "text": "text", "subtitle": "text"}
MODALITY_KINDS = ("vision", "audio", "text")


def sample_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over `num_available` frames (the centre of each of equal segments)."""
    if num_available < 1:
        raise ValueError("A video needs at least one frame.")
    edges = np.linspace(0, num_available, num_frames + 1)
    return [min(int((edges[i] + edges[i + 1]) / 2), num_available - 1) for i in range(num_frames)]


class CalMRLProcessor(ProcessorMixin):
    r"""
    Wraps a tokenizer (text and subtitle), an image processor (images and sampled video frames) and an audio
    feature extractor.

    Args:
        tokenizer: tokenizer of the text tower.
        image_processor: image processor of the vision tower (applied to each sampled video frame).
        feature_extractor: feature extractor of the audio tower.
        modalities (`dict[str, str]` or list of `[name, kind]`, *optional*): modality name -> kind ("vision",
            "audio" or "text"), in the model's modality order. Defaults to vision, audio, text, subtitle.
        num_frames (`int`, *optional*, defaults to 4): frames sampled evenly from each video.
        max_length (`int`, *optional*, defaults to 64): token budget of text inputs (longer ones are truncated).

    ```python
    >>> batch = processor(text=["a dog barks", None], audio=[None, waveform], vision=[frames, frames])
    >>> batch["modality_mask"]     # [[True, False, True, False], [True, True, False, False]]
    >>> model(**batch)
    ```
    """

    def __init__(self, tokenizer=None, image_processor=None, feature_extractor=None, modalities=None,
                 num_frames: int = 4, max_length: int = 64):
        # kept as [name, kind] pairs: the order is the model's k axis, and JSON objects are saved with sorted keys
        pairs = list((modalities or DEFAULT_MODALITY_KINDS).items()) if isinstance(modalities, dict) or \
            modalities is None else [tuple(pair) for pair in modalities]
        self.modalities = [[name, kind] for name, kind in pairs]
        for name, kind in self.modalities:
            if kind not in MODALITY_KINDS:
                raise ValueError(f"Modality {name!r} has kind {kind!r}; expected one of {MODALITY_KINDS}.")
        if num_frames < 1 or max_length < 1:
            raise ValueError(f"num_frames and max_length must be positive, got {num_frames} and {max_length}.")
        self.num_frames = num_frames
        self.max_length = max_length
        super().__init__(tokenizer, image_processor, feature_extractor)

    @property
    def modality_kinds(self) -> dict[str, str]:
        """Modality name -> kind, in the model's modality order."""
        return {name: kind for name, kind in self.modalities}

    @property
    def modality_names(self) -> list[str]:
        return [name for name, _ in self.modalities]

    def __call__(self, sampling_rate: int | None = None, return_tensors: str = "pt", **modality_inputs):
        if return_tensors != "pt":
            raise ValueError(f"CalMRLProcessor returns PyTorch tensors only (return_tensors='pt'), got "
                             f"{return_tensors!r}.")
        unknown = sorted(set(modality_inputs) - set(self.modality_names))
        if unknown:
            raise ValueError(f"Unknown modalities {unknown}; this processor knows {self.modality_names}.")
        if not modality_inputs:
            raise ValueError(f"No inputs: pass lists of items for some of {self.modality_names}.")
        lengths = {name: len(items) for name, items in modality_inputs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Every modality's list must have one entry per example (None where missing); got "
                             f"lengths {lengths}.")
        batch_size = next(iter(lengths.values()))
        mask = torch.zeros(batch_size, len(self.modalities), dtype=torch.bool)
        data: dict[str, torch.Tensor] = {}
        for index, (name, kind) in enumerate(self.modalities):
            items = modality_inputs.get(name)
            if items is None:
                continue
            present = [item for item in items if item is not None]
            mask[:, index] = torch.tensor([item is not None for item in items])
            if not present:
                continue
            if kind == "text":
                features = self._text(name, present)
            elif kind == "vision":
                features = self._vision(name, present)
            else:
                features = self._audio(name, present, sampling_rate)
            data.update({f"{name}_{field}": value for field, value in features.items()})
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Examples {empty[:10]} have no observed modality (every entry is None).")
        data["modality_mask"] = mask
        return BatchFeature(data=data, tensor_type="pt")

    def _text(self, name: str, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"Modality {name!r} expects strings, got {bad[:3]}.")
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}

    def _vision(self, name: str, items: Sequence) -> dict[str, torch.Tensor]:
        arrays = [_as_frames(item, name) for item in items]  # each [T, H, W, C] uint8/float
        is_video = [array.shape[0] > 1 or getattr(item, "ndim", 0) == 4 or isinstance(item, list)
                    for array, item in zip(arrays, items)]
        if any(is_video) and not all(is_video):
            raise ValueError(f"Modality {name!r} mixes images and videos in one batch; pass videos as [T, H, W, C] "
                             f"arrays (an image as a 1-frame video) or images only.")
        if not any(is_video):
            pixels = self.image_processor(images=[a[0] for a in arrays], return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels}  # [n, C, H, W]
        frames = [a[i] for a in arrays for i in sample_frame_indices(a.shape[0], self.num_frames)]
        pixels = self.image_processor(images=frames, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.unflatten(0, (len(arrays), self.num_frames))}  # [n, T, C, H, W]

    def _audio(self, name: str, items: Sequence, sampling_rate: int | None) -> dict[str, torch.Tensor]:
        expected = self.feature_extractor.sampling_rate
        if sampling_rate is not None and sampling_rate != expected:
            raise ValueError(f"Audio for {name!r} is at {sampling_rate} Hz but the feature extractor expects "
                             f"{expected} Hz: resample first (calmrl_hf.data.decode_audio does).")
        waves = []
        for item in items:
            wave = np.asarray(item, dtype=np.float32)
            if wave.ndim != 1:
                raise ValueError(f"Audio for {name!r} must be 1-D mono samples, got shape {list(wave.shape)}.")
            waves.append(wave)
        encoded = self.feature_extractor(waves, sampling_rate=expected, padding=True, return_tensors="pt")
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


def _as_frames(item, name: str) -> np.ndarray:
    """An image (PIL, [H, W, C] array) or a video ([T, H, W, C] array or list of frames) as [T, H, W, C]."""
    if isinstance(item, list):
        return np.stack([np.asarray(frame) for frame in item])
    array = np.asarray(item)
    if array.ndim == 2:  # grey image
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3:
        return array[None]
    if array.ndim == 4:
        return array
    raise ValueError(f"Modality {name!r} expects an image [H, W, C] or a video [T, H, W, C], got shape "
                     f"{list(array.shape)}.")


__all__ = ["CalMRLProcessor", "sample_frame_indices"]
