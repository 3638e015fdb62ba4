"""What the recipe shows a person at the end: the test scores of both stages side by side, grouped by what stage 2
trained on, and a PNG of the training loss of both stages and Recall@1 by direction.

    print(results_table(results))                  # results = {"stage1": {metric: value}, "stage2": {...}}
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
    if all(f"{d}/{HEADLINE}" in second for d in DIRECTION_GROUPS[0][1]):
        means = [observed_pairs_mean(stage) for stage in (first, second)]
        lines.append(f"{MEAN_LABEL:<{width}} {means[0]:>9.1f} {means[1]:>9.1f} "
                     f"{means[1] - means[0]:>+9.1f}")
    return "\n".join(lines)


def plot_training(path: str | Path, losses: dict[str, tuple[int, list[float]]],
                  results: dict[str, dict[str, float]]) -> Path | None:
    """Write a PNG to `path`: left, the training loss of each optimizer step of both stages on one step axis
    (`losses[stage] = (last global step, loss of each step recorded)`; a resumed stage has the steps after its
    resume); right, class Recall@1 by direction after each stage. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): no %s.", path)
        return None
    figure, (loss_axes, recall_axes) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    offset = 0
    for stage, (last_step, values) in losses.items():
        first_step = last_step - len(values) + 1
        loss_axes.plot(range(offset + first_step, offset + last_step + 1), values, label=stage)
        offset += last_step
    loss_axes.set(xlabel="optimizer step (both stages)", ylabel="training loss", title="training loss")
    loss_axes.legend()
    directions = [d for _, group in group_directions(results["stage2"]) for d in group]
    positions = range(len(directions))
    for shift, stage in ((-0.2, "stage1"), (0.2, "stage2")):
        recall_axes.bar([p + shift for p in positions], [results[stage][f"{d}/{HEADLINE}"] for d in directions],
                        width=0.4, label=stage)
    recall_axes.set_xticks(list(positions), directions, rotation=45, ha="right")
    recall_axes.set(ylabel="class Recall@1 (%)", title="test retrieval by direction", ylim=(0, 100))
    recall_axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["DIRECTION_GROUPS", "group_directions", "observed_pairs_mean", "plot_training", "results_table"]
