"""The real-signal benchmark: its data (real digit scans, espeak-ng speech, captions) and a CI-size run."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.avdigits import data  # noqa: E402


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (.ci/run installs it)")


def test_number_words_and_captions():
    assert [data.number_words(n) for n in (10, 13, 20, 42, 90, 99)] == [
        "ten", "thirteen", "twenty", "forty-two", "ninety", "ninety-nine"]
    assert data.caption(42, "{digit_names}") == "four two"
    assert data.caption(42, "{spaced_words}") == "forty two"
    prompts = data.class_prompts()
    assert len(prompts) == 90 and prompts[32] == ["the number forty-two", "42", "forty-two"]


def test_two_digit_images_are_real_scans_and_test_scans_are_held_out():
    train, test = data.digit_pools()
    for digit in range(10):  # no scan is in both pools
        flat_train = {scan.tobytes() for scan in train[digit]}
        assert not any(scan.tobytes() in flat_train for scan in test[digit])
    image = data.two_digit_image(47, train, np.random.default_rng(0))
    assert image.shape == (8, 16, 3) and image.dtype == np.uint8
    left, right = image[:, :8, 0] / (255.0 / 16.0), image[:, 8:, 0] / (255.0 / 16.0)
    assert min(np.abs(scan - left).max() for scan in train[4]) < 0.1  # the tens digit is a scan of a 4
    assert min(np.abs(scan - right).max() for scan in train[7]) < 0.1


@needs_espeak
def test_speech_is_synthesised_and_mixed_with_noise_at_the_drawn_snr():
    wave = data.speak("forty-two", "en-us", 160, 50)
    assert wave.dtype == np.float32 and 0.4 * data.SAMPLING_RATE < len(wave) < 2.0 * data.SAMPLING_RATE
    assert np.abs(wave).max() > 0.05  # not silence
    rng = np.random.default_rng(0)
    mixed = data.noisy(wave, rng, [wave])
    assert len(mixed) > len(wave)  # onset shift + tail
    # every SNR drawn lies in 0..20 dB: the noise power is at most the speech power
    for seed in range(5):
        rng = np.random.default_rng(seed)
        mixed = data.noisy(wave, rng, [wave])
        rng = np.random.default_rng(seed)
        onset = int(rng.integers(0, data.SAMPLING_RATE // 5))
        clean = np.zeros_like(mixed)
        clean[onset:onset + len(wave)] = wave
        noise = mixed - clean
        snr = 10 * np.log10(np.mean(wave ** 2) / np.mean(noise ** 2))
        assert -0.5 <= snr <= 20.5


@needs_espeak
def test_quick_avdigits_benchmark(tmp_path):
    from benchmarks.avdigits.run import main
    from benchmarks.protocol import METHODS

    summary = main(["--quick", "--seeds", "1", "--output", str(tmp_path / "results.md")])
    assert list(summary) == list(METHODS)
    for method, metrics in summary.items():
        assert 0.0 <= metrics["mean_class_R@1"][0] <= 100.0
        assert 0.0 <= metrics["zero_shot_audio_top1"][0] <= 100.0
        assert -1.0 <= metrics["cos(vision,audio)"][0] <= 1.0
    # imputation of held-out embeddings: the imputer fitted by the warm start beats the modality mean
    base = summary["base (stage 1 only)"]
    assert base["imputation_cosine"][0] > base["mean_imputation_cosine"][0]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("Command: `python -m benchmarks.avdigits.run --quick --seeds 1`")
    assert text.count("\n|") >= 3 * (len(METHODS) + 2)
    assert (tmp_path / "results.png").stat().st_size > 10_000 and (tmp_path / "results.json").exists()
