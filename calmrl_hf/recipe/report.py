"""What the recipe shows a person at the end: the test scores of both stages side by side, grouped by what stage 2
trained on, and a PNG of each stage's training loss, test Recall@1 over the steps and Recall@1 by direction.

    print(results_table(results))                  # results = {"stage1": {metric: value}, "stage2": {...}}
    print(closing_line(results, seconds))          # the same headline as the table's last row
    plot_training(folder / "training.png", {"stage1": output1, "stage2": output2}, results)
"""

from __future__ import annotations

import logging
from pathlib import Path


logger = logging.getLogger(__name__)

# (group title, directions): the pairs stage 2 trains on, the pair no stage-2 instance has, and the subtitle, which
# stage 2 never sees (it rides on the text tower)
DIRECTION_GROUPS = (
    ("observed pairs (stage 2 trains on video-text and audio-text)",
     ("text->vision", "vision->text", "text->audio", "audio->text")),
    ("never paired in stage 2", ("vision->audio", "audio->vision")),
    ("subtitle (absent from stage 2)", ("text->subtitle", "subtitle->text", "vision->subtitle", "subtitle->vision",
                                        "audio->subtitle", "subtitle->audio")),
)
HEADLINE = "class_R@1"
MEAN_LABEL = "mean of the observed pairs"
HEADLINE_NAME = f"test class R@1 (%), {MEAN_LABEL}"  # the table's last row, named where a line reports it


def group_directions(metrics: dict[str, float]) -> list[tuple[str, list[str]]]:
    """`DIRECTION_GROUPS` restricted to the directions `metrics` has (a model without subtitles has none)."""
    groups = []
    for title, directions in DIRECTION_GROUPS:
        present = [d for d in directions if f"{d}/{HEADLINE}" in metrics]
        if present:
            groups.append((title, present))
    return groups


def observed_pairs_mean(metrics: dict[str, float]) -> float:
    """Mean class Recall@1 over text->vision, vision->text, text->audio, audio->text: the main job's headline."""
    directions = DIRECTION_GROUPS[0][1]
    return sum(metrics[f"{d}/{HEADLINE}"] for d in directions) / len(directions)


def headline(metrics: dict[str, float]) -> float | None:
    """The main job's headline (`observed_pairs_mean`), or None where `metrics` lack an observed pair's
    direction: the one number the table's last row, the stage lines and the closing line report."""
    if not all(f"{d}/{HEADLINE}" in metrics for d in DIRECTION_GROUPS[0][1]):
        return None
    return observed_pairs_mean(metrics)


def stage_line(stage: str, step: int, metrics: dict[str, float]) -> str:
    """What the recipe logs as a stage ends: its step and test headline, named as the table names it."""
    value = headline(metrics)
    score = f"{HEADLINE_NAME} {value:.1f}" if value is not None else f"no {HEADLINE_NAME} (a direction is missing)"
    return f"{stage} finished at step {step}: {score}"


def closing_line(results: dict[str, dict[str, float]], seconds: float) -> str:
    """The recipe's last line: the headline after each stage, as the table's last row has it, and the time."""
    values = {stage: headline(metrics) for stage, metrics in results.items()}
    scores = ", ".join(f"{value:.1f} after {stage}" for stage, value in values.items() if value is not None)
    told = f"{HEADLINE_NAME}: {scores}. " if scores else ""
    return f"{told}The recipe ran {seconds:.0f} s (from reading its config to this line)."


def results_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: per direction, class-level and instance-level Recall@1 (%) after stage 1 and after
    stage 2 and the change, grouped by `DIRECTION_GROUPS`, with the observed pairs' mean."""
    first, second = results["stage1"], results["stage2"]
    width = max(len(MEAN_LABEL), *(len(d) + 2 for _, directions in DIRECTION_GROUPS for d in directions))
    header = (f"{'':<{width}} {'class R@1':>29}   {'instance R@1':>15}\n"
              f"{'direction':<{width}} {'stage 1':>9} {'stage 2':>9} {'change':>9}   {'stage 1':>7} {'stage 2':>7}")
    lines = ["Test retrieval, Recall@1 (%): class level = any instance of the same number is a hit", header]
    for title, directions in group_directions(second):
        lines.append(title)
        for direction in directions:
            class_key, instance_key = f"{direction}/{HEADLINE}", f"{direction}/R@1"
            lines.append(f"  {direction:<{width - 2}} {first[class_key]:>9.1f} {second[class_key]:>9.1f} "
                         f"{second[class_key] - first[class_key]:>+9.1f}   {first.get(instance_key, float('nan')):>7.1f} "
                         f"{second.get(instance_key, float('nan')):>7.1f}")
    means = [headline(stage) for stage in (first, second)]
    if None not in means:
        lines.append(f"{MEAN_LABEL:<{width}} {means[0]:>9.1f} {means[1]:>9.1f} "
                     f"{means[1] - means[0]:>+9.1f}")
    return "\n".join(lines)


