"""The benchmarks' calibration analysis and direction families, against references computed another way."""

import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metrics import direction_families  # noqa: E402
from benchmarks.report import calibration_gaps, summarise  # noqa: E402


def seeds_with(calibrated_offsets, oracle_offset=10.0):
    observed = [50.0, 55.0, 60.0, 52.0, 58.0]
    return [{"base (stage 1 only)": {"m": o - 5}, "PMRL (observed only)": {"m": o},
             "CalMRL (PPCA)": {"m": o + c}, "oracle (stage 2, all modalities)": {"m": o + oracle_offset}}
            for o, c in zip(observed, calibrated_offsets)]


def test_calibration_gap_is_a_paired_t_test():
    offsets = [2.0, 3.0, 2.5, 1.5, 3.5]
    per_seed = seeds_with(offsets)
    row = calibration_gaps(per_seed, ["m"])["PMRL"]["m"]
    calibrated = [s["CalMRL (PPCA)"]["m"] for s in per_seed]
    observed = [s["PMRL (observed only)"]["m"] for s in per_seed]
    reference = stats.ttest_rel(calibrated, observed)
    assert row["t"] == pytest.approx(reference.statistic) and row["p"] == pytest.approx(reference.pvalue)
    assert row["share_closed"] == pytest.approx(2.5 / 10.0) and row["verdict"] == "helps"
    # the seed-to-seed spread of observed-only (50..60) is large; only the pairing makes +2.5 significant
    assert stats.ttest_ind(calibrated, observed).pvalue > 0.05


def test_calibration_gap_verdicts():
    assert calibration_gaps(seeds_with([-2.0, -3.0, -2.5, -1.5, -3.5]), ["m"])["PMRL"]["m"]["verdict"] == "hurts"
    row = calibration_gaps(seeds_with([2.0, -3.0, 1.0, -1.0, 0.5]), ["m"])["PMRL"]["m"]
    assert row["verdict"] == "within seed spread" and row["p"] > 0.05


def test_triangle_is_compared_with_the_base():
    per_seed = [{"base (stage 1 only)": {"m": 40.0 + s}, "TRIANGLE + PPCA": {"m": 45.0 + 2 * s},
                 "TRIANGLE (oracle)": {"m": 50.0 + s}} for s in range(3)]
    row = calibration_gaps(per_seed, ["m"])["TRIANGLE"]["m"]
    assert row["observed_only"] == "base (stage 1 only)"
    assert row["difference"][0] == pytest.approx(6.0) and row["gap"][0] == pytest.approx(10.0)


def test_summarise_keeps_the_hyperparameters():
    summary = summarise(seeds_with([1.0] * 5), {"CalMRL (PPCA)": {"pmrl_tau1": 0.5}})
    assert summary["CalMRL (PPCA)"]["hyperparameters"] == {"pmrl_tau1": 0.5}
    assert summary["PMRL (observed only)"]["hyperparameters"] == {}
    assert summary["PMRL (observed only)"]["m"][0] == pytest.approx(55.0)


def test_direction_families():
    modalities = ["vision", "audio", "text", "subtitle"]
    recall = {f"{a}->{b}/R@1": float(10 * i + j) for i, a in enumerate(modalities)
              for j, b in enumerate(modalities) if a != b}
    families = direction_families(recall, modalities)
    assert families["mean_R@1"] == pytest.approx(sum(recall.values()) / 12)
    pairs = ["vision->text", "text->vision", "audio->text", "text->audio"]
    assert families["observed_pairs_R@1"] == pytest.approx(sum(recall[f"{p}/R@1"] for p in pairs) / 4)
    assert families["vision<->audio_R@1"] == pytest.approx((recall["vision->audio/R@1"] + recall["audio->vision/R@1"]) / 2)
    with_subtitle = [v for k, v in recall.items() if "subtitle" in k]
    assert families["subtitle_R@1"] == pytest.approx(sum(with_subtitle) / 6)
    assert "subtitle_R@1" not in direction_families({k: v for k, v in recall.items() if "subtitle" not in k},
                                                    modalities[:3])
