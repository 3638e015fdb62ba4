"""A miniature VAST-style corpus generated offline from real signals, for the recipe's built-in default.

Each instance is a two-digit number (10..99):
- vision: a short mp4 video of the number drawn with two real handwritten digit images (scikit-learn's
  `load_digits`, 1,797 scans from 43 writers), drifting across the frame;
- audio: a wav of the number keyed in DTMF (the telephone dual-tone standard, ITU-T Q.23), one tone pair per
  digit, with random durations, level and background noise;
- text (caption): the number written in words, in several phrasings ("the number forty-two");
- subtitle: the number written in digits ("42", "4 2").

The corpus is written in the annotation formats of the real datasets so the real loaders read it:
stage 1 (all modalities) in the VAST-150K format, stage 2 as MSR-VTT (video + caption) and AudioCaps
(audio + caption), and a held-out test set with all modalities in the VAST format.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np


logger = logging.getLogger(__name__)

SAMPLING_RATE = 16_000
VIDEO_SIZE = 32
NUM_VIDEO_FRAMES = 4
# DTMF (ITU-T Q.23): each key is a (low, high) frequency pair in Hz.
DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209), "5": (770, 1336),
        "6": (770, 1477), "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "0": (941, 1336)}
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_CAPTIONS = ["the number {words}", "{words}", "a clip showing {words}", "someone says {words}", "it reads {words}"]


def number_to_words(number: int) -> str:
    """English words of 0..99 ("forty-two")."""
    if not 0 <= number < 100:
        raise ValueError(f"number_to_words covers 0..99, got {number}.")
    if number < 20:
        return _ONES[number]
    tens, ones = divmod(number, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


@dataclass
class MiniVastSizes:
    stage1: int = 400  # all modalities (VAST format)
    video_text: int = 800  # MSR-VTT format
    audio_text: int = 800  # AudioCaps format
    test: int = 300  # all modalities, held out


class _Generator:
    def __init__(self, seed: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.rng = np.random.default_rng(seed)
        self.images = {d: digits.images[digits.target == d] / 16.0 for d in range(10)}  # [n, 8, 8] in [0, 1]

    def number(self) -> int:
        return int(self.rng.integers(10, 100))

    def video_frames(self, number: int) -> np.ndarray:
        """[T, H, W, 3] uint8 frames: two handwritten digits (2x upscaled) drifting across a tinted canvas."""
        rng = self.rng
        tens, ones = divmod(number, 10)
        pair = [self.images[d][rng.integers(len(self.images[d]))] for d in (tens, ones)]
        strip = np.kron(np.concatenate(pair, axis=1), np.ones((2, 2)))  # [16, 32]
        tint = rng.uniform(0.5, 1.0, size=3)
        start, end = rng.integers(0, VIDEO_SIZE - 16, size=2)
        frames = []
        for t in range(NUM_VIDEO_FRAMES):
            top = int(round(start + (end - start) * t / max(NUM_VIDEO_FRAMES - 1, 1)))
            canvas = np.zeros((VIDEO_SIZE, VIDEO_SIZE))
            canvas[top : top + 16, :] = strip
            canvas = np.clip(canvas + rng.normal(0, 0.05, canvas.shape), 0, 1)
            frames.append((canvas[..., None] * tint * 255).astype(np.uint8))
        return np.stack(frames)

    def audio(self, number: int) -> np.ndarray:
        """float32 mono at 16 kHz: the DTMF tone pair of each digit, random timing, level and noise."""
        rng = self.rng
        pieces = [np.zeros(int(rng.uniform(0.0, 0.05) * SAMPLING_RATE), dtype=np.float32)]
        for digit in str(number):
            duration = rng.uniform(0.12, 0.2)
            t = np.arange(int(duration * SAMPLING_RATE)) / SAMPLING_RATE
            low, high = DTMF[digit]
            tone = np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t)
            pieces += [0.4 * tone.astype(np.float32), np.zeros(int(rng.uniform(0.04, 0.08) * SAMPLING_RATE),
                                                               dtype=np.float32)]
        signal = np.concatenate(pieces) * rng.uniform(0.3, 1.0)
        signal = signal + rng.normal(0, rng.uniform(0.02, 0.15), signal.shape)
        return signal.astype(np.float32)

    def caption(self, number: int) -> str:
        return _CAPTIONS[self.rng.integers(len(_CAPTIONS))].format(words=number_to_words(number))

    def subtitle(self, number: int) -> str:
        return str(number) if self.rng.random() < 0.5 else " ".join(str(number))


def _write_video(path: Path, frames: np.ndarray, fps: int = 4) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_audio(path: Path, samples: np.ndarray) -> None:
    import soundfile

    soundfile.write(str(path), samples, SAMPLING_RATE, subtype="PCM_16")


def generate_mini_vast(root: str | Path, sizes: MiniVastSizes | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the corpus under `root` (skipped when already complete); returns the annotation files and folders."""
    root = Path(root)
    sizes = sizes or MiniVastSizes()
    paths = {
        "vast_train": root / "vast" / "annotations_train.json",
        "vast_test": root / "vast" / "annotations_test.json",
        "vast_videos": root / "vast" / "videos",
        "vast_audios": root / "vast" / "audios",
        "msrvtt_train": root / "msrvtt" / "train.json",
        "msrvtt_videos": root / "msrvtt" / "videos",
        "audiocaps_train": root / "audiocaps" / "train.csv",
        "audiocaps_audios": root / "audiocaps" / "audios",
    }
    marker = root / "COMPLETE.json"
    if marker.exists() and json.loads(marker.read_text()) == {"sizes": vars(sizes), "seed": seed}:
        return paths
    for key in ("vast_videos", "vast_audios", "msrvtt_videos", "audiocaps_audios"):
        paths[key].mkdir(parents=True, exist_ok=True)
    generator = _Generator(seed)
    logger.info("Generating the mini VAST corpus under %s", root)

    def vast_split(count: int, prefix: str) -> list[dict]:
        records = []
        for i in range(count):
            number, clip_id = generator.number(), f"{prefix}{i:05d}"
            _write_video(paths["vast_videos"] / f"{clip_id}.mp4", generator.video_frames(number))
            _write_audio(paths["vast_audios"] / f"{clip_id}.wav", generator.audio(number))
            records.append({"clip_id": clip_id, "vast_cap": generator.caption(number),
                            "subtitle": generator.subtitle(number), "label": number})
        return records

    paths["vast_train"].write_text(json.dumps(vast_split(sizes.stage1, "vast_train_"), indent=1))
    paths["vast_test"].write_text(json.dumps(vast_split(sizes.test, "vast_test_"), indent=1))

    msrvtt = []
    for i in range(sizes.video_text):
        number, video_id = generator.number(), f"video{i}"
        _write_video(paths["msrvtt_videos"] / f"{video_id}.mp4", generator.video_frames(number))
        msrvtt.append({"video_id": video_id, "caption": generator.caption(number), "label": number})
    paths["msrvtt_train"].write_text(json.dumps(msrvtt, indent=1))

    with paths["audiocaps_train"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption", "label"])
        for i in range(sizes.audio_text):
            number, youtube_id = generator.number(), f"yt{i:06d}"
            _write_audio(paths["audiocaps_audios"] / f"{youtube_id}.wav", generator.audio(number))
            writer.writerow([i, youtube_id, 0, generator.caption(number), number])
    marker.write_text(json.dumps({"sizes": vars(sizes), "seed": seed}))
    return paths
