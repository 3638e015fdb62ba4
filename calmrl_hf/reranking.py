"""Re-ranking retrieval candidates with the matching head, as VAST / PMRL evaluate (their top 50).

The embedding similarity ranks the whole gallery; each query's top-K candidates are then scored pair by pair by the
fusion encoder, which reads the query caption's tokens and attends to the candidate's tokens. The pairs are scored
in chunks (`batch_size` pairs at a time) on the head's device, so the cached token states can stay on the CPU.
Imports torch only (and same-folder files): this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def rerank_top_k(similarity: torch.Tensor, score_fn: Callable, k: int) -> torch.Tensor:
    """Re-rank each query's top-`k` gallery items by `score_fn` (e.g. a matching head), as VAST does with K = 50.

    `score_fn(query_indices, gallery_indices) -> scores` scores the Q x k candidate pairs (flat index tensors).
    Returns a [Q, G] score matrix whose ranking puts the top-k candidates first, ordered by their scores, and the
    other items after them in their original order; feed it to `recall_at_k`.
    """
    num_queries, gallery = similarity.shape
    k = min(k, gallery)
    top = similarity.topk(k, dim=1).indices  # [Q, k]
    queries = torch.arange(num_queries, device=similarity.device).unsqueeze(1).expand(-1, k)
    scores = score_fn(queries.reshape(-1), top.reshape(-1)).reshape(num_queries, k).to(similarity.dtype)
    # everything outside the top-k goes below every re-ranked candidate, keeping its own order
    reranked = scores.min() - 1.0 - (similarity.max() - similarity)
    return reranked.scatter(1, top, scores)


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


def rerank_with_head(fusion, similarity: torch.Tensor, query_tokens: tuple[torch.Tensor, torch.Tensor],
                     gallery_tokens: dict[str, tuple[torch.Tensor, torch.Tensor]], top_k: int, batch_size: int,
                     similarity_weight: float, logit_scale: torch.Tensor) -> torch.Tensor:
    """[Q, G] scores whose ranking re-orders each query's top-`top_k` by
    score(q, g) = match log-odds(q, g) + similarity_weight * exp(logit_scale) * similarity(q, g)
    (the head alone with weight 0, VAST's re-ranking; the contrastive logit added as a second expert otherwise)."""
    query_states, query_mask = query_tokens
    if query_states.shape[0] != similarity.shape[0]:
        raise ValueError(f"similarity has {similarity.shape[0]} queries but the query tokens hold "
                         f"{query_states.shape[0]} rows.")
    for name, (states, _) in gallery_tokens.items():
        if states.shape[0] != similarity.shape[1]:
            raise ValueError(f"similarity has {similarity.shape[1]} gallery items but the {name!r} tokens hold "
                             f"{states.shape[0]} rows.")
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size and top_k must be >= 1, got {batch_size} and {top_k}.")
    device = fusion.head.weight.device
    contrastive_scale = float(logit_scale.exp()) * similarity_weight

    def score(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, queries.numel(), batch_size):
            q, g = queries[start:start + batch_size], candidates[start:start + batch_size]
            caption = query_states[q.to(query_states.device)].to(device)
            caption_mask = query_mask[q.to(query_mask.device)].to(device)
            tokens = {name: (states[g.to(states.device)].to(device), mask[g.to(mask.device)].to(device))
                      for name, (states, mask) in gallery_tokens.items()}
            scores.append(fusion.match_logits(caption, caption_mask, tokens).to(similarity.device))
        logits = torch.cat(scores) if scores else similarity.new_zeros(0)
        return logits + contrastive_scale * similarity[queries, candidates].float()

    return rerank_top_k(similarity, score, top_k)


__all__ = ["collect_matching_tokens", "pad_tokens", "rerank_top_k", "rerank_with_head"]
