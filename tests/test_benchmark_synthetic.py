"""The controlled benchmark at CI size: only what must always hold, not the headline ranking."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic.run import main  # noqa: E402


def test_quick_controlled_benchmark(tmp_path):
    summary = main(["--quick", "--seeds", "1", "--output", str(tmp_path / "results.md")])
    calmrl = summary["CalMRL (PPCA)"]
    # the fitted imputer predicts held-out embeddings better than the modality mean does
    assert calmrl["imputation_cosine"][0] > calmrl["mean_imputation_cosine"][0]
    # and calibration with its imputations shrinks the anchor shift
    assert calmrl["anchor_shift_calibrated"][0] < calmrl["anchor_shift_observed_only"][0]
    assert set(summary) >= {"base (stage 1 only)", "PMRL (observed only)", "oracle (stage 2, all modalities)"}
    assert all(0.0 <= metrics["mean_R@1"][0] <= 100.0 for metrics in summary.values())
    assert (tmp_path / "results.md").read_text().count("\n|") >= 9
    # a fused query (observed text + subtitle, imputed vision + audio) beats the best single observed modality
    fused = calmrl["query_fused->vision_R@1"][0]
    assert fused > max(calmrl["query_text->vision_R@1"][0], calmrl["query_subtitle->vision_R@1"][0])
