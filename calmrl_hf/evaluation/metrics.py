"""Retrieval evaluation in every direction between every pair of modalities.

Inputs are what a CalMRL model produces for an evaluation set, gathered from all processes:
embeddings [N, k, D] (unit norm where observed) and modality_mask [N, k]. A query of modality `a`
retrieves among the gallery of modality `b` over the instances that observe both.

- instance level: the positive of query i is instance i (the paper's protocol on MSR-VTT / AudioCaps);
- class level (with `labels`): any gallery item of the query's class is a hit, for data whose
  instances share labels (e.g. spoken / written / drawn numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F

from ..alignment import anchor_shift, calibrated_anchor_shift
from ..validation import check_embeddings


def _check(embeddings: torch.Tensor, modality_mask: torch.Tensor, modalities: Sequence[str]) -> None:
    check_embeddings(embeddings, modality_mask, rows="N", min_rows=0, every_row_observed=False, mask_optional=False)
    if len(modalities) != embeddings.shape[1]:
        raise ValueError(f"{len(modalities)} modality names for {embeddings.shape[1]} modalities.")


def recall_at_k(
    similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10), labels: torch.Tensor | None = None
) -> dict[int, float]:
    """Recall@K (in percent) of a [Q, G] similarity matrix whose positive of query i is gallery item i.

    With `labels` [Q] (query i and gallery item i share label i's class), a hit is any top-K item of the
    query's class. Ties are broken against the query (a positive tied with a negative does not count).
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [N, N] (paired query/gallery), got {list(similarity.shape)}.")
    num = similarity.shape[0]
    if labels is None:
        positive = similarity.diagonal().unsqueeze(1)  # [Q, 1]
        rank = (similarity >= positive).sum(dim=1) - 1  # number of others at least as similar
        return {k: 100.0 * float((rank < k).float().mean()) for k in ks}
    same_class = labels.unsqueeze(1) == labels.unsqueeze(0)  # [Q, G]
    order = similarity.argsort(dim=1, descending=True)
    hits = same_class.gather(1, order)  # [Q, G] hit at each rank
    first_hit = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), torch.full((num,), num, device=hits.device))
    return {k: 100.0 * float((first_hit < k).float().mean()) for k in ks}


