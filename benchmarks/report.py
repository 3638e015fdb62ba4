"""Aggregating seeds, the calibration analysis, markdown tables, JSON and plots of the quality benchmarks."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from scipy import stats

from .methods import BASE, COMPARISONS, FAMILIES


def summarise(per_seed: list[dict[str, dict[str, float]]],
              hyperparameters: dict[str, dict] | None = None) -> dict[str, dict]:
    """method -> metric -> (mean, std over seeds), plus "hyperparameters": the values the method ran with."""
    summary = {}
    for method in per_seed[0]:
        summary[method] = {}
        for metric in per_seed[0][method]:
            values = [seed_result[method][metric] for seed_result in per_seed if metric in seed_result[method]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][metric] = (statistics.mean(values), spread)
        if hyperparameters is not None:
            summary[method]["hyperparameters"] = dict(hyperparameters.get(method, {}))
    return summary


def calibration_gaps(per_seed: list[dict[str, dict[str, float]]], metrics: Sequence[str],
                     confidence: float = 0.95) -> dict[str, dict[str, dict]]:
    """Per objective and metric, what PPCA calibration does against the same objective on observed modalities
    only, paired by seed (every method of a seed starts from the same stage-1 model):

        difference_s = calibrated_s - observed_s,   gap_s = oracle_s - observed_s
        share = mean(difference) / mean(gap)        (the share of the missing-modality gap calibration closes)

    and a paired t-test of the differences: "helps" / "hurts" where the two-sided test rejects a zero mean
    difference at `confidence`, else "within seed spread". An objective with no observed-only variant
    (TRIANGLE) is compared with the stage-1 model."""
    analysis: dict[str, dict[str, dict]] = {}
    for objective, family in FAMILIES.items():
        observed_name = family.observed_only or BASE
        names = (observed_name, family.calibrated, family.oracle)
        if not all(name in per_seed[0] for name in names):
            continue
        analysis[objective] = {}
        for metric in metrics:
            rows = [[seed[name].get(metric) for name in names] for seed in per_seed]
            rows = [row for row in rows if None not in row]
            if not rows:
                continue
            difference = [calibrated - observed for observed, calibrated, _ in rows]
            gap = [oracle - observed for observed, _, oracle in rows]
            mean_difference, mean_gap = statistics.mean(difference), statistics.mean(gap)
            spread = statistics.stdev(difference) if len(rows) > 1 else 0.0
            if len(rows) > 1 and spread > 0:
                t_value = mean_difference / (spread / len(rows) ** 0.5)
                p_value = float(2 * stats.t.sf(abs(t_value), df=len(rows) - 1))
            else:
                t_value, p_value = float("nan"), float("nan")
            verdict = "within seed spread"
            if p_value < 1 - confidence:
                verdict = "helps" if mean_difference > 0 else "hurts"
            analysis[objective][metric] = {
                "observed_only": observed_name, "difference": [mean_difference, spread], "gap": [mean_gap,
                statistics.stdev(gap) if len(rows) > 1 else 0.0],
                "share_closed": mean_difference / mean_gap if mean_gap != 0 else float("nan"),
                "t": t_value, "p": p_value, "seeds": len(rows), "verdict": verdict}
    return analysis


def paired_test(differences: list[float], confidence: float = 0.95) -> dict:
    """Mean ± std of paired differences (one per seed) and the two-sided paired t-test of a zero mean: "better" /
    "worse" where it rejects at `confidence`, else "within seed spread"."""
    mean = statistics.mean(differences)
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    p_value = float("nan")
    if len(differences) > 1 and spread > 0:
        p_value = float(2 * stats.t.sf(abs(mean / (spread / len(differences) ** 0.5)), df=len(differences) - 1))
    verdict = "within seed spread"
    if p_value < 1 - confidence:
        verdict = "better" if mean > 0 else "worse"
    return {"difference": [mean, spread], "p": p_value, "seeds": len(differences), "verdict": verdict}


def paired_comparisons(per_seed: list[dict[str, dict[str, float]]], metrics: Sequence[str],
                       pairs: Sequence[tuple[str, str]] = COMPARISONS) -> dict[str, dict[str, dict]]:
    """`method - reference` per metric, paired by seed (both continue from the seed's stage-1 model), for each pair
    present in the results: {"method vs reference": {metric: paired_test}}."""
    analysis: dict[str, dict[str, dict]] = {}
    for method, reference in pairs:
        if method not in per_seed[0] or reference not in per_seed[0]:
            continue
        rows = {}
        for metric in metrics:
            differences = [seed[method][metric] - seed[reference][metric] for seed in per_seed
                           if metric in seed[method] and metric in seed[reference]]
            if differences:
                rows[metric] = paired_test(differences)
        analysis[f"{method} vs {reference}"] = rows
    return analysis


def comparison_markdown(analysis: dict[str, dict[str, dict]], metrics: Sequence[str]) -> str:
    """One row per comparison: the paired difference of each metric (mean ± std over seeds, p of the paired t-test)."""
    lines = ["| method vs reference | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, per_metric in analysis.items():
        cells = []
        for metric in metrics:
            row = per_metric.get(metric)
            cells.append("–" if row is None else
                         f"{row['difference'][0]:+.2f} ± {row['difference'][1]:.2f} (p={row['p']:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_markdown(analysis: dict[str, dict[str, dict]], metrics: Sequence[str]) -> str:
    """One row per objective and metric: calibrated - observed only, oracle - observed only, the share of that
    gap calibration closes, the paired test."""
    lines = ["| objective | metric | calibrated - observed only | oracle - observed only | share closed | p (paired t) "
             "| verdict |", "|---|---|---:|---:|---:|---:|---|"]
    for objective, per_metric in analysis.items():
        for metric in metrics:
            if metric not in per_metric:
                continue
            row = per_metric[metric]
            reference = "" if row["observed_only"] != BASE else " (vs base)"
            # a share of a gap that is not there means nothing: shown only where the oracle leads by > 1 point
            share = f"{row['share_closed']:+.2f}" if row["gap"][0] > 1.0 else "– (no gap)"
            lines.append(f"| {objective}{reference} | {metric} | {row['difference'][0]:+.2f} ± {row['difference'][1]:.2f} "
                         f"| {row['gap'][0]:+.2f} ± {row['gap'][1]:.2f} | {share} "
                         f"| {row['p']:.3f} | {row['verdict']} |")
    return "\n".join(lines)


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def hyperparameter_markdown(summary: dict) -> str:
    """Each method's hyperparameters (chosen on the validation split)."""
    lines = ["| method | hyperparameters (validation-tuned) |", "|---|---|"]
    for method, metrics in summary.items():
        chosen = metrics.get("hyperparameters") or {}
        text = ", ".join(f"{key} = {format_value(value)}" for key, value in chosen.items()) or "–"
        lines.append(f"| {method} | {text} |")
    return "\n".join(lines)


def markdown_table(summary: dict, columns: Sequence[str], digits: int = 2) -> str:
    present = [c for c in columns if any(c in metrics for metrics in summary.values())]
    lines = ["| method | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for method, metrics in summary.items():
        cells = [f"{metrics[c][0]:.{digits}f} ± {metrics[c][1]:.{digits}f}" if c in metrics else "–"
                 for c in present]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, *, title: str, recall: Sequence[tuple[str, str]]) -> None:
    """Three panels: Recall@1 by method (`recall`: (metric, legend) pairs), imputation error of each model's
    imputer on the test set (PPCA vs the modality mean), and the anchor shift without and with calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    labels = [m.replace(" (", "\n(") for m in methods]
    positions = list(range(len(methods)))
    fig, axes = plt.subplots(3, 1, figsize=(max(12, len(methods) * 0.9), 16))
    panels = [
        (recall, "Recall@1 (%)", "Test retrieval"),
        ((("imputation_cosine", "PPCA imputation"), ("mean_imputation_cosine", "mean imputation")),
         "cosine(imputed, true embedding)", "Imputation quality (held-out true embeddings)"),
        ((("anchor_shift_observed_only", "observed only"), ("anchor_shift_calibrated", "calibrated (PPCA)")),
         "||u1 - u1'|| (incomplete instances)", "Anchor shift vs the true full-modality anchor"),
    ]
    for axis, (series, ylabel, panel_title) in zip(axes, panels):
        width = 0.8 / len(series)
        for index, (metric, legend) in enumerate(series):
            offset = (index - (len(series) - 1) / 2) * width
            axis.bar([p + offset for p in positions], [summary[m].get(metric, (0.0, 0.0))[0] for m in methods],
                     width=width, yerr=[summary[m].get(metric, (0.0, 0.0))[1] for m in methods], capsize=3,
                     label=legend)
        axis.set_ylabel(ylabel)
        axis.set_title(f"{title}: {panel_title}", fontsize=10)
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(output: Path, command: str, text: str, summary: dict, *, title: str,
                  recall: Sequence[tuple[str, str]], siblings: dict[str, object] | None = None) -> None:
    """`output` (.md) with the command that made it, its .json (`summary`) and .png, and `siblings`: more JSON
    files next to it (`{"seeds": ...}` -> `results.seeds.json`)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(f"Command: `{command}`\n\n{text}\n")
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    for name, value in (siblings or {}).items():
        output.with_suffix(f".{name}.json").write_text(json.dumps(value, indent=1))
    plot(summary, output.with_suffix(".png"), title=title, recall=recall)
