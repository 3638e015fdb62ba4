"""The recipe's report: the grouped table of both stages, the training plot, and progress as log lines."""

import io
import logging
import sys

import pytest
from tqdm.auto import tqdm

from calmrl_hf.training.progress import LoggedProgress, step_progress
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
    """The figure plot_training writes: the loss of each stage's recorded steps on one step axis (stage 2's after
    stage 1's; stage 2 resumed at step 2 of 4, so its steps 3 and 4 only), and each stage's class Recall@1 bars."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: figures.append(figure) or close(figure))
    results = fake_results()
    path = plot_training(tmp_path / "training.png", {"stage1": (5, [3.0, 2.5, 2.0, 1.8, 1.7]),
                                                     "stage2": (4, [1.0, 0.9])}, results)
    assert path == tmp_path / "training.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    (figure,) = figures
    loss_axes, recall_axes = figure.axes[:2]
    assert loss_axes.get_ylabel() == "training loss"
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_axes.get_lines()}
    assert lines == {"stage1": ([1, 2, 3, 4, 5], [3.0, 2.5, 2.0, 1.8, 1.7]), "stage2": ([8, 9], [1.0, 0.9])}
    assert [text.get_text() for text in loss_axes.get_legend().get_texts()] == ["stage1", "stage2"]
    directions = [tick.get_text() for tick in recall_axes.get_xticklabels()]
    assert len(directions) == len({d for _, group in DIRECTION_GROUPS for d in group}) == 12
    assert [container.get_label() for container in recall_axes.containers] == ["stage1", "stage2"]
    for container in recall_axes.containers:
        stage = container.get_label()
        assert [bar.get_height() for bar in container] == [results[stage][f"{d}/class_R@1"] for d in directions]


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(step_progress(10, 0, "training", enabled=True), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    progress = step_progress(10, 2, "training stage1", enabled=True)
    assert isinstance(progress, LoggedProgress)
    silent = step_progress(10, 0, "training", enabled=False)  # the other processes
    assert isinstance(silent, tqdm) and silent.disable
    with caplog.at_level(logging.INFO, logger="calmrl_hf.training.progress"):
        for step in range(8):
            progress.update(1)
            if (step + 1) % 4 == 0:
                progress.set_postfix(loss="0.5000")
        progress.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("training stage1: step 6/10 (60%), loss 0.5000,")
    assert lines[1].startswith("training stage1: step 10/10 (100%)") and "about 0 s left" in lines[1]
    assert lines[2].startswith("training stage1: 8 steps in")