def retrieval_metrics(
    embeddings: torch.Tensor,
    modality_mask: torch.Tensor,
    modalities: Sequence[str],
    *,
    ks: Sequence[int] = (1, 5, 10),
    labels: torch.Tensor | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Recall@K for every ordered pair of modalities (or the given `pairs`).

    Keys look like `"text->vision/R@1"` (instance level) and `"text->vision/class_R@1"` (class level, with
    `labels` [N]). A pair with fewer than two instances observing both is left out. `mean_R@1` averages the
    instance-level R@1 over the directions reported, the paper's headline number.
    """
    _check(embeddings, modality_mask, modalities)
    embeddings = embeddings.float()
    if pairs is None:
        pairs = [(a, b) for a in modalities for b in modalities if a != b]
    results: dict[str, float] = {}
    for query, gallery in pairs:
        qi, gi = list(modalities).index(query), list(modalities).index(gallery)
        both = modality_mask[:, qi] & modality_mask[:, gi]
        if int(both.sum()) < 2:
            continue
        similarity = embeddings[both, qi] @ embeddings[both, gi].T
        for k, value in recall_at_k(similarity, ks).items():
            results[f"{query}->{gallery}/R@{k}"] = value
        if labels is not None:
            for k, value in recall_at_k(similarity, ks, labels=labels[both]).items():
                results[f"{query}->{gallery}/class_R@{k}"] = value
    r1 = [v for key, v in results.items() if key.endswith("/R@1")]
    if r1:
        results["mean_R@1"] = sum(r1) / len(r1)
    return results


def zero_shot_accuracy(
    embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-K accuracy (%) of classifying `embeddings` [N, D] by their nearest class prompt [C, D] (cosine)."""
    if embeddings.dim() != 2 or class_embeddings.dim() != 2 or embeddings.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"embeddings [N, D] and class_embeddings [C, D] must share D; got "
                         f"{list(embeddings.shape)} and {list(class_embeddings.shape)}.")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be [N] = {list(embeddings.shape[:1])}, got {list(labels.shape)}.")
    scores = F.normalize(embeddings.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [N, K]
    hits = top == labels.unsqueeze(1)
    return {f"top{k}": 100.0 * float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def imputation_error(
    true_embeddings: torch.Tensor, imputed_embeddings: torch.Tensor, imputed_mask: torch.Tensor,
    modalities: Sequence[str] | None = None,
) -> dict[str, float]:
    """MSE and cosine similarity between imputed and held-out true embeddings over the `imputed_mask` slots.

    Returns overall `mse` / `cosine` and, with `modalities`, per-modality `mse/{name}` and `cosine/{name}`.
    """
    if true_embeddings.shape != imputed_embeddings.shape or imputed_mask.shape != true_embeddings.shape[:2]:
        raise ValueError(f"true {list(true_embeddings.shape)}, imputed {list(imputed_embeddings.shape)} and mask "
                         f"{list(imputed_mask.shape)} must be [N, k, D], [N, k, D], [N, k].")
    if not bool(imputed_mask.any()):
        raise ValueError("imputed_mask selects no slot.")
    true, imputed = true_embeddings.float(), imputed_embeddings.float()
    squared = ((imputed - true) ** 2).sum(dim=-1)  # [N, k]
    cosine = F.cosine_similarity(imputed, true, dim=-1)  # [N, k]
    result = {"mse": float(squared[imputed_mask].mean()), "cosine": float(cosine[imputed_mask].mean())}
    for index, name in enumerate(modalities or []):
        column = imputed_mask[:, index]
        if bool(column.any()):
            result[f"mse/{name}"] = float(squared[column, index].mean())
            result[f"cosine/{name}"] = float(cosine[column, index].mean())
    return result


def anchor_shift_report(
    true_embeddings: torch.Tensor, observed_mask: torch.Tensor, calibrated_embeddings: torch.Tensor
) -> dict[str, float]:
    """Mean anchor shift of the instances missing something: observed only (||u1 - u1^Omega||) and after
    calibration (||u1 - u1^cal||, the missing columns imputed), both against the true full-modality anchor."""
    incomplete = ~observed_mask.all(dim=1)
    if not bool(incomplete.any()):
        raise ValueError("No instance misses a modality: there is no anchor shift to measure.")
    true, mask, calibrated = true_embeddings[incomplete], observed_mask[incomplete], calibrated_embeddings[incomplete]
    return {"observed_only": float(anchor_shift(true, mask).mean()),
            "calibrated": float(calibrated_anchor_shift(true, calibrated).mean()),
            "instances": int(incomplete.sum())}


class RetrievalRecall(evaluate.Metric):
    """`retrieval_metrics` as a 🤗 evaluate metric: `add_batch(embeddings=..., modality_mask=...[, labels=...])`
    per evaluation batch, `compute()` once (evaluate's own multi-process mode, `num_process` / `process_id`, works
    too; the training loop gathers with accelerate and adds the gathered batches).

    ```python
    >>> metric = RetrievalRecall(modalities=["vision", "audio", "text"], config_name="class")
    >>> metric.add_batch(embeddings=z, modality_mask=mask, labels=labels)  # z [B, k, D], mask [B, k], labels [B]
    >>> metric.compute()["text->vision/class_R@1"]
    ```

    `config_name="instance"` (default) takes no labels; `"class"` adds class-level recall from `labels`.
    """

    def __init__(self, modalities: Sequence[str], ks: Sequence[int] = (1, 5, 10),
                 pairs: Sequence[tuple[str, str]] | None = None, config_name: str = "instance", **kwargs):
        if config_name not in ("instance", "class"):
            raise ValueError(f"config_name must be 'instance' or 'class', got {config_name!r}.")
        self.modalities, self.ks = list(modalities), tuple(ks)
        self.pairs = [tuple(pair) for pair in pairs] if pairs else None
        super().__init__(config_name=config_name, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        features = {"embeddings": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),  # [k, D]
                    "modality_mask": datasets.Sequence(datasets.Value("bool"))}  # [k]
        if self.config_name == "class":
            features["labels"] = datasets.Value("int64")
        return evaluate.MetricInfo(
            description="Recall@K of cross-modal retrieval in every direction between every pair of modalities, "
                        "over the instances observing both (instance level; class level with labels).",
            citation="", inputs_description=self.__doc__, features=datasets.Features(features))

    def _compute(self, embeddings, modality_mask, labels=None) -> dict[str, float]:
        return retrieval_metrics(
            torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), torch.tensor(np.asarray(modality_mask)),
            self.modalities, ks=self.ks, pairs=self.pairs,
            labels=torch.tensor(np.asarray(labels)) if labels is not None else None)


__all__ = ["RetrievalRecall", "anchor_shift_report", "imputation_error", "recall_at_k", "retrieval_metrics",
           "zero_shot_accuracy"]
