"""Test-set metrics the benchmarks share: Recall@1 by family of directions, imputation error and anchor shift of
a model's own imputer against held-out true embeddings, and matched-pair cosines."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from calmrl_hf import CalMRLModel
from calmrl_hf.evaluation.metrics import anchor_shift_report, imputation_error, recall_at_k
from calmrl_hf.evaluation.reranking import reranked_recall


# The matched pairs whose cosines the benchmarks report, and the table columns of those cosines.
MATCHED_PAIRS = (("vision", "text"), ("audio", "text"), ("vision", "audio"))
COSINE_COLUMNS = [f"cos({first},{second})" for first, second in MATCHED_PAIRS]


def direction_families(recall: dict[str, float], modalities: Sequence[str], *, suffix: str = "R@1",
                       observed_pairs: Sequence[tuple[str, str]] = (("vision", "text"), ("audio", "text")),
                       never_paired: tuple[str, str] = ("vision", "audio"),
                       never_observed: Sequence[str] = ("subtitle",)) -> dict[str, float]:
    """Recall by family of directions (`recall`: keys like `"text->vision/R@1"`): the pairs stage 2 observes
    (what the paper's table measures), the pair it never observes together, the modalities it never observes,
    and the mean over every direction. Keys: `observed_pairs_{suffix}`, `vision<->audio_{suffix}`,
    `subtitle_{suffix}` (only where such a modality exists) and `mean_{suffix}`."""

    def mean_of(directions):
        values = [recall[f"{a}->{b}/{suffix}"] for a, b in directions]
        return sum(values) / len(values)

    both_ways = lambda pairs: [d for a, b in pairs for d in ((a, b), (b, a))]  # noqa: E731
    every = [(a, b) for a in modalities for b in modalities if a != b]
    result = {f"mean_{suffix}": mean_of(every),
              f"observed_pairs_{suffix}": mean_of(both_ways(observed_pairs)),
              f"{never_paired[0]}<->{never_paired[1]}_{suffix}": mean_of(both_ways([never_paired]))}
    unseen = [m for m in never_observed if m in modalities]
    if unseen:
        result[f"{'+'.join(unseen)}_{suffix}"] = mean_of([d for d in every if set(d) & set(unseen)])
    return result


def stage2_views(model: CalMRLModel, truth: torch.Tensor, patterns: dict[str, Sequence[bool]]):
    """Per pattern (name -> observed flags), the observed mask [N, k] that hides modalities of the full-modality
    `truth` [N, k, D] as stage 2 does, and the model's PPCA imputation of them (raw posterior means). Nothing
    where the imputer has not been fitted on every modality."""
    if not bool(model.imputer.fitted_modalities.all()):
        return
    for flags in patterns.values():
        observed = torch.tensor(list(flags), device=truth.device).expand(truth.shape[:2]).clone()
        yield observed, model.imputer.impute(truth, observed)


@torch.no_grad()
def imputation_metrics(model: CalMRLModel, truth: torch.Tensor, patterns: dict[str, Sequence[bool]]) -> dict:
    """Hide modalities of full-modality test embeddings as stage 2 does (`patterns`: name -> observed flags), impute
    them with the model's imputer and compare with the truth: imputation error (cosine, MSE) of PPCA and of the
    modality-mean baseline, and the anchor shift without and with calibration (mean over the patterns)."""
    values: dict[str, list[float]] = {}
    for observed, imputed in stage2_views(model, truth, patterns):
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
def agreement_metrics(model: CalMRLModel, truth: torch.Tensor, patterns: dict[str, Sequence[bool]],
                      pair: tuple[str, str] = ("vision", "audio")) -> dict:
    """Does an observed embedding agree with its own imputation or with the real missing one? On full-modality test
    embeddings `truth` seen as stage 2 sees them (`patterns`), for each pattern that observes one modality of
    `pair` and hides the other: the mean cosine between the observed embedding and the model's imputation of the
    hidden one from the row (`own_imputation_cosine`, renormalised as the objective sees it), and between the
    observed embedding and the true hidden one (`true_missing_cosine`). Towers that chase their own imputations
    raise the first and lower the second."""
    first, second = (model.config.modality_index(name) for name in pair)
    own, true = [], []
    for observed, imputed in stage2_views(model, truth, patterns):
        for seen, hidden in ((first, second), (second, first)):
            if bool(observed[0, seen]) and not bool(observed[0, hidden]):
                own.append(float(F.cosine_similarity(truth[:, seen], imputed[:, hidden], dim=-1).mean()))
                true.append(float(F.cosine_similarity(truth[:, seen], truth[:, hidden], dim=-1).mean()))
    if not own:
        return {}
    return {"own_imputation_cosine": sum(own) / len(own), "true_missing_cosine": sum(true) / len(true)}


@torch.no_grad()
def paired_cosines(embeddings: torch.Tensor, modalities: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict:
    """Mean cosine of the two embeddings of the same instance, per pair of modalities (full-modality test set):
    negative values mean the two towers ended anti-aligned."""
    result = {}
    for first, second in pairs:
        a, b = embeddings[:, modalities.index(first)], embeddings[:, modalities.index(second)]
        result[f"cos({first},{second})"] = float(F.cosine_similarity(a, b, dim=-1).mean())
    return result


@torch.no_grad()
def volume_discrimination(model: CalMRLModel, truth: torch.Tensor, patterns: dict[str, Sequence[bool]],
                          anchor: int) -> dict:
    """How well GRAM's volume tells an instance's own columns from another's, on full-modality test embeddings
    `truth` seen the way stage 2 sees them (`patterns`): the fraction of anchors z_i^anchor whose smallest volume
    V_ij = sqrt det Gram(z_i^anchor, z_j^m...) is their own column (in-batch top-1, the quantity GRAM's softmax
    contrasts), and the mean negative / mean positive volume, for three columns: the observed modalities only,
    observed + PPCA-imputed (the model's imputer), and every true modality. Mean over the patterns."""
    from calmrl_hf.alignment import gram_volume

    values: dict[str, list[float]] = {}
    for observed, imputed in stage2_views(model, truth, patterns):
        calibrated = torch.where(observed.unsqueeze(-1), truth, F.normalize(imputed, dim=-1))
        for name, columns, mask in (("observed", truth, observed), ("imputed", calibrated, None),
                                    ("full", truth, None)):
            volume = gram_volume(columns, mask, anchor=anchor)
            own = volume.diagonal()
            others = (volume.sum() - own.sum()) / (volume.numel() - own.numel())
            top1 = (volume.argmin(dim=1) == torch.arange(len(volume), device=volume.device)).float().mean()
            values.setdefault(f"gram_top1_{name}", []).append(100.0 * float(top1))
            values.setdefault(f"gram_volume_ratio_{name}", []).append(float(others / own.mean()))
    return {key: sum(v) / len(v) for key, v in values.items()}


# Re-ranking with the matching head: the top 10 (`_reranked`) and the top 50 (`_reranked50`, VAST's / PMRL's K)
RERANK_TOP_K = {"_reranked": 10, "_reranked50": 50}
RERANK_GALLERIES = ("vision", "audio")


def rerank_columns(recall: str = "R") -> list[str]:
    """The re-ranking table's columns: text -> vision / audio Recall@1 and @5, by embedding and re-ranked."""
    suffixes = ["", *RERANK_TOP_K, "_head_only"]
    return [f"text->{g}_{recall}@{k}{s}" for g in RERANK_GALLERIES for k in (1, 5) for s in suffixes]


@torch.no_grad()
def rerank_table(model: CalMRLModel, embeddings: torch.Tensor, tokens: dict, modalities: Sequence[str],
                 labels: torch.Tensor | None = None) -> dict[str, float]:
    """The re-ranking table's values (`rerank_columns`): text -> vision and text -> audio Recall@1 and @5 of the
    embedding ranking and with each query's top K re-ranked by the matching head (`reranked_recall` at the head's
    default score, and the head alone: `_head_only`, top 10). `embeddings` [N, k, D] of N test instances with every
    modality, `tokens` {modality: (states, mask)} of the same rows; with `labels`, class-level recall
    (`class_R@K`)."""
    level = "R" if labels is None else "class_R"
    every = torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)  # every modality observed
    reranked = {suffix: reranked_recall(model, embeddings, every, tokens, top_k=top_k, galleries=RERANK_GALLERIES,
                                        ks=(1, 5), labels=labels)
                for suffix, top_k in RERANK_TOP_K.items()}
    reranked["_head_only"] = reranked_recall(model, embeddings, every, tokens, top_k=RERANK_TOP_K["_reranked"],
                                             galleries=RERANK_GALLERIES, ks=(1, 5), labels=labels,
                                             similarity_weight=0.0)
    text = list(modalities).index("text")
    result = {}
    for gallery in RERANK_GALLERIES:
        similarity = embeddings[:, text] @ embeddings[:, list(modalities).index(gallery)].T
        for k, value in recall_at_k(similarity, (1, 5), labels=labels).items():
            result[f"text->{gallery}_{level}@{k}"] = value
        for suffix, recall in reranked.items():
            for k in (1, 5):
                result[f"text->{gallery}_{level}@{k}{suffix}"] = recall[f"text->{gallery}/{level}@{k}"]
    return result
