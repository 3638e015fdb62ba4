"""The recipe's report: the grouped table of both stages and the training plot (progress: test_progress)."""

import pytest

from calmrl_hf.recipe.report import DIRECTION_GROUPS, observed_pairs_mean, plot_training, results_table


def fake_results(with_subtitle=True):
    directions = [d for _, group in DIRECTION_GROUPS for d in group if with_subtitle or "subtitle" not in d]
    results = {}
    for offset, stage in ((0.0, "stage1"), (10.0, "stage2")):
        results[stage] = {f"{d}/class_R@1": offset + i for i, d in enumerate(directions)}
        results[stage].update({f"{d}/R@1": offset / 2 + i for i, d in enumerate(directions)})
    return results


def test_table_groups_directions_with_both_stages_side_by_side():
    table = results_table(fake_results()).splitlines()
    titles = [line for line in table if not line.startswith(" ") and "->" not in line]
    assert [t.split(" (")[0] for t in titles[2:5]] == ["observed pairs", "never paired in stage 2", "subtitle"]
    row = next(line for line in table if line.strip().startswith("audio->text"))
    # class R@1 stage 1, stage 2, change, then instance R@1 stage 1, stage 2 (fake_results: index 3)
    assert row.split() == ["audio->text", "3.0", "13.0", "+10.0", "3.0", "8.0"]
    assert table[-1].split()[-3:] == ["1.5", "11.5", "+10.0"]  # mean of the four observed pairs
    assert observed_pairs_mean(fake_results()["stage2"]) == 11.5
    without = results_table(fake_results(with_subtitle=False))
    assert "subtitle" not in without and "never paired" in without


def test_plot_has_both_stages(tmp_path, monkeypatch):
    """The figure plot_training writes: each stage's loss on its own axes, on one step axis (stage 2's after stage 1's;
    stage 2 resumed at step 2 of 4, so its steps 3 and 4 only); the families' test Recall@1 over the steps (the
    evaluations, then each stage's final result) with the stage boundary and chance level; each stage's class
    Recall@1 bars by direction."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: figures.append(figure) or close(figure))
    results = fake_results()
    evaluations = {"stage1": [(2, results["stage1"])], "stage2": [(3, results["stage2"])]}
    path = plot_training(tmp_path / "training.png", {"stage1 (pairwise_infonce)": (5, [3.0, 2.5, 2.0, 1.8, 1.7]),
                                                     "stage2 (pmrl)": (4, [1.0, 0.9])}, results,
                         evaluations=evaluations, chance=1.1)
    assert path == tmp_path / "training.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    (figure,) = figures
    first, second, curves, bars = figure.axes
    assert first.get_ylabel() == second.get_ylabel() == "training loss"  # own axes: objectives do not compare
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in first.get_lines()] == [
        ([1, 2, 3, 4, 5], [3.0, 2.5, 2.0, 1.8, 1.7])]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in second.get_lines()] == [([8, 9], [1.0, 0.9])]
    observed = {line.get_label(): line for line in curves.get_lines()}["observed pairs"]
    # stage 1 evaluated at step 2 and done at 5; stage 2 (offset 5) at 3 -> 8 and done at 4 -> 9
    assert list(observed.get_xdata()) == [2, 5, 8, 9]
    assert list(observed.get_ydata()) == [observed_pairs_mean(results[s]) for s in ("stage1", "stage1", "stage2",
                                                                                      "stage2")]
    assert {"stage 2 starts", "chance (1.1%)", "never paired in stage 2", "subtitle"} <= {
        line.get_label() for line in curves.get_lines()}
    directions = [tick.get_text() for tick in bars.get_xticklabels()]
    assert len(directions) == len({d for _, group in DIRECTION_GROUPS for d in group}) == 12
    assert [container.get_label() for container in bars.containers] == ["stage1", "stage2"]
    for container in bars.containers:
        stage = container.get_label()
        assert [bar.get_height() for bar in container] == [results[stage][f"{d}/class_R@1"] for d in directions]
