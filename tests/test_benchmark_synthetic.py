"""The controlled benchmark at CI size: what must hold for the protocol to measure anything, not the ranking."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.methods import FAMILIES, METHODS, TUNED_METHODS  # noqa: E402
from benchmarks.synthetic.run import HYPERPARAMETERS, main  # noqa: E402


BASE, ORACLE = "base (stage 1 only)", "oracle (stage 2, all modalities)"
METHODS_RUN = [BASE, "PMRL (observed only)", "CalMRL (PPCA)", ORACLE]


@pytest.mark.slow
def test_quick_controlled_benchmark(tmp_path):
    output = tmp_path / "results.md"
    summary = main(["--quick", "--seeds", "2", "--methods", *METHODS_RUN, "--output", str(output)])
    base, calmrl, oracle = summary[BASE], summary["CalMRL (PPCA)"], summary[ORACLE]
    # stage 2 carries what stage 1 lacks: training on it with every modality beats the stage-1 model
    assert oracle["mean_R@1"][0] > base["mean_R@1"][0] + 2.0
    # the fitted imputer predicts held-out embeddings better than the modality mean does
    assert calmrl["imputation_cosine"][0] > calmrl["mean_imputation_cosine"][0]
    assert base["imputation_cosine"][0] > base["mean_imputation_cosine"][0]
    # calibration with an imputer fitted on full-modality data shrinks the anchor shift of the stage-1 model
    assert base["anchor_shift_calibrated"][0] < base["anchor_shift_observed_only"][0]
    # the fused query is reported next to the single modalities it fuses
    assert {"query_fused->vision_R@1", "query_text->vision_R@1", "query_subtitle->vision_R@1"} <= set(calmrl)
    # each method's entry records the (validation-tuned) hyperparameters it ran with
    tuned = json.loads(HYPERPARAMETERS.read_text())
    written = json.loads(output.with_suffix(".json").read_text())
    assert written[BASE]["hyperparameters"] == {}
    for name in METHODS_RUN[1:]:
        assert written[name]["hyperparameters"] == tuned[name] and "learning_rate" in tuned[name]
    # the calibration analysis pairs the seeds: its difference is the mean of the per-seed differences
    gaps = json.loads(output.with_suffix(".calibration.json").read_text())["PMRL"]["mean_R@1"]
    seeds = json.loads(output.with_suffix(".seeds.json").read_text())
    differences = [r["CalMRL (PPCA)"]["mean_R@1"] - r["PMRL (observed only)"]["mean_R@1"] for r in seeds.values()]
    assert abs(gaps["difference"][0] - sum(differences) / len(differences)) < 1e-9 and gaps["seeds"] == 2


def test_every_objective_is_tuned_with_the_same_budget():
    """Every tuned method has an entry in the committed hyperparameters, chosen from a grid of the same size."""
    tuned = json.loads(HYPERPARAMETERS.read_text())
    grids = json.loads(HYPERPARAMETERS.with_suffix(".grid.json").read_text())
    assert set(TUNED_METHODS) <= set(tuned)
    sizes = {len(METHODS[name].grid()) for name in TUNED_METHODS}
    assert sizes == {8}
    for name in TUNED_METHODS:
        scores = [score for _, score in grids[name]["grid"]]
        assert len(scores) == 8 and tuned[name] == grids[name]["grid"][scores.index(max(scores))][0]
    for family in FAMILIES.values():
        assert family.calibrated in METHODS and family.oracle in METHODS


@pytest.mark.slow
def test_seeds_run_apart_and_merged_equal_one_run(tmp_path):
    """Seeds run in two worker processes (one torch thread each), and `--merge` of seeds run one by one in this
    process at one thread, give the same summary."""
    methods = ["--methods", BASE, "PMRL (observed only)"]
    together = main(["--quick", "--seeds", "2", "--processes", "2", *methods, "--output", str(tmp_path / "both.md")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two workers of a 2-core machine gets
    try:
        main(["--quick", "--seeds", "1", *methods, "--output", str(tmp_path / "first.md")])
        main(["--quick", "--seeds", "1", "--first-seed", "1", *methods, "--output", str(tmp_path / "second.md")])
    finally:
        torch.set_num_threads(threads)
    merged = main(["--quick", "--merge", str(tmp_path / "first.seeds.json"), str(tmp_path / "second.seeds.json"),
                   "--output", str(tmp_path / "merged.md")])
    assert merged == together
    assert "--merge" in (tmp_path / "merged.md").read_text().splitlines()[0]


@pytest.mark.slow
def test_benchmarks_run_writes_each_benchmark_with_its_command(tmp_path):
    """`python -m benchmarks.run` pools the seeds of the benchmarks it runs and writes each one's results with the
    command that made them."""
    from benchmarks.run import main as run_all

    summaries = run_all(["--quick", "--seeds", "1", "--only", "synthetic", "--output-dir", str(tmp_path)])
    written = tmp_path / "synthetic" / "results.md"
    assert written.read_text().startswith("Command: `python -m benchmarks.run --quick --seeds 1 --only synthetic`")
    seeds = json.loads(written.with_suffix(".seeds.json").read_text())
    assert list(seeds) == ["0"] and set(seeds["0"]) == set(summaries["synthetic"]) == set(METHODS)
    # the default run keeps the matching head's method and its re-ranking metrics, with their table
    head = seeds["0"]["CalMRL (PPCA) + matching head"]
    for gallery in ("vision", "audio"):
        for suffix in ("", "_reranked", "_reranked50", "_head_only"):
            assert 0.0 <= head[f"text->{gallery}_R@1{suffix}"] <= head[f"text->{gallery}_R@5{suffix}"] <= 100.0
    assert "Re-ranking with the matching head" in written.read_text()


@pytest.mark.slow
def test_tuning_split_between_processes_keeps_every_grid(tmp_path):
    """`--tune` with the methods split between two worker processes scores every method's whole grid on the
    validation split and chooses each grid's best point."""
    path = tmp_path / "hyperparameters.json"
    methods = ["PMRL (observed only)", "anchor InfoNCE (observed only)"]
    main(["--quick", "--tune", "--processes", "2", "--methods", *methods, "--hyperparameters", str(path)])
    chosen, grids = json.loads(path.read_text()), json.loads(path.with_suffix(".grid.json").read_text())
    assert set(chosen) == {*methods, BASE} and chosen[BASE] == {}
    for name in methods:
        points = grids[name]["grid"]
        assert [point for point, _ in points] == METHODS[name].grid()
        scores = [score for _, score in points]
        assert chosen[name] == points[scores.index(max(scores))][0]
