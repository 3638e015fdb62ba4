"""Re-ranking retrieval candidates with the matching head, as VAST / PMRL evaluate (their top 50).

The matching head's scoring (`CalMRLModel.rerank`, `matching_head.rerank_top_k`) is model-side; this file collects
the token states it reads over a dataset (`collect_matching_tokens`) and measures the recall of the re-ranked
retrieval (`reranked_recall`, what `calmrl evaluate --rerank` and the benchmarks' re-ranking tables report).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .metrics import recall_at_k


def pad_tokens(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [n_i, L_i, H] and masks [n_i, L_i] of several batches as one ([sum n_i, max L_i, H], mask)."""
    if not chunks:
        raise ValueError("No token states to pad: no batch held this modality.")
    length = max(states.shape[1] for states, _ in chunks)
    states = torch.cat([nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s, _ in chunks])
    masks = torch.cat([nn.functional.pad(m, (0, length - m.shape[1])) for _, m in chunks])
    return states, masks


@torch.no_grad()
def collect_matching_tokens(model, batches: Iterable[dict], modalities: list[str],
                            device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{modality: (token states [n, L, H], mask [n, L])} of the observed rows of `modalities` over `batches` (the
    collator's dicts: `{modality}_{field}` tensors + `modality_mask`), in row order, kept on `device`; a modality
    no batch holds is left out."""
    parameter = next(model.parameters())
    chunks: dict[str, list] = {name: [] for name in modalities}
    for batch in batches:
        for name in modalities:
            prefix = f"{name}_"
            inputs = {key[len(prefix):]: value.to(parameter.device) for key, value in batch.items()
                      if key.startswith(prefix) and isinstance(value, torch.Tensor)}
            if inputs:
                states, mask = model.get_matching_tokens(name, **inputs)
                chunks[name].append((states.to(device), mask.to(device)))
    return {name: pad_tokens(parts) for name, parts in chunks.items() if parts}  # modalities no row observes: left out


def _observed_rows(tokens: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor):
    """The (states, mask) rows at `positions` (increasing): the tensors themselves when those are all their rows,
    so that a gallery every instance observes is not copied."""
    if positions.numel() == tokens[0].shape[0]:
        return tokens
    return tuple(t[positions.to(t.device)] for t in tokens)


def _check_token_rows(tokens: dict, modality_mask: torch.Tensor, modalities: list[str]) -> None:
    for name, (states, _) in tokens.items():
        if name not in modalities:
            raise ValueError(f"Token states of {name!r}, which is not one of the model's modalities {modalities}.")
        observed = int(modality_mask[:, modalities.index(name)].sum())
        if states.shape[0] != observed:
            raise ValueError(f"The {name!r} token states hold {states.shape[0]} rows but {observed} rows observe "
                             f"{name!r}: give the token states of each modality's observed rows, in row order "
                             f"(collect_matching_tokens).")


@torch.no_grad()
def reranked_recall(model, embeddings: torch.Tensor, modality_mask: torch.Tensor,
                    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]], *, top_k: int,
                    galleries: Sequence[str] | None = None, ks: Sequence[int] = (1, 5, 10),
                    labels: torch.Tensor | None = None, similarity_weight: float = 1.0,
                    batch_size: int = 256) -> dict[str, float]:
    """Recall@K (percent) of caption -> gallery retrieval with each query's top `top_k` candidates re-ranked by the
    matching head (`model.rerank`, `similarity_weight` and `batch_size` as there), over the rows observing both.

    The queries are the head's caption modality (`config.matching_modality`); `galleries` are the modalities
    retrieved (default: every other one `tokens` holds). `embeddings` [N, k, D] and `modality_mask` [N, k] are the
    instances' embeddings (unit norm where observed); `tokens` {modality: (states [n, L, H], mask [n, L])} the
    token states of each modality's observed rows, in row order (`collect_matching_tokens`). Keys as
    `retrieval_metrics` names them: `"text->vision/R@1"` (the query's own item is the hit) and, with `labels` [N],
    `"text->vision/class_R@1"` (any item of its class). A gallery with fewer than two rows observing it and the
    caption is left out.
    """
    modalities = list(model.config.modalities)
    caption = model.config.matching_modality
    _check_token_rows(tokens, modality_mask, modalities)
    if galleries is None:
        galleries = [name for name in modalities if name != caption and name in tokens]
    unknown = [name for name in galleries if name not in modalities or name == caption]
    if unknown:
        raise ValueError(f"galleries must be modalities of the model other than the caption {caption!r} "
                         f"({modalities}), got {unknown}.")
    position = modality_mask.long().cumsum(0) - 1  # instance row -> its row among its modality's observed ones
    c = modalities.index(caption)
    result = {}
    for gallery in galleries:
        g = modalities.index(gallery)
        both = modality_mask[:, c] & modality_mask[:, g]
        if int(both.sum()) < 2:
            continue
        if gallery not in tokens or caption not in tokens:
            raise ValueError(f"Re-ranking {caption}->{gallery} needs the token states of both; tokens hold "
                             f"{sorted(tokens)}.")
        rows = both.nonzero().flatten()
        if bool(both.all()):  # every instance: the embedding columns as they are, not copies
            similarity = embeddings[:, c] @ embeddings[:, g].T
        else:
            similarity = embeddings[rows, c] @ embeddings[rows, g].T
        reranked = model.rerank(similarity, _observed_rows(tokens[caption], position[rows, c]),
                                {gallery: _observed_rows(tokens[gallery], position[rows, g])}, top_k=top_k,
                                batch_size=batch_size, similarity_weight=similarity_weight)
        for k, value in recall_at_k(reranked, ks).items():
            result[f"{caption}->{gallery}/R@{k}"] = value
        if labels is not None:
            for k, value in recall_at_k(reranked, ks, labels=labels[rows]).items():
                result[f"{caption}->{gallery}/class_R@{k}"] = value
    return result


__all__ = ["collect_matching_tokens", "pad_tokens", "reranked_recall"]
