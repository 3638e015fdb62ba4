"""Lazy media decoding: videos (PyAV) and audio (soundfile, PyAV fallback) decoded when examples are read."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from ..processing_calmrl import DEFAULT_MODALITY_KINDS, sample_frame_indices


logger = logging.getLogger(__name__)


class MediaDecodingError(RuntimeError):
    """A media file is missing or cannot be decoded; the message names the file."""


def decode_video(path: str | Path, num_frames: int) -> np.ndarray:
    """`num_frames` RGB frames [T, H, W, 3] uint8 sampled evenly over the whole video."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaDecodingError(f"Video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except Exception as error:  # PyAV raises many error types for corrupt files
        raise MediaDecodingError(f"Could not decode video {path}: {error}") from error
    if not frames:
        raise MediaDecodingError(f"Video {path} has no frames.")
    return np.stack([frames[i] for i in sample_frame_indices(len(frames), num_frames)])


def _resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return wave
    from math import gcd

    from scipy.signal import resample_poly

    factor = gcd(source_rate, target_rate)
    return resample_poly(wave, target_rate // factor, source_rate // factor).astype(np.float32)


def decode_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples at `sampling_rate` (soundfile for wav/flac/ogg, PyAV for other containers)."""
    path = Path(path)
    if not path.is_file():
        raise MediaDecodingError(f"Audio file not found: {path}")
    try:
        import soundfile

        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)
    except Exception:
        try:
            import av

            with av.open(str(path)) as container:
                stream = container.streams.audio[0]
                rate = stream.rate
                chunks = [frame.to_ndarray().astype(np.float32) for frame in container.decode(audio=0)]
            wave = np.concatenate([c.mean(axis=0) if c.ndim == 2 and c.shape[0] <= 8 else c.reshape(-1)
                                   for c in chunks])
        except Exception as error:
            raise MediaDecodingError(f"Could not decode audio {path}: {error}") from error
    if wave.size == 0:
        raise MediaDecodingError(f"Audio {path} has no samples.")
    return _resample(wave, int(rate), sampling_rate)


class DecodingFailures:
    """Counts media skipped with `on_error="skip"`, per modality, with the last few paths (thread safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def record(self, modality: str, path: str) -> None:
        with self._lock:
            self.counts[modality] += 1
            if len(self.examples) < 20:
                self.examples.append(path)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"DecodingFailures({dict(self.counts)}, e.g. {self.examples[:3]})"


class MediaDecoder:
    """A `with_transform` function: replaces media paths by decoded arrays, keeping every row in place.

    With `on_error="skip"`, an unreadable file makes that modality missing for that example (its
    `modality_mask` entry becomes False) and is counted in `failures`; the example's other modalities and its
    pairing are untouched. An example left with no modality is dropped (and counted) by `CalMRLCollator`.
    """

    def __init__(self, modalities: list[str], num_frames: int = 4, sampling_rate: int = 16000,
                 on_error: str = "raise", modality_kinds: dict[str, str] | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        kinds = dict(DEFAULT_MODALITY_KINDS)
        kinds.update(modality_kinds or {})
        self.modalities = modalities
        self.kinds = {m: kinds.get(m, "text") for m in modalities}
        self.num_frames, self.sampling_rate, self.on_error = num_frames, sampling_rate, on_error
        self.failures = DecodingFailures()

    def _decode(self, kind: str, path: str):
        if kind == "vision":
            return decode_video(path, self.num_frames)
        return decode_audio(path, self.sampling_rate)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        batch = dict(batch)
        masks = [list(mask) for mask in batch["modality_mask"]] if "modality_mask" in batch else None
        for position, name in enumerate(self.modalities):
            kind = self.kinds[name]
            if kind == "text" or name not in batch:
                continue
            decoded = []
            for row, path in enumerate(batch[name]):
                if path is None:
                    decoded.append(None)
                    continue
                try:
                    decoded.append(self._decode(kind, path))
                except MediaDecodingError:
                    if self.on_error == "raise":
                        raise
                    logger.warning("Skipping unreadable %s file %s", name, path)
                    self.failures.record(name, path)
                    decoded.append(None)
                    if masks is not None:
                        masks[row][position] = False
            batch[name] = decoded
        if masks is not None:
            batch["modality_mask"] = masks
        return batch


def with_media_decoding(dataset, num_frames: int = 4, sampling_rate: int = 16000, on_error: str = "raise",
                        modality_kinds: dict[str, str] | None = None):
    """The dataset with videos and audio decoded lazily when read (`with_transform` / `map` when streaming).

    Returns the new dataset; its decoder (with its `failures` counter) is `dataset.media_decoder`.
    """
    from .loaders import dataset_modalities

    decoder = MediaDecoder(dataset_modalities(dataset), num_frames, sampling_rate, on_error, modality_kinds)
    if hasattr(dataset, "with_transform"):
        decoded = dataset.with_transform(decoder)
    else:  # IterableDataset: decode as examples stream by
        decoded = dataset.map(decoder, batched=True, batch_size=16)
    decoded.media_decoder = decoder
    return decoded


__all__ = ["DecodingFailures", "MediaDecoder", "MediaDecodingError", "decode_audio", "decode_video",
           "with_media_decoding"]
