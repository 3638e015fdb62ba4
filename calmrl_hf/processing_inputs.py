"""The observed items of one modality turned into that modality's tensors, one function per kind: `text_features`,
`vision_features` (images, and videos sampled to a fixed number of frames) and `audio_features` (waveforms, or
log-mel maps floored below each clip's peak and read as 1-channel images). `CalMRLProcessor` calls them.

Each takes the items of the rows that observe the modality and their row numbers (for error messages), and returns
`{field: tensor}` with one row per item. Besides torch and numpy, this module imports only `log_mel` and `pixel_batch`:
`processing_calmrl` imports it, so it is copied with it next to a checkpoint as remote code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from .log_mel import ast_log_mel, computes_like
from .pixel_batch import accepts, pixel_values


TEXT_FIELDS = ("input_ids", "attention_mask")


def sample_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over `num_available` frames: the centre of each of `num_frames` equal
    segments (8 frames, 4 samples -> [1, 3, 5, 7]). Shorter videos repeat frames (3 frames, 4 samples ->
    [0, 1, 1, 2])."""
    if num_available < 1:
        raise ValueError(f"A video needs at least one frame, got num_available={num_available}.")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}.")
    # centre of segment i of [0, num_available) cut in num_frames: (i + 1/2) * num_available / num_frames
    return [min(int((2 * i + 1) * num_available / (2 * num_frames)), num_available - 1) for i in range(num_frames)]