def family_means(metrics: dict[str, float]) -> dict[str, float]:
    """Mean class Recall@1 of each group of `DIRECTION_GROUPS` that `metrics` has, by its short name."""
    return {title.split(" (")[0]: sum(metrics[f"{d}/{HEADLINE}"] for d in directions) / len(directions)
            for title, directions in group_directions(metrics)}


def plot_training(path: str | Path, losses: dict[str, tuple[int, list[float]]],
                  results: dict[str, dict[str, float]], *,
                  evaluations: dict[str, list[tuple[int, dict[str, float]]]] | None = None,
                  chance: float | None = None) -> Path | None:
    """Write a PNG to `path`, to be read at a glance: top, each stage's training loss on its own axes
    (`losses[stage] = (last global step, loss of each step recorded)`; a resumed stage has the steps after its
    resume; stages may train different objectives, whose losses do not compare); bottom left, the test class
    Recall@1 of each family of directions over the optimizer steps of both stages (`evaluations[stage] = [(step,
    metrics), ...]`, the evaluations every `eval_steps`), with the stage boundary and chance level (`chance`, %);
    bottom right, class Recall@1 by direction after each stage, the directions grouped by family. Returns the path,
    or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): no %s.", path)
        return None
    figure = plt.figure(figsize=(14, 8.5))
    grid = figure.add_gridspec(2, max(2, len(losses)), height_ratios=[1, 1.3])
    offsets, offset = {}, 0
    for column, (stage, (last_step, values)) in enumerate(losses.items()):
        axes = figure.add_subplot(grid[0, column])
        first_step = last_step - len(values) + 1
        axes.plot(range(offset + first_step, offset + last_step + 1), values, label=stage)
        axes.set(xlabel="optimizer step (both stages)", ylabel="training loss", title=f"{stage}: training loss")
        axes.legend()
        offsets[stage.split(" ")[0]], offset = offset, offset + last_step
    curves = figure.add_subplot(grid[1, 0])
    for family in family_means(results["stage2"]):
        points = [(offsets.get(stage, 0) + step, family_means(metrics)[family])
                  for stage, history in (evaluations or {}).items() for step, metrics in history]
        points += [(offsets.get(stage, 0) + losses_end, family_means(results[stage])[family])
                   for stage, losses_end in ((name.split(" ")[0], last) for name, (last, _) in losses.items())
                   if stage in results]
        points.sort()
        curves.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=family)
    if len(offsets) > 1:
        curves.axvline(list(offsets.values())[1], color="grey", linestyle=":", label="stage 2 starts")
    if chance is not None:
        curves.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ({chance:.1f}%)")
    curves.set(xlabel="optimizer step (both stages)", ylabel="class Recall@1 (%)", ylim=(0, 100),
               title="test retrieval during training, by family of directions")
    curves.legend(fontsize=8)
    bars = figure.add_subplot(grid[1, 1:])
    directions = [d for _, group in group_directions(results["stage2"]) for d in group]
    positions = range(len(directions))
    for shift, stage in ((-0.2, "stage1"), (0.2, "stage2")):
        bars.bar([p + shift for p in positions], [results[stage][f"{d}/{HEADLINE}"] for d in directions],
                 width=0.4, label=stage)
    start = 0
    for title, group in group_directions(results["stage2"]):  # the families, separated and named
        if start:
            bars.axvline(start - 0.5, color="grey", linewidth=0.8)
        bars.text(start + (len(group) - 1) / 2, 108, title.split(" (")[0], ha="center", va="top", fontsize=8)
        start += len(group)
    if chance is not None:
        bars.axhline(chance, color="black", linestyle="--", linewidth=1)
    bars.set_xticks(list(positions), directions, rotation=45, ha="right")
    bars.set(ylabel="class Recall@1 (%)", title="test retrieval by direction after each stage", ylim=(0, 112))
    bars.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["DIRECTION_GROUPS", "HEADLINE_NAME", "closing_line", "family_means", "group_directions", "headline",
           "observed_pairs_mean", "plot_training", "results_table", "stage_line"]
