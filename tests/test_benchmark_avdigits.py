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


def _scan_of(half: np.ndarray, scans: np.ndarray) -> bool:
    return min(np.abs(scan - half / (255.0 / 16.0)).max() for scan in scans) < 0.1


@needs_espeak
def test_conditions_backbone_is_clean_and_narrow_target_and_test_are_noisy_and_held_out():
    world = data.AVDigits(clips_per_number=1, test_clips_per_number=1, backbone_clips_per_number=1)
    # the backbone's speech comes from 3 of the 8 voices only (variants allowed)
    jobs = data.speech_jobs(*world.backbone_speech)
    assert {voice.split("+")[0] for _, voice, _, _ in jobs} <= set(data.BACKBONE_VOICES)
    assert len(data.BACKBONE_VOICES) == 3 and set(data.BACKBONE_VOICES) < set(data.VOICES)
    assert set(world.backbone_speech[2]) == set(data.BACKBONE_VOICES)
    for digit in range(10):  # the backbone sees the first half of the training scans
        assert len(world.backbone_scans[digit]) == len(world.train_scans[digit]) // 2
    rng = np.random.default_rng(0)
    tail = data.SAMPLING_RATE // 10
    for instance in world.sample(30, rng, condition="backbone"):
        number = data.NUMBERS[instance.label]
        # clean: one of the number's backbone clips after an onset of silence, nothing else (no noise)
        matches = []
        for clip in world.backbone_clips[number]:
            onset = len(instance.audio) - len(clip) - tail
            if 0 <= onset < data.SAMPLING_RATE // 5 and np.array_equal(instance.audio[onset:onset + len(clip)], clip):
                matches.append(not instance.audio[:onset].any() and not instance.audio[onset + len(clip):].any())
        assert matches and all(matches)
        tens, ones = divmod(number, 10)
        assert _scan_of(instance.image[:, :8, 0], world.backbone_scans[tens])
        assert _scan_of(instance.image[:, 8:, 0], world.backbone_scans[ones])
    for condition, clips, scans in (("target", world.train_clips, world.train_scans),
                                    ("test", world.test_clips, world.test_scans)):
        for instance in world.sample(20, rng, condition=condition):
            number = data.NUMBERS[instance.label]
            clip = clips[number][0]
            onset = len(instance.audio) - len(clip) - tail
            assert 0 <= onset < data.SAMPLING_RATE // 5
            assert np.abs(instance.audio[:onset]).sum() + np.abs(instance.audio[onset + len(clip):]).sum() > 0  # noise
            tens, ones = divmod(number, 10)
            assert _scan_of(instance.image[:, :8, 0], scans[tens]) and _scan_of(instance.image[:, 8:, 0], scans[ones])
    # test clips are synthesised separately: none equals a training or backbone clip
    train = {clip.tobytes() for pool in (world.train_clips, world.backbone_clips) for clips in pool.values()
             for clip in clips}
    assert not any(clip.tobytes() in train for clips in world.test_clips.values() for clip in clips)
    with pytest.raises(ValueError, match="condition"):
        world.sample(5, rng, condition="validation")


@pytest.mark.slow
@needs_espeak
def test_quick_avdigits_benchmark(tmp_path):
    """At CI size: stage 2 is worth doing (the oracle beats the stage-1 model on the target condition), and each
    method's results carry the validation-tuned hyperparameters it ran with."""
    import json

    from benchmarks.avdigits.run import BENCHMARK, main

    base, oracle = "base (stage 1 only)", "oracle (stage 2, all modalities)"
    methods = [base, "PMRL (observed only)", "CalMRL (PPCA)", oracle]
    summary = main(["--quick", "--seeds", "1", "--methods", *methods, "--output", str(tmp_path / "results.md")])
    assert summary[oracle]["mean_class_R@1"][0] > summary[base]["mean_class_R@1"][0] + 1.0
    assert summary[oracle]["observed_pairs_class_R@1"][0] > summary[base]["observed_pairs_class_R@1"][0]
    tuned = json.loads(BENCHMARK.hyperparameters.read_text())
    for name in methods[1:]:
        assert summary[name]["hyperparameters"] == tuned[name]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("Command: `python -m benchmarks.avdigits.run --quick --seeds 1 --output")
    assert "| PMRL | mean_class_R@1 |" in text  # the calibration analysis
    assert (tmp_path / "results.png").stat().st_size > 10_000 and (tmp_path / "results.json").exists()


def test_log_mel_floor_lifts_quiet_parts_and_padding_to_the_clips_floor():
    """The audio tower's input: each clip's log-mel map floored `range_db` below its own peak; its padding frames
    (the feature extractor's constant rows) read as that floor; louder values are untouched."""
    import torch
    from transformers import ASTFeatureExtractor

    from benchmarks.avdigits.run import make_collate

    extractor = ASTFeatureExtractor(num_mel_bins=32, max_length=200, sampling_rate=16000)
    rng = np.random.default_rng(0)
    clips = [(0.3 * rng.standard_normal(8000) * np.hanning(8000)).astype(np.float32),
             (0.01 * rng.standard_normal(16000)).astype(np.float32)]  # 0.5 s (padded) and 1 s
    log_mel = extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
    items = [{"label": 0, "vision": None, "text": None, "audio": {"input_values": row}} for row in log_mel]
    floored = make_collate("resnet-floor30")(items)["audio_pixel_values"][:, 0]  # what the audio tower reads
    for clip, frames in zip(range(2), (48, 98)):
        valid = log_mel[clip, :frames]
        floor = valid.max() - 3 * np.log(10) / (2 * extractor.std)  # 30 dB of power in the extractor's units
        assert torch.allclose(floored[clip, :frames], valid.clamp(min=floor))
        assert torch.allclose(floored[clip, frames:], floor.expand_as(floored[clip, frames:]))
    assert (floored[1] > floored[1].min()).any() and (log_mel[0] < floored[0].min() - 0.5).any()
