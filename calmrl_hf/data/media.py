"""Media decoding: videos (PyAV), images (Pillow) and audio (soundfile, PyAV fallback), lazily when examples are read.

`with_media_decoding(dataset, ...)` returns the dataset with every media path replaced by decoded samples when an
example is read (`Dataset.with_transform`; `IterableDataset.map` when streaming), so nothing is decoded up front
and the source dataset keeps its paths:

- vision: a video file -> `np.ndarray` [num_frames, H, W, 3] uint8, frames sampled evenly over the whole video
  (`sample_frame_indices`); an image file (by extension) -> [H, W, 3] uint8;
- audio: `np.ndarray` [L] float32, mono (channels averaged), resampled to `sampling_rate`.

A missing or undecodable file raises `MediaDecodingError` naming the file, the modality and the example; so does a
WAV / AIFF file cut short (`check_riff_length`) and, given `media_roots`, a path that leads out of its media root
(`MediaPathError`). With
`on_error="skip"` that modality becomes missing for that example instead (its value None, its `modality_mask`
entry False), the rest of the example keeps its pairing, and the failure is counted in `DecodingFailures`
(readable from the main process even when DataLoader workers decode). An example left with no modality at all is
dropped, and counted, by `CalMRLCollator`.
"""

from __future__ import annotations

import logging
import os
import struct
from math import gcd
from pathlib import Path

import numpy as np

from ..processing_calmrl import DEFAULT_MODALITY_KINDS, MODALITY_KINDS
from ..processing_inputs import sample_frame_indices
from .counters import SharedCounts
from .schema import dataset_modalities


logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# audio files first; video containers last (their audio track is decoded)
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".mkv", ".mp4", ".webm")


class MediaDecodingError(RuntimeError):
    """A media file is missing or cannot be decoded; the message names the file (also in `.path`)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class MediaPathError(MediaDecodingError, ValueError):
    """A media path read from a dataset that leads outside its media root (an absolute path, `..` out of it, a
    symlink inside it pointing out of it); the message names the row or example and the path."""


def check_inside_root(path: str | os.PathLike, root: str | os.PathLike, where: str, shown=None) -> None:
    """Refuse `path` (as it would be opened: relative to the working folder, symlinks followed) unless it resolves
    inside `root` (itself resolved: a root given by the user may be anywhere). `where` names the row or example,
    `shown` the path as the dataset holds it."""
    shown = path if shown is None else shown
    try:
        root_target = Path(root).resolve()
        target = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
        raise MediaPathError(f"{where}: the media path {str(shown)!r} cannot be resolved ({error}).", path) from error
    if not target.is_relative_to(root_target):
        lexical = Path(os.path.abspath(path))  # '..' undone, symlinks not followed
        inside = lexical.is_relative_to(os.path.abspath(root)) or lexical.is_relative_to(root_target)
        how = "through a symlink" if inside else "by '..' or an absolute path"
        raise MediaPathError(f"{where}: the media path {str(shown)!r} leads to {target}, outside the media root "
                             f"{root} ({how}); a dataset's media must lie inside its media root.", path)


def media_path_in(root: str | os.PathLike, name: str, where: str) -> str:
    """`root`/`name` for a media file name read from a dataset, refusing (`MediaPathError`, naming `where` and the
    name) an absolute name and one leading out of `root` by `..` or through a symlink."""
    if os.path.isabs(name) or Path(name).anchor:
        raise MediaPathError(f"{where}: the media path {name!r} is absolute; a dataset's media paths are relative to "
                             f"their media root {root}.", name)
    path = os.path.join(str(root), name)
    check_inside_root(path, root, where, shown=name)
    return path


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MediaDecodingError(f"{what} file not found: {path}", path)
    return path


# ---------------------------------------------------------------------------------------------------- vision
def decode_video(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """`num_frames` RGB frames [T, H, W, 3] uint8 sampled evenly over the whole video (`sample_frame_indices`).

    One pass over one opened container: frames are decoded in order and only the sampled ones are converted to
    RGB; decoding stops after the last sampled frame. The frame count comes from the container (or from counting
    packets when it has none, then a second pass); if the video turns out shorter, the sampling is redone over the
    frames that exist.
    """
    import av

    path = _existing(path, "Video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaDecodingError(f"Video file {path} has no video stream.", path)
            total = container.streams.video[0].frames
            if total:  # announced: sample and decode in this one pass
                indices = sample_frame_indices(total, num_frames)
                frames, decoded = _decode_frames(container, set(indices))
        if not total:
            with av.open(str(path)) as container:
                total = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
            if total < 1:
                raise MediaDecodingError(f"Video file {path} has no frames.", path)
            indices = sample_frame_indices(total, num_frames)
            frames, decoded = _decode_file_frames(path, set(indices))
        if len(frames) < len(set(indices)):  # fewer frames than announced
            if decoded < 1:
                raise MediaDecodingError(f"Video file {path} has no decodable frames.", path)
            indices = sample_frame_indices(decoded, num_frames)
            frames, _ = _decode_file_frames(path, set(indices))
    except MediaDecodingError:
        raise
    except Exception as error:  # PyAV raises many error types for corrupt files
        raise MediaDecodingError(f"Could not decode video {path}: {error}", path) from error
    return np.stack([frames[i] for i in indices])


def _decode_file_frames(path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    import av

    with av.open(str(path)) as container:
        return _decode_frames(container, wanted)


def _decode_frames(container, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """The wanted frames (by presentation index) of an opened container's first video stream as RGB arrays, and
    how many frames were decoded."""
    frames, count, last = {}, 0, max(wanted)
    stream = container.streams.video[0]  # no frame threads: on 2 cores slower at every size tried, 32x32 to
    # 1280x720 (benchmarks.bench_input), and a loader's workers already decode in parallel
    for count, frame in enumerate(container.decode(stream), start=1):
        if count - 1 in wanted:
            frames[count - 1] = frame.to_ndarray(format="rgb24")
        if count - 1 >= last:
            break
    return frames, count


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image [H, W, 3] uint8 (Pillow)."""
    from PIL import Image

    path = _existing(path, "Image")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:
        raise MediaDecodingError(f"Could not decode image {path}: {error}", path) from error