def text_features(tokenizer, name: str, texts: Sequence, rows: list[int], max_length: int,
                  **tokenizer_kwargs) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` [n, L], padded to the longest text and truncated to `max_length` tokens
    (`tokenizer_kwargs`: the caller's `padding`, `truncation`, `max_length`, ... instead)."""
    bad = [(row, type(t).__name__) for row, t in zip(rows, texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"Modality {name!r} expects strings; rows {[r for r, _ in bad[:5]]} hold "
                        f"{[t for _, t in bad[:5]]}.")
    settings = {"padding": True, "truncation": True, "max_length": max_length, **tokenizer_kwargs}
    encoded = tokenizer(list(texts), return_tensors="pt", **settings)
    return {key: encoded[key] for key in TEXT_FIELDS if key in encoded}  # [n, L]


def vision_features(image_processor, name: str, items: Sequence, rows: list[int],
                    num_frames: int) -> dict[str, torch.Tensor]:
    """`pixel_values` [n, C, H, W] for images, [n, num_frames, C, H, W] for videos (frames sampled evenly)."""
    is_video = [_is_video(item) for item in items]
    if any(is_video) and not all(is_video):
        videos = [row for row, v in zip(rows, is_video) if v]
        images = [row for row, v in zip(rows, is_video) if not v]
        raise ValueError(f"Modality {name!r} mixes videos (rows {videos[:5]}) and images (rows {images[:5]}) in "
                         f"one batch; pass an image as a 1-frame video ([1, H, W, C]) or keep them apart.")
    if not any(is_video):
        images = [_as_image(item, name, row) for item, row in zip(items, rows)]
        return {"pixel_values": _pixel_values(image_processor, images)}  # [n, C, H, W]
    frames = []
    for item, row in zip(items, rows):
        video = [_as_image(frame, name, row) for frame in item]  # T_i frames [H, W, C]
        if not video:
            raise ValueError(f"Modality {name!r}, row {row}: the video has no frames.")
        frames += [video[i] for i in sample_frame_indices(len(video), num_frames)]
    pixels = _pixel_values(image_processor, frames)
    return {"pixel_values": pixels.unflatten(0, (len(items), num_frames))}  # [n, T, C, H, W]


def audio_features(feature_extractor, name: str, items: Sequence, rows: list[int], sampling_rate: int | None,
                   dynamic_range_db: float | None = None, as_image: bool = False) -> dict[str, torch.Tensor]:
    """The feature extractor's tensors for 1-D waveforms at its own rate (`sampling_rate` None: assumed so); with
    `dynamic_range_db`, the log-mel map floored that far below each clip's peak (`floor_dynamic_range`); with
    `as_image`, the map as `pixel_values` [n, 1, T, mel] instead of `input_values` [n, T, mel]."""
    expected = feature_extractor.sampling_rate
    if sampling_rate is not None and sampling_rate != expected:
        raise ValueError(f"Audio for {name!r} is at sampling_rate={sampling_rate} Hz but the feature extractor "
                         f"expects {expected} Hz; resample first (calmrl_hf.data.resample_audio, or decode with "
                         f"calmrl_hf.data.decode_audio(path, {expected})).")
    waves = [_waveform(item, name, row) for item, row in zip(items, rows)]
    if computes_like(feature_extractor):  # AST's log-mel map without its per-frame Python loop
        features = {"input_values": ast_log_mel(waves, feature_extractor)}
    else:
        encoded = feature_extractor(waves, sampling_rate=expected, padding=True, return_tensors="pt")
        features = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
    if dynamic_range_db is None and not as_image:
        return features
    spectrogram = features.get("input_values")
    if spectrogram is None or spectrogram.dim() != 3:
        raise ValueError(f"audio_as_image / audio_dynamic_range_db need a spectrogram feature extractor (input_values "
                         f"[n, T, mel], e.g. ASTFeatureExtractor); {type(feature_extractor).__name__} gave "
                         f"{ {k: list(v.shape) for k, v in features.items()} }.")
    if dynamic_range_db is not None:
        spectrogram = floor_dynamic_range(spectrogram, dynamic_range_db, feature_extractor)
    if not as_image:
        return {**features, "input_values": spectrogram}
    return {"pixel_values": spectrogram.unsqueeze(1)}  # [n, 1, T, mel]


def floor_dynamic_range(log_mel: torch.Tensor, range_db: float, feature_extractor) -> torch.Tensor:
    """[n, T, mel] log-mel maps, normalised as `feature_extractor` (AST's: (log power - mean) / (2 std), padded
    with 0 before normalising) does, with every value below (the clip's peak - `range_db`) raised to it, and the
    padding frames set to it: the quiet parts of clean and noisy clips then look alike, and padding reads as
    silence."""
    mean, std = getattr(feature_extractor, "mean", None), getattr(feature_extractor, "std", None)
    if mean is None or std is None:
        raise ValueError(f"audio_dynamic_range_db needs a feature extractor with AST's normalisation (`mean`, `std`); "
                         f"{type(feature_extractor).__name__} has none.")
    scale = 2 * std if getattr(feature_extractor, "do_normalize", True) else 1.0
    shift = mean if getattr(feature_extractor, "do_normalize", True) else 0.0
    padding = (log_mel == (0.0 - shift) / scale).all(dim=-1, keepdim=True)  # [n, T, 1]
    peak = log_mel.masked_fill(padding, float("-inf")).amax(dim=(1, 2), keepdim=True)  # [n, 1, 1]
    floor = peak - range_db / 10 * math.log(10) / scale  # dB of power in natural-log units, normalised
    return torch.where(padding, floor, torch.maximum(log_mel, floor))


def _pixel_values(image_processor, images: list) -> torch.Tensor:
    if accepts(image_processor, images):  # already the output size: all at once, no PIL round trip
        return pixel_values(image_processor, images)
    # `_as_image` gives every image channels last ([H, W, 3], or PIL): said, so that an image 1 or 3 pixels high is
    # not taken for channels first
    return image_processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]


def _waveform(item, name: str, row: int):
    """A clip as the 1-D float32 numpy array feature extractors take; paths, non-numbers and NaN / inf refused."""
    if isinstance(item, (str, bytes, os.PathLike)):
        raise TypeError(f"Audio for {name!r}, row {row}: CalMRLProcessor expects a waveform array; got a "
                        f"{type(item).__name__}: decode it first with calmrl_hf.data.decode_audio(path, "
                        f"sampling_rate).")
    if isinstance(item, dict):
        raise TypeError(f"Audio for {name!r}, row {row}: CalMRLProcessor expects a waveform array; got a dict (keys "
                        f"{sorted(map(str, item))[:5]}): pass its samples (a datasets Audio column's item['array']).")
    try:
        wave = (item.detach() if isinstance(item, torch.Tensor) else torch.as_tensor(item)).float().numpy()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"Audio for {name!r}, row {row}: CalMRLProcessor expects a waveform array (1-D numbers); "
                        f"got a {type(item).__name__} ({error}).") from None
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"Audio for {name!r}, row {row}: expected 1-D mono samples, got shape {list(wave.shape)}.")
    if not np.isfinite(wave).all():
        raise ValueError(f"Audio for {name!r}, row {row}: the waveform holds NaN or inf samples "
                         f"({int((~np.isfinite(wave)).sum())} of {wave.size}).")
    return wave


def _is_video(item) -> bool:
    if isinstance(item, (list, tuple)):
        return True
    return getattr(item, "ndim", None) == 4


def _as_image(item, name: str, row: int):
    """An image as the image processor takes it, in RGB: an array [H, W, 3] or a PIL image of mode RGB.

    Converted as PIL's `convert("RGB")` does: grey [H, W] or [H, W, 1] gets three equal channels, grey + alpha
    [H, W, 2] its grey channel three times, RGBA [H, W, 4] (or [4, H, W]) drops its alpha channel (no compositing);
    a PIL image of another mode is `convert("RGB")`-ed. Anything else (paths, other channel counts, an image with no
    pixels) is refused, naming the modality and row."""
    if isinstance(item, (str, bytes, os.PathLike)):
        raise TypeError(f"Modality {name!r}, row {row}: expected an image (an array [H, W, C] or a PIL image), got a "
                        f"{type(item).__name__}: open it first (PIL.Image.open(path)).")
    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL image
        if 0 in tuple(item.size):
            raise ValueError(f"Modality {name!r}, row {row}: the image has no pixels (size {tuple(item.size)}).")
        return item if item.mode == "RGB" else item.convert("RGB")
    try:
        array = torch.as_tensor(item) if isinstance(item, (list, tuple)) else item
        if isinstance(array, torch.Tensor):
            array = array.numpy()
        array = np.asarray(array)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"Modality {name!r}, row {row}: expected an image array [H, W, C] or a PIL image, got a "
                        f"{type(item).__name__} ({error}).") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"Modality {name!r}, row {row}: expected an image of numbers, got dtype {array.dtype}.")
    if array.ndim == 2:  # grey: three equal channels
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"Modality {name!r}, row {row}: expected an image [H, W, C] (or a video [T, H, W, C] / a list "
                         f"of frames), got shape {list(array.shape)}.")
    if array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 3, 4):  # channels first
        array = array.transpose(1, 2, 0)
    if array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"Modality {name!r}, row {row}: an image needs 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 "
                         f"(RGBA) channels, got shape {list(array.shape)}.")
    if 0 in array.shape[:2]:
        raise ValueError(f"Modality {name!r}, row {row}: the image has no pixels (shape {list(array.shape)}).")
    channels = array.shape[-1]
    if channels in (1, 2):  # grey (+ alpha): the grey channel three times, as PIL's convert("RGB")
        array = np.repeat(array[..., :1], 3, axis=-1)
    elif channels == 4:  # RGBA: alpha dropped, as PIL's convert("RGB")
        array = array[..., :3]
    return np.ascontiguousarray(array)


__all__ = ["audio_features", "floor_dynamic_range", "sample_frame_indices", "text_features", "vision_features"]
