"""Controlled benchmark: the paper's protocol on data whose full-modality truth is known.

    python -m benchmarks.synthetic.run            # default size, 3 seeds
    python -m benchmarks.synthetic.run --quick    # CI size

Instances share a latent beta ~ N(0, I_r); each of four modalities is a fixed random nonlinear map of it (a
2-layer tanh network, different per modality) plus its own noise. Encoders are small MLPs
(`FeatureEncoderModel`) trained through the library's training loop. Stage 1: a small full-modality split.
Stage 2: a vision-text split and an audio-text split. Test: held-out instances with all four modalities, so
instance-level retrieval is meaningful and the true full-modality anchor is known.

Methods (stage 2 differs only by config): base (stage 1 only), anchor InfoNCE (ImageBind style, text anchor),
GRAM (observed only), PMRL (observed only), CalMRL with PPCA / mean / zero imputation, oracle (stage 2 with all
modalities present). Reported per method, mean ± std over seeds: instance-level Recall@1 averaged over the 12
directions and vision<->audio (never paired in stage 2), imputation error of the model's imputer on the test
set, and the anchor shift without and with calibration.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset

from calmrl_hf import CalMRLConfig, CalMRLModel, FeatureEncoderConfig
from calmrl_hf.evaluation import anchor_shift_report, imputation_error, retrieval_metrics
from calmrl_hf.training import TrainingArguments, build_accelerator, train


MODALITIES = ("vision", "audio", "text", "subtitle")
VISION_TEXT = (True, False, True, False)
AUDIO_TEXT = (False, True, True, False)
FULL = (True, True, True, True)

METHODS = {
    # name: (stage-2 config overrides or None for "no stage 2", stage-2 data is full-modality)
    "base (stage 1 only)": (None, False),
    "anchor InfoNCE (text)": ({"alignment_objective": "anchor_infonce", "imputer_method": "none"}, False),
    "GRAM (observed only)": ({"alignment_objective": "gram", "imputer_method": "none"}, False),
    "PMRL (observed only)": ({"alignment_objective": "pmrl", "imputer_method": "none"}, False),
    "CalMRL (PPCA)": ({"alignment_objective": "pmrl", "imputer_method": "ppca"}, False),
    "CalMRL (mean imputation)": ({"alignment_objective": "pmrl", "imputer_method": "mean"}, False),
    "CalMRL (zero imputation)": ({"alignment_objective": "pmrl", "imputer_method": "zero"}, False),
    "oracle (stage 2, all modalities)": ({"alignment_objective": "pmrl", "imputer_method": "none"}, True),
    "CalMRL (PPCA) + matching head": ({"alignment_objective": "pmrl", "imputer_method": "ppca",
                                        "fusion_num_layers": 1, "fusion_num_attention_heads": 4}, False),
}
RERANK_K = 10
# architecture options: they must be set when the model is built, not after stage 1
_ARCHITECTURE = ("fusion_num_layers", "fusion_num_attention_heads")


@dataclass
class Sizes:
    stage1: int = 400
    stage2: int = 2000  # per partial split
    test: int = 500
    feature_dim: int = 32
    latent_dim: int = 8
    stage1_steps: int = 300
    stage2_steps: int = 300
    batch_size: int = 64


QUICK = Sizes(stage1=128, stage2=256, test=128, stage1_steps=40, stage2_steps=40, batch_size=32)


class World:
    """The fixed generative process: latent -> per-modality random tanh networks -> features + noise."""

    def __init__(self, sizes: Sizes, seed: int):
        generator = torch.Generator().manual_seed(1000 + seed)
        r, f, hidden = sizes.latent_dim, sizes.feature_dim, 64
        self.maps = [(torch.randn(r, hidden, generator=generator) / r**0.5,
                      torch.randn(hidden, f, generator=generator) / hidden**0.5) for _ in MODALITIES]
        self.noise = [0.1, 0.2, 0.15, 0.3]
        self.latent_dim, self.generator = r, generator

    def sample(self, n: int, pattern: tuple[bool, ...]) -> Dataset:
        latent = torch.randn(n, self.latent_dim, generator=self.generator)
        columns = {}
        for (first, second), noise, name, observed in zip(self.maps, self.noise, MODALITIES, pattern):
            features = torch.tanh(latent @ first) @ second
            features = features + noise * torch.randn(features.shape, generator=self.generator)
            columns[name] = [row.tolist() if observed else None for row in features]
        columns["modality_mask"] = [list(pattern)] * n
        return Dataset.from_dict(columns)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    mask = torch.tensor([[e[name] is not None for name in MODALITIES] for e in examples])
    batch = {"modality_mask": mask}
    for name in MODALITIES:
        rows = [e[name] for e in examples if e[name] is not None]
        if rows:
            batch[f"{name}_input_features"] = torch.tensor(rows)
    return batch


def build_model(sizes: Sizes, seed: int, **architecture) -> CalMRLModel:
    torch.manual_seed(seed)
    tower = FeatureEncoderConfig(input_dim=sizes.feature_dim, hidden_size=64, num_hidden_layers=2)
    config = CalMRLConfig(modalities=list(MODALITIES), encoder_configs={m: tower for m in MODALITIES},
                          shared_encoders={}, projection_dim=32, imputer_latent_dim=sizes.latent_dim,
                          alignment_objective="pairwise_infonce", **architecture)
    return CalMRLModel(config)


@torch.no_grad()
def reranked_recall(model: CalMRLModel, test: Dataset, embeddings: torch.Tensor) -> dict[str, float]:
    """text -> vision and text -> audio Recall@1 with each query's top-K re-ranked by the matching head."""
    from calmrl_hf.evaluation import recall_at_k, rerank_top_k

    features = {name: torch.tensor(test[name]) for name in MODALITIES}
    text = MODALITIES.index("text")
    result = {}
    for gallery in ("vision", "audio"):
        similarity = embeddings[:, text] @ embeddings[:, MODALITIES.index(gallery)].T

        def score(queries, candidates, gallery=gallery):
            return model.matching_scores({"input_features": features["text"][queries]},
                                         {gallery: {"input_features": features[gallery][candidates]}})

        reranked = rerank_top_k(similarity, score, RERANK_K)
        for k, value in recall_at_k(similarity, (1, 5)).items():
            result[f"text->{gallery}_R@{k}"] = value
        for k, value in recall_at_k(reranked, (1, 5)).items():
            result[f"text->{gallery}_R@{k}_reranked"] = value
    return result


