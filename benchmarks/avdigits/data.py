"""avdigits: two-digit numbers drawn by hand, spoken and written, from real signals.

- vision: an image of the number made of two real handwritten digit images side by side (scikit-learn's
  `load_digits`: 1,797 8x8 scans from 43 writers); test images come from scans no training image uses.
- audio: the number spoken by espeak-ng ("forty-two") with several voices, variants, rates and pitches, at
  16 kHz, shifted in time and mixed with background noise (white, brown or another spoken number) at a random
  SNR; test clips are synthesised separately from training clips.
- text: the number written one of several ways ("forty-two", "42", "four two", "the number forty-two", ...).

Classes: the 90 numbers 10..99, so class-level Recall@1 is far from saturating (chance 1.1%).

Conditions (`AVDigits.sample(n, rng, condition=...)`), after the paper's setting, where stage 1 is a backbone
pretrained on other data and stage 2 continues on corpora whose test splits share stage 2's distribution:
- "backbone" (stage 1): clean speech (time shift, no background noise) from 3 of the 8 voices
  (`BACKBONE_VOICES`, variants allowed), images from the first half of the training scans of each digit;
- "target" (stage 2): all 8 voices, background noise at 0-20 dB SNR, all training scans;
- "test": held-out scans, separately synthesised clips of all 8 voices, noise at 0-20 dB SNR.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


NUMBERS = list(range(10, 100))
SAMPLING_RATE = 16000
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# How a caption writes the number (train and test draw from the same templates).
TEXT_TEMPLATES = ["{words}", "{digits}", "{spaced_words}", "the number {words}", "{digit_names}", "number {digits}",
                  "{words} written by hand", "someone says {words}"]
# Zero-shot class prompts (CLIP-style ensemble: the class embedding is the mean of these prompts' embeddings).
PROMPT_TEMPLATES = ["the number {words}", "{digits}", "{words}"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd"]
# The backbone's (stage 1's) speech: 3 of the 8 voices.
BACKBONE_VOICES = ["en-us", "en-gb", "en-gb-x-rp"]
CONDITIONS = ("backbone", "target", "test")
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt", "+klatt2"]


def number_words(number: int) -> str:
    """42 -> 'forty-two', 30 -> 'thirty', 13 -> 'thirteen'."""
    if number < 20:
        return _ONES[number]
    tens, ones = divmod(number, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def caption(number: int, template: str) -> str:
    words = number_words(number)
    return template.format(words=words, digits=str(number), spaced_words=words.replace("-", " "),
                           digit_names=" ".join(_ONES[int(d)] for d in str(number)))


def require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("avdigits synthesises speech with espeak-ng, which is not installed: "
                           "`apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng`.")
    return path


def speak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng speech of `text` as float32 at 16 kHz (espeak-ng writes 22,050 Hz; resampled 441 -> 320)."""
    import soundfile
    from scipy.signal import resample_poly

    wav_bytes = subprocess.run([require_espeak(), "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                               capture_output=True, check=True).stdout
    wave, rate_in = soundfile.read(io.BytesIO(wav_bytes), dtype="float32")
    if rate_in != 22050:
        raise RuntimeError(f"espeak-ng wrote {rate_in} Hz audio; expected 22050.")
    return resample_poly(wave, 320, 441).astype(np.float32)


def speech_jobs(clips_per_number: int, seed: int, voices: list[str] = VOICES) -> list[tuple[int, str, int, int]]:
    """(number, voice+variant, rate, pitch) of each clip `speech_pool` synthesises."""
    rng = np.random.default_rng(seed)
    return [(number, voices[rng.integers(len(voices))] + VARIANTS[rng.integers(len(VARIANTS))],
             int(rng.integers(130, 200)), int(rng.integers(20, 80)))
            for number in NUMBERS for _ in range(clips_per_number)]


def speech_pool(clips_per_number: int, seed: int, voices: list[str] = VOICES) -> dict[int, list[np.ndarray]]:
    """`clips_per_number` clips of each number, each with its own random voice (among `voices`), variant, rate and
    pitch."""
    jobs = speech_jobs(clips_per_number, seed, voices)
    with ThreadPoolExecutor(max_workers=4) as pool:  # espeak-ng runs as subprocesses
        waves = list(pool.map(lambda job: speak(number_words(job[0]), *job[1:]), jobs))
    clips: dict[int, list[np.ndarray]] = {number: [] for number in NUMBERS}
    for (number, *_), wave in zip(jobs, waves):
        clips[number].append(wave)
    return clips


def digit_pools(test_fraction: float = 0.25) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Handwritten digit scans per digit [n, 8, 8] (values 0..16), split into train and test scans."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test = {}, {}
    for digit in range(10):
        scans = digits.images[digits.target == digit]
        cut = int(round(len(scans) * (1 - test_fraction)))
        train[digit], test[digit] = scans[:cut], scans[cut:]
    return train, test


def shifted(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`wave` after a random onset of silence (0..200 ms), with 100 ms of silence after it."""
    onset = np.zeros(int(rng.integers(0, SAMPLING_RATE // 5)), dtype=np.float32)
    return np.concatenate([onset, wave, np.zeros(SAMPLING_RATE // 10, dtype=np.float32)])


def noisy(wave: np.ndarray, rng: np.random.Generator, distractors: list[np.ndarray]) -> np.ndarray:
    """Shift `wave` in time and mix in background noise at a random SNR (0..20 dB)."""
    signal = shifted(wave, rng)
    kind = rng.integers(3)
    if kind == 0:  # white
        noise = rng.standard_normal(len(signal)).astype(np.float32)
    elif kind == 1:  # brown (integrated white noise), centred
        noise = np.cumsum(rng.standard_normal(len(signal))).astype(np.float32)
        noise -= np.linspace(noise[0], noise[-1], len(noise), dtype=np.float32)
    else:  # another spoken number in the background
        other = distractors[rng.integers(len(distractors))]
        noise = np.resize(other, len(signal)).astype(np.float32)
    snr_db = rng.uniform(0.0, 20.0)
    power = float(np.mean(wave ** 2)) + 1e-12
    noise *= np.sqrt(power / (float(np.mean(noise ** 2)) + 1e-12) / 10 ** (snr_db / 10))
    return (signal + noise).astype(np.float32)


def two_digit_image(number: int, scans: dict[int, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[8, 16, 3] uint8 image: a scan of the tens digit next to a scan of the ones digit (random writers)."""
    tens, ones = divmod(number, 10)
    left = scans[tens][rng.integers(len(scans[tens]))]
    right = scans[ones][rng.integers(len(scans[ones]))]
    gray = np.concatenate([left, right], axis=1) * (255.0 / 16.0)
    return np.repeat(gray[:, :, None], 3, axis=2).astype(np.uint8)


@dataclass
class Instance:
    label: int  # index into NUMBERS
    image: np.ndarray
    audio: np.ndarray
    text: str


class AVDigits:
    """Draws instances under a condition ("backbone", "target" or "test", see the module docstring). The test
    condition uses digit scans no other condition uses and its own speech clips; the backbone and target conditions
    have their own speech clips too (the backbone's from `BACKBONE_VOICES` only)."""

    def __init__(self, clips_per_number: int = 8, test_clips_per_number: int = 2, speech_seed: int = 0,
                 backbone_clips_per_number: int = 4):
        self.train_scans, self.test_scans = digit_pools()
        # the backbone sees the first half of each digit's training scans
        self.backbone_scans = {digit: scans[:len(scans) // 2] for digit, scans in self.train_scans.items()}
        self.train_clips = speech_pool(clips_per_number, seed=speech_seed)
        self.test_clips = speech_pool(test_clips_per_number, seed=speech_seed + 1)
        self.backbone_speech = (backbone_clips_per_number, speech_seed + 2, BACKBONE_VOICES)  # speech_jobs' arguments
        self.backbone_clips = speech_pool(*self.backbone_speech)

    def sample(self, n: int, rng: np.random.Generator, *, condition: str = "target") -> list[Instance]:
        """`n` instances of `condition`, classes balanced (n // 90 each, the remainder at random)."""
        if condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r}; expected one of {CONDITIONS}.")
        scans = {"backbone": self.backbone_scans, "target": self.train_scans, "test": self.test_scans}[condition]
        clips = {"backbone": self.backbone_clips, "target": self.train_clips, "test": self.test_clips}[condition]
        labels = np.concatenate([np.repeat(np.arange(len(NUMBERS)), n // len(NUMBERS)),
                                 rng.choice(len(NUMBERS), n % len(NUMBERS), replace=False)])
        rng.shuffle(labels)
        distractors = [clip for pool in clips.values() for clip in pool]
        instances = []
        for label in labels:
            number = NUMBERS[label]
            pool = clips[number]
            wave = pool[rng.integers(len(pool))]
            instances.append(Instance(
                label=int(label), image=two_digit_image(number, scans, rng),
                audio=(shifted(wave, rng) if condition == "backbone" else noisy(wave, rng, distractors)),
                text=caption(number, TEXT_TEMPLATES[rng.integers(len(TEXT_TEMPLATES))])))
        return instances


def class_prompts() -> list[list[str]]:
    """Per class, the zero-shot prompts."""
    return [[caption(number, template) for template in PROMPT_TEMPLATES] for number in NUMBERS]
