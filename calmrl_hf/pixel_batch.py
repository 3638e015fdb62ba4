"""Frames that are already an image processor's output size, preprocessed as one array.

transformers' PIL-backend image processors (what `ViTImageProcessor` gives without torchvision) run resize,
rescale and normalise image by image, through a PIL round trip even when the resize changes nothing. For frames
already at the output size (the main job's 32x32 video, a corpus pre-resized for its tower) `pixel_values` does
the same arithmetic on all frames at once: x (uint8) -> float64 x rescale_factor -> float32, then (x - mean) / std
in float32, channels first; bit-equal to the processor's output. Anything else goes through the processor.
"""

from __future__ import annotations

import numpy as np
import torch


def _output_size(image_processor) -> tuple[int, int] | None:
    size = getattr(image_processor, "size", None)
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    return (height, width) if height and width else None


def accepts(image_processor, frames: list) -> bool:
    """Whether `pixel_values(image_processor, frames)` gives what the processor gives: a PIL-backend processor
    whose only steps are resize (to a fixed height x width), rescale (on) and normalise, and RGB uint8 frames
    [H, W, 3] of exactly that size (PIL's resize to the same size is a copy)."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # transformers before its image-processor backends: the processor's own path
        return False
    if not isinstance(image_processor, PilBackend) or type(image_processor)._preprocess is not PilBackend._preprocess:
        return False
    if getattr(image_processor, "do_center_crop", False) or getattr(image_processor, "do_pad", False) \
            or not getattr(image_processor, "do_rescale", False):
        return False
    size = _output_size(image_processor)
    return size is not None and bool(frames) and all(
        isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == (*size, 3) for frame in frames)


def pixel_values(image_processor, frames: list[np.ndarray]) -> torch.Tensor:
    """`image_processor(images=frames, return_tensors="pt")["pixel_values"]` [N, 3, H, W] for frames that
    `accepts` takes."""
    values = np.stack(frames)  # [N, H, W, 3] uint8
    values = (values.astype(np.float64) * image_processor.rescale_factor).astype(np.float32)
    if image_processor.do_normalize:
        mean = np.array(_per_channel(image_processor.image_mean), dtype=np.float32)
        std = np.array(_per_channel(image_processor.image_std), dtype=np.float32)
        values = (values - mean) / std
    return torch.from_numpy(np.ascontiguousarray(values.transpose(0, 3, 1, 2)))


def _per_channel(value) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * 3


__all__ = ["accepts", "pixel_values"]