def decode_vision(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """An image file (by extension) -> [H, W, 3]; anything else is decoded as a video -> [T, H, W, 3]."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return decode_image(path)
    return decode_video(path, num_frames)


# ---------------------------------------------------------------------------------------------------- audio
def resample_audio(wave: np.ndarray, orig_sampling_rate: int, sampling_rate: int) -> np.ndarray:
    """A 1-D float32 waveform resampled from `orig_sampling_rate` to `sampling_rate` (polyphase filtering,
    `scipy.signal.resample_poly`)."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sampling_rate == sampling_rate:
        return wave
    from scipy.signal import resample_poly

    factor = gcd(int(orig_sampling_rate), int(sampling_rate))
    return resample_poly(wave, sampling_rate // factor, orig_sampling_rate // factor).astype(np.float32)


def decode_audio(path: str | os.PathLike, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples [L] at `sampling_rate`.

    soundfile (libsndfile: wav, flac, ogg, mp3, ...) first, channels averaged, resampled with `resample_audio`;
    other containers (m4a, aac, the audio track of mp4/mkv/webm) through PyAV, which downmixes to mono and
    resamples (libswresample).
    """
    path = _existing(path, "Audio")
    check_riff_length(path)
    try:
        import soundfile

        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [L, channels]
        wave = resample_audio(wave.mean(axis=1), int(rate), sampling_rate)
    except Exception as soundfile_error:
        try:
            wave = _decode_audio_pyav(path, sampling_rate)
        except MediaDecodingError:
            raise
        except Exception as error:
            raise MediaDecodingError(f"Could not decode audio {path}: {error} (soundfile: {soundfile_error})",
                                     path) from error
    if wave.size == 0:
        raise MediaDecodingError(f"Audio file {path} has no samples.", path)
    if not np.isfinite(wave).all():  # a float WAV can store NaN / inf: it would stop training later
        bad = int(np.count_nonzero(~np.isfinite(wave)))
        raise MediaDecodingError(f"Audio file {path} has {bad} non-finite samples (NaN or inf) of {wave.size}.", path)
    return wave


_RIFF_FORMS = {b"RIFF": ("<", (b"WAVE",), b"data"), b"RIFX": (">", (b"WAVE",), b"data"),
               b"FORM": (">", (b"AIFF", b"AIFC"), b"SSND")}
_UNKNOWN_LENGTH = 0xFFFFFFFF  # written by streaming encoders that never came back to fill the header in


def check_riff_length(path: str | os.PathLike) -> None:
    """Refuse a WAV (RIFF / RIFX) or AIFF file cut short: a sample chunk (`data`, `SSND`) whose declared length
    exceeds the bytes the file holds after it, or none at all within the file. libsndfile reads what there is
    without a word (a WAV cut to a quarter of its samples decodes as a quarter as long). Other files pass."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise MediaDecodingError(f"Could not read audio {path}: {error}", path) from error
    with handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] not in _RIFF_FORMS or head[8:12] not in _RIFF_FORMS[head[:4]][1]:
            return
        order, _, samples_chunk = _RIFF_FORMS[head[:4]]
        size = os.fstat(handle.fileno()).st_size
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            chunk, length = struct.unpack(f"{order}4sI", handle.read(8))
            if chunk == samples_chunk:
                available = size - position - 8
                if length != _UNKNOWN_LENGTH and length > available:
                    raise MediaDecodingError(
                        f"Audio file {path} is truncated: its header declares {length} bytes of samples, the file "
                        f"holds {available} ({100 * available / length:.0f}%).", path)
                return
            position += 8 + length + (length & 1)  # chunks are padded to an even size
    raise MediaDecodingError(f"Audio file {path} is truncated or damaged: no {samples_chunk.decode()} (sample) "
                             f"chunk within its {size} bytes.", path)


def _decode_audio_pyav(path: Path, sampling_rate: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MediaDecodingError(f"Audio file {path} has no audio stream.", path)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]  # flush
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- lazy decoding
class DecodingFailures(SharedCounts):
    """Media skipped with `on_error="skip"`: counts per modality (shared with DataLoader workers) and, per
    process, the first few failed paths in `examples`.

    Counts are per read: an example read twice (two epochs) counts twice.
    """

    max_examples = 20

    def __init__(self, modalities):
        super().__init__(modalities)
        self.examples: list[str] = []

    @property
    def counts(self) -> dict[str, int]:
        """Failures per modality."""
        return self.as_dict()

    def record(self, modality: str, path: str) -> None:
        self.add(modality)
        if len(self.examples) < self.max_examples:
            self.examples.append(str(path))

    def __repr__(self) -> str:
        return f"DecodingFailures({self.counts}, e.g. {self.examples[:3]})"


class MediaDecoder:
    """Replaces the media paths of examples by decoded arrays, keeping every example in its place.

    Called on batches (`Dataset.with_transform`) or on one example (`decode_example`, for `IterableDataset.map`).
    Values that are not path strings (already decoded) pass through untouched, as do text-kind modalities.

    Args:
        modality_kinds (`dict[str, str]`): the dataset's modality columns -> kind, in column order (the order of
            `modality_mask`).
        num_frames (`int`): frames sampled from each video.
        sampling_rate (`int`): rate of the decoded audio.
        on_error (`"raise"` or `"skip"`): what an unreadable file does (see the module docstring).
        failures (`DecodingFailures`, *optional*): the counter to record skipped files in (a new one by default).
        media_roots (`dict[str, str]`, *optional*): modality -> the folder its paths must resolve inside when
            opened (`check_inside_root`); a path outside is a `MediaPathError`, skipped and counted like an
            unreadable file with `on_error="skip"`.
    """

    def __init__(self, modality_kinds: dict[str, str], num_frames: int = 4, sampling_rate: int = 16000,
                 on_error: str = "raise", failures: DecodingFailures | None = None,
                 media_roots: dict | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}.")
        if not isinstance(sampling_rate, int) or sampling_rate < 1:
            raise ValueError(f"sampling_rate must be a positive int (Hz), got {sampling_rate!r}.")
        bad = {m: k for m, k in modality_kinds.items() if k not in MODALITY_KINDS}
        if bad:
            raise ValueError(f"Unknown modality kinds {bad}; expected kinds among {list(MODALITY_KINDS)}.")
        self.modality_kinds = dict(modality_kinds)
        self.media_roots = {m: str(r) for m, r in (media_roots or {}).items() if r is not None}
        stray = sorted(set(self.media_roots) - set(self.modality_kinds))
        if stray:
            raise ValueError(f"media_roots names {stray}, which are not among the modalities "
                             f"{list(self.modality_kinds)}.")
        self.num_frames, self.sampling_rate, self.on_error = num_frames, sampling_rate, on_error
        self.warned_skips = 3  # skipped files warned of, one by one; the later ones only counted
        self.failures = failures if failures is not None else DecodingFailures(list(self.modality_kinds))
        missing = [m for m in self.modality_kinds if m not in self.failures.names]
        if missing:
            raise ValueError(f"failures counts {list(self.failures.names)} but the dataset's modalities include "
                             f"{missing}.")

    def decode(self, kind: str, path: str):
        if kind == "vision":
            return decode_vision(path, self.num_frames)
        return decode_audio(path, self.sampling_rate)

    def _decode_value(self, name: str, kind: str, value, example_id):
        """(decoded value, observed?) for one cell."""
        if value is None or kind == "text" or not isinstance(value, (str, os.PathLike)):
            return value, value is not None
        try:
            if name in self.media_roots:
                check_inside_root(value, self.media_roots[name], f"modality {name!r} of example {example_id!r}")
            return self.decode(kind, value), True
        except MediaDecodingError as error:
            if self.on_error == "raise":
                if isinstance(error, MediaPathError):
                    raise
                raise MediaDecodingError(f"{error} [modality {name!r} of example {example_id!r}]",
                                         error.path) from error
            skipped = sum(self.failures.counts.values())
            # the first few are told; the rest counted in `failures`, never a warning per file on a training bar
            log = logger.warning if skipped < self.warned_skips else logger.debug
            log("Skipping %s of example %r: %s%s", name, example_id, error,
                f" (further skipped files are counted in the decoder's `failures`, not warned of)"
                if skipped == self.warned_skips - 1 else "")
            self.failures.record(name, value)
            return None, False

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        batch = dict(batch)
        size = len(next(iter(batch.values())))
        ids = batch.get("id", [None] * size)
        masks = [list(mask) for mask in batch["modality_mask"]] if "modality_mask" in batch else None
        for position, (name, kind) in enumerate(self.modality_kinds.items()):
            if kind == "text" or name not in batch:
                continue
            column = []
            for row, value in enumerate(batch[name]):
                decoded, observed = self._decode_value(name, kind, value, ids[row])
                column.append(decoded)
                if masks is not None and value is not None and not observed:
                    masks[row][position] = False
            batch[name] = column
        if masks is not None:
            batch["modality_mask"] = masks
        return batch

    def decode_example(self, example: dict) -> dict:
        """One example (for `IterableDataset.map`)."""
        batch = self({key: [value] for key, value in example.items()})
        return {key: values[0] for key, values in batch.items()}


def with_media_decoding(dataset, num_frames: int = 4, sampling_rate: int = 16000, on_error: str = "raise",
                        modality_kinds: dict[str, str] | None = None, failures: DecodingFailures | None = None,
                        media_roots: dict | None = None):
    """`dataset` (map-style or streaming) with its media decoded lazily, as each example is read.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): a CalMRL dataset (media as file paths).
        num_frames (`int`, defaults to 4): frames sampled evenly from each video.
        sampling_rate (`int`, defaults to 16000): rate of the decoded audio, in Hz (the feature extractor's).
        on_error (`"raise"` or `"skip"`, defaults to `"raise"`): `"skip"` marks an unreadable file's modality
            missing in that example and counts it in `failures`, instead of raising `MediaDecodingError`.
        modality_kinds (`dict[str, str]`, *optional*): kinds of modality columns beyond the defaults (vision,
            audio, text, subtitle), e.g. `{"image": "vision", "caption": "text"}` or `processor.modality_kinds`.
        failures (`DecodingFailures`, *optional*): a counter to record skips in; pass your own to keep a handle
            on it through later dataset operations.
        media_roots (`dict[str, str]`, *optional*): modality -> its media folder: every path of that modality must
            resolve inside it when opened (no `..` out of it, no symlink inside it pointing out of it), else
            `MediaPathError` (a `MediaDecodingError`: counted as a failure with `on_error="skip"`), naming the
            example and the path. The loaders check at load time; this checks again when each file is opened.

    Returns:
        The decoded dataset; its decoder is `.media_decoder` and its skip counter `.media_decoder.failures`
        (attributes that later dataset operations do not carry over: keep the counter, or pass `failures`).
    """
    from datasets import Dataset, IterableDataset

    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    modalities = dataset_modalities(dataset)
    if not modalities:
        raise ValueError(f"The dataset has no modality columns (columns: {dataset.column_names}); build it with a "
                         f"calmrl_hf.data loader, or decode before operations that lose its features.")
    kinds = {**DEFAULT_MODALITY_KINDS, **(modality_kinds or {})}
    unknown = [m for m in modalities if m not in kinds]
    if unknown:
        raise ValueError(f"The kinds of modality columns {unknown} are unknown: pass modality_kinds (name -> one of "
                         f"{list(MODALITY_KINDS)}), e.g. modality_kinds=processor.modality_kinds.")
    decoder = MediaDecoder({m: kinds[m] for m in modalities}, num_frames, sampling_rate, on_error, failures,
                           media_roots=media_roots)
    if isinstance(dataset, IterableDataset):
        decoded = dataset.map(decoder.decode_example)
    else:
        decoded = dataset.with_transform(decoder)
    decoded.media_decoder = decoder
    return decoded


__all__ = ["AUDIO_EXTENSIONS", "DecodingFailures", "IMAGE_EXTENSIONS", "MediaDecoder", "MediaDecodingError",
           "MediaPathError", "VIDEO_EXTENSIONS", "check_inside_root", "check_riff_length", "decode_audio",
           "decode_image", "decode_video", "decode_vision", "media_path_in", "resample_audio", "with_media_decoding"]