@torch.no_grad()
def fused_query_recall(model: CalMRLModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Retrieve vision items with text + subtitle queries (vision and audio missing from the query): each single
    observed modality alone vs the fused query (observed + imputed, the leading singular vector)."""
    from calmrl_hf.retrieval import EmbeddingIndex

    gallery = model.encode(**{k: v for k, v in batch.items() if k.startswith("vision_")})
    index = EmbeddingIndex(gallery.embeddings[:, MODALITIES.index("vision")])
    query_inputs = {k: v for k, v in batch.items() if k.startswith(("text_", "subtitle_"))}
    query = model.encode(**query_inputs)
    targets = torch.arange(len(index))
    recall = {}
    for name, vectors in (("text", query.embeddings[:, MODALITIES.index("text")]),
                          ("subtitle", query.embeddings[:, MODALITIES.index("subtitle")]),
                          ("fused", query.fused_embeddings)):
        _, top = index.search(vectors, k=1)
        recall[f"query_{name}->vision_R@1"] = 100.0 * float((top[:, 0] == targets).float().mean())
    return recall


@torch.no_grad()
def evaluate(model: CalMRLModel, test: Dataset) -> dict[str, float]:
    model.eval()
    batch = collate(list(test))
    truth, mask = model.embed_modalities(**batch)
    metrics = retrieval_metrics(truth, mask, list(MODALITIES))
    result = {"mean_R@1": metrics["mean_R@1"],
              "vision<->audio_R@1": (metrics["vision->audio/R@1"] + metrics["audio->vision/R@1"]) / 2}
    if model.fusion is not None:
        result.update(reranked_recall(model, test, truth))
    result.update(fused_query_recall(model, batch))
    # hide audio+subtitle (video-text instances) and vision+subtitle (audio-text), as stage 2 does
    errors, mean_errors, shifts_observed, shifts_calibrated = [], [], [], []
    for pattern in (VISION_TEXT, AUDIO_TEXT):
        observed = torch.tensor(pattern).expand_as(mask).clone()
        if model.imputer.fitted_modalities.all():
            imputed = F.normalize(model.imputer.impute(truth, observed), dim=-1)
            errors.append(imputation_error(truth, imputed, ~observed)["cosine"])
            marginal = F.normalize(model.imputer.mean, dim=-1).expand_as(truth)  # mean imputation
            mean_errors.append(imputation_error(truth, marginal, ~observed)["cosine"])
            shift = anchor_shift_report(truth, observed, imputed)
            shifts_calibrated.append(shift["calibrated"])
            shifts_observed.append(shift["observed_only"])
    if errors:
        result["imputation_cosine"] = sum(errors) / len(errors)
        result["mean_imputation_cosine"] = sum(mean_errors) / len(mean_errors)
        result["anchor_shift_observed_only"] = sum(shifts_observed) / len(shifts_observed)
        result["anchor_shift_calibrated"] = sum(shifts_calibrated) / len(shifts_calibrated)
    return result


def run_seed(sizes: Sizes, seed: int, methods: list[str], workdir: Path) -> dict[str, dict[str, float]]:
    world = World(sizes, seed)
    stage1 = world.sample(sizes.stage1, FULL)
    partial = [world.sample(sizes.stage2, VISION_TEXT), world.sample(sizes.stage2, AUDIO_TEXT)]
    from datasets import concatenate_datasets

    stage2_partial = concatenate_datasets(partial)
    stage2_full = world.sample(2 * sizes.stage2, FULL)
    test = world.sample(sizes.test, FULL)

    def args(name: str, steps: int, lr: float, **extra) -> TrainingArguments:
        return TrainingArguments(output_dir=str(workdir / f"seed{seed}" / name), max_steps=steps, seed=seed,
                                 per_device_train_batch_size=sizes.batch_size, learning_rate=lr, warmup_steps=5,
                                 logging_steps=10 ** 6, **extra)

    model = build_model(sizes, seed)
    accelerator = build_accelerator(args("stage1", sizes.stage1_steps, 1e-3))
    train(model, stage1, args("stage1", sizes.stage1_steps, 1e-3), collate_fn=collate, accelerator=accelerator)
    stage1_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for method in methods:
        overrides, oracle = METHODS[method]
        architecture = {k: v for k, v in (overrides or {}).items() if k in _ARCHITECTURE}
        model = build_model(sizes, seed, **architecture)
        missing, unexpected = model.load_state_dict(stage1_state, strict=False)
        assert not unexpected and all(key.startswith("fusion.") for key in missing), (missing, unexpected)
        if overrides is not None:
            for key, value in overrides.items():
                setattr(model.config, key, value)
            train(model, stage2_full if oracle else stage2_partial,
                  args(method.split(" ")[0], sizes.stage2_steps, 3e-4, imputer_warm_start=True),
                  collate_fn=collate, warm_start_dataset=stage1, accelerator=accelerator)
        results[method] = evaluate(model, test)
    return results


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    summary = {}
    for method in per_seed[0]:
        summary[method] = {}
        for metric in per_seed[0][method]:
            values = [seed_result[method][metric] for seed_result in per_seed if metric in seed_result[method]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][metric] = (statistics.mean(values), spread)
    return summary


def markdown(summary) -> str:
    columns = ["mean_R@1", "vision<->audio_R@1", "imputation_cosine", "mean_imputation_cosine",
               "anchor_shift_observed_only", "anchor_shift_calibrated"]
    rerank = [f"text->{g}_R@{k}{suffix}" for g in ("vision", "audio") for k in (1, 5) for suffix in ("", "_reranked")]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for method, metrics in summary.items():
        cells = [f"{metrics[c][0]:.3f} ± {metrics[c][1]:.3f}" if c in metrics else "–" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    queries = ["query_text->vision_R@1", "query_subtitle->vision_R@1", "query_fused->vision_R@1"]
    lines += ["", "Text + subtitle queries retrieving vision (the query's vision and audio missing): each observed "
              "modality alone vs the fused query (observed + imputed, leading singular vector):", "",
              "| method | " + " | ".join(queries) + " |", "|---|" + "---:|" * len(queries)]
    for method, metrics in summary.items():
        lines.append(f"| {method} | " + " | ".join(f"{metrics[c][0]:.3f} ± {metrics[c][1]:.3f}" for c in queries)
                     + " |")
    with_head = {method: metrics for method, metrics in summary.items() if rerank[0] in metrics}
    if with_head:
        lines += ["", f"Re-ranking the top {RERANK_K} candidates with the matching head:", "",
                  "| method | " + " | ".join(rerank) + " |", "|---|" + "---:|" * len(rerank)]
        for method, metrics in with_head.items():
            lines.append(f"| {method} | " + " | ".join(f"{metrics[c][0]:.3f} ± {metrics[c][1]:.3f}" for c in rerank)
                         + " |")
    return "\n".join(lines)


def plot(summary, path: Path) -> None:
    """Recall@1 by method, and the anchor shift of each model without and with calibration (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    labels = [m.replace(" (", "\n(") for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    positions = range(len(methods))
    for offset, (metric, name) in zip((-0.2, 0.2), (("mean_R@1", "mean R@1 (12 directions)"),
                                                    ("vision<->audio_R@1", "vision<->audio R@1"))):
        axes[0].bar([p + offset for p in positions], [summary[m][metric][0] for m in methods], width=0.4,
                    yerr=[summary[m][metric][1] for m in methods], capsize=3, label=name)
    axes[0].set_ylabel("Recall@1 (%)")
    axes[0].set_title("Controlled benchmark: test retrieval after stage 2")
    for offset, (metric, name) in zip((-0.2, 0.2), (("anchor_shift_observed_only", "observed only"),
                                                    ("anchor_shift_calibrated", "calibrated (PPCA imputation)"))):
        axes[1].bar([p + offset for p in positions], [summary[m].get(metric, (0, 0))[0] for m in methods],
                    width=0.4, yerr=[summary[m].get(metric, (0, 0))[1] for m in methods], capsize=3, label=name)
    axes[1].set_ylabel("||u1 - u1'|| (mean over incomplete instances)")
    axes[1].set_title("Anchor shift vs the true full-modality anchor")
    for axis in axes:
        axis.set_xticks(list(positions))
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/synthetic/results.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else Sizes()
    with tempfile.TemporaryDirectory() as workdir:
        per_seed = [run_seed(sizes, seed, list(METHODS), Path(workdir)) for seed in range(args.seeds)]
    summary = summarise(per_seed)
    table = markdown(summary)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"Command: `python -m benchmarks.synthetic.run{' --quick' if args.quick else ''} "
                               f"--seeds {args.seeds}`\n\n{table}\n")
        args.output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        plot(summary, args.output.with_suffix(".png"))
    return summary


if __name__ == "__main__":
    main()
