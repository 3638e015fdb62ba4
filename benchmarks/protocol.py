"""The paper's protocol, shared by the controlled (`benchmarks/synthetic`) and real-signal (`benchmarks/avdigits`)
benchmarks.

Stage 1 warms the towers up on a small full-modality split. Stage 2 continues from the stage-1 weights on a
vision-text split plus an audio-text split, once per method; every method goes through the library's training
loop (`calmrl_hf.training.train`) and differs from the others only by config. Test: held-out instances with all
modalities, so the true full-modality embeddings (hence the imputation error and the anchor shift) are known.

A benchmark supplies its data splits, a model builder, a collate function and its own test metrics; this module
runs the methods over seeds, aggregates mean ± std, writes the markdown table, the JSON and the PNG plots.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from calmrl_hf import CalMRLModel
from calmrl_hf.evaluation import anchor_shift_report, imputation_error
from calmrl_hf.training import TrainingArguments, build_accelerator, train


@dataclass(frozen=True)
class Method:
    """Stage-2 config overrides (None: no stage 2, the stage-1 model is evaluated); `oracle`: stage 2 sees every
    modality of its instances (the same instances, nothing hidden); `training`: stage-2 TrainingArguments."""

    overrides: dict | None
    oracle: bool = False
    training: dict = field(default_factory=dict)


METHODS = {
    "base (stage 1 only)": Method(None),
    "anchor InfoNCE (text)": Method({"alignment_objective": "anchor_infonce", "imputer_method": "none"}),
    "GRAM (observed only)": Method({"alignment_objective": "gram", "imputer_method": "none"}),
    "PMRL (observed only)": Method({"alignment_objective": "pmrl", "imputer_method": "none"}),
    "CalMRL (PPCA)": Method({"alignment_objective": "pmrl", "imputer_method": "ppca"}),
    "CalMRL (mean imputation)": Method({"alignment_objective": "pmrl", "imputer_method": "mean"}),
    "CalMRL (zero imputation)": Method({"alignment_objective": "pmrl", "imputer_method": "zero"}),
    "oracle (stage 2, all modalities)": Method({"alignment_objective": "pmrl", "imputer_method": "none"}, oracle=True),
}
# Diagnostics for the honesty analysis (`--methods`): one CalMRL setting changed at a time.
DIAGNOSTIC_METHODS = {
    "CalMRL (PPCA, no renormalisation)": Method({"alignment_objective": "pmrl", "imputer_method": "ppca",
                                                 "renormalize_imputed": False}),
    "CalMRL (PPCA, no gradient through imputation)": Method({"alignment_objective": "pmrl", "imputer_method": "ppca",
                                                              "impute_with_grad": False}),
    "CalMRL (PPCA, imputer frozen after warm start)": Method({"alignment_objective": "pmrl", "imputer_method": "ppca"},
                                                             training={"imputer_statistics": "frozen"}),
    "PMRL (observed only, tau2 = 0.5)": Method({"alignment_objective": "pmrl", "imputer_method": "none",
                                                "pmrl_tau2": 0.5}),
    "CalMRL (PPCA, tau2 = 0.5)": Method({"alignment_objective": "pmrl", "imputer_method": "ppca", "pmrl_tau2": 0.5}),
    "CalMRL (PPCA) + matching head": Method({"alignment_objective": "pmrl", "imputer_method": "ppca",
                                             "fusion_num_layers": 1, "fusion_num_attention_heads": 4}),
}
ALL_METHODS = {**METHODS, **DIAGNOSTIC_METHODS}
# Options that shape the architecture: set when the model is built, not after stage 1.
ARCHITECTURE_KEYS = ("fusion_num_layers", "fusion_num_attention_heads")


@dataclass
class Splits:
    """stage1: full modality; stage2: vision-text + audio-text instances; stage2_full: the same instances with every
    modality (the oracle's data). The test set stays with the benchmark's `evaluate`."""

    stage1: object
    stage2: object
    stage2_full: object


@dataclass
class StageSettings:
    steps: int
    learning_rate: float
    batch_size: int
    extra: dict = field(default_factory=dict)  # more TrainingArguments (e.g. freeze_modalities)


def run_methods(
    *,
    build_model: Callable[..., CalMRLModel],
    splits: Splits,
    collate_fn: Callable,
    stage1: StageSettings,
    stage2: StageSettings,
    evaluate: Callable[[CalMRLModel], dict[str, float]],
    methods: Sequence[str],
    seed: int,
    workdir: Path,
) -> dict[str, dict[str, float]]:
    """Stage 1 once, then stage 2 from the stage-1 weights for each method; `evaluate(model)` on each result.

    `build_model(**architecture)` returns a freshly initialised model (seeded by the caller) whose config's
    alignment objective is the stage-1 one.
    """

    def arguments(name: str, stage: StageSettings, **extra) -> TrainingArguments:
        return TrainingArguments(output_dir=str(workdir / f"seed{seed}" / name), max_steps=stage.steps, seed=seed,
                                 per_device_train_batch_size=stage.batch_size, learning_rate=stage.learning_rate,
                                 warmup_steps=max(1, stage.steps // 20), logging_steps=10 ** 6, save_steps=10 ** 6,
                                 **stage.extra, **extra)

    torch.manual_seed(seed)
    model = build_model()
    stage1_args = arguments("stage1", stage1)
    accelerator = build_accelerator(stage1_args)
    train(model, splits.stage1, stage1_args, collate_fn=collate_fn, accelerator=accelerator)
    stage1_model = accelerator.unwrap_model(model)
    results = {}
    for method in methods:
        spec = ALL_METHODS[method]
        overrides = dict(spec.overrides or {})
        architecture = {k: overrides.pop(k) for k in ARCHITECTURE_KEYS if k in overrides}
        if architecture:
            torch.manual_seed(seed)
            model = build_model(**architecture)
            missing, unexpected = model.load_state_dict(stage1_model.state_dict(), strict=False)
            assert not unexpected and all(key.startswith("fusion.") for key in missing), (missing, unexpected)
        else:
            model = copy.deepcopy(stage1_model)
        if spec.overrides is not None:
            for key, value in overrides.items():
                setattr(model.config, key, value)
            args = arguments(method.split(" ")[0], stage2, imputer_warm_start=True, **spec.training)
            train(model, splits.stage2_full if spec.oracle else splits.stage2, args, collate_fn=collate_fn,
                  warm_start_dataset=splits.stage1, accelerator=accelerator)
            model = accelerator.unwrap_model(model)
        model.eval()
        results[method] = evaluate(model)
    return results


@torch.no_grad()
def imputation_metrics(model: CalMRLModel, truth: torch.Tensor, patterns: dict[str, Sequence[bool]]) -> dict:
    """Hide modalities of full-modality test embeddings as stage 2 does (`patterns`: name -> observed flags), impute
    them with the model's imputer and compare with the truth: imputation error (cosine, MSE) of PPCA and of the
    modality-mean baseline, and the anchor shift without and with calibration (mean over the patterns)."""
    if not bool(model.imputer.fitted_modalities.all()):
        return {}
    values: dict[str, list[float]] = {}
    for flags in patterns.values():
        observed = torch.tensor(list(flags), device=truth.device).expand(truth.shape[:2]).clone()
        imputed = model.imputer.impute(truth, observed)
        if model.config.renormalize_imputed:
            imputed = F.normalize(imputed, dim=-1)
        error = imputation_error(truth, imputed, ~observed)
        marginal = F.normalize(model.imputer.mean, dim=-1).expand_as(truth)  # mean imputation
        baseline = imputation_error(truth, marginal, ~observed)
        shift = anchor_shift_report(truth, observed, F.normalize(imputed, dim=-1))
        for key, value in (("imputation_cosine", error["cosine"]), ("imputation_mse", error["mse"]),
                           ("mean_imputation_cosine", baseline["cosine"]), ("mean_imputation_mse", baseline["mse"]),
                           ("anchor_shift_observed_only", shift["observed_only"]),
                           ("anchor_shift_calibrated", shift["calibrated"])):
            values.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


@torch.no_grad()
def paired_cosines(embeddings: torch.Tensor, modalities: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict:
    """Mean cosine of the two embeddings of the same instance, per pair of modalities (full-modality test set):
    negative values mean the two towers ended anti-aligned."""
    result = {}
    for first, second in pairs:
        a, b = embeddings[:, modalities.index(first)], embeddings[:, modalities.index(second)]
        result[f"cos({first},{second})"] = float(F.cosine_similarity(a, b, dim=-1).mean())
    return result


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std over seeds)."""
    summary = {}
    for method in per_seed[0]:
        summary[method] = {}
        for metric in per_seed[0][method]:
            values = [seed_result[method][metric] for seed_result in per_seed if metric in seed_result[method]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][metric] = (statistics.mean(values), spread)
    return summary


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
    fig, axes = plt.subplots(1, 3, figsize=(21, 6))
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
                  recall: Sequence[tuple[str, str]]) -> None:
    """`output` (.md) with the command that made it, its .json and its .png."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(f"Command: `{command}`\n\n{text}\n")
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(summary, output.with_suffix(".png"), title=title, recall=recall)
