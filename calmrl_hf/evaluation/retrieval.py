"""Retrieval over a gallery of embeddings, with queries made of any subset of modalities.

    index = EmbeddingIndex(gallery.embeddings[:, vision])          # e.g. videos, with or without audio
    enc = model.encode(**processor(text=["a dog barks"], audio=[wave]))
    scores, indices = index.search(enc.fused_embeddings, k=10)      # fused: observed + imputed, one vector
    scores, indices = index.search(enc.embeddings[:, text], k=10)   # or a single observed modality
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def check_k(k) -> None:
    """`k` (the number of results per query) is a positive int."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (results per query) must be a positive int, got {k!r}.")


def check_finite_rows(vectors, what: str, rows: Sequence | None = None) -> None:
    """Refuse NaN / inf in [N, D] `vectors` (a tensor or an array), naming the first offending rows (`rows` maps
    positions to the names shown, e.g. dataset rows)."""
    vectors = torch.as_tensor(vectors)
    if not vectors.is_floating_point():
        return
    bad = (~torch.isfinite(vectors)).reshape(vectors.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        named = [rows[i] if rows is not None else i for i in bad[:8]]
        raise ValueError(f"{what}: {len(bad)} of {vectors.shape[0]} rows hold NaN or inf (rows {named}"
                         f"{' ...' if len(bad) > 8 else ''}); a non-finite vector has no cosine similarity.")


class EmbeddingIndex:
    """An exact cosine-similarity index over [N, D] embeddings (rows re-normalised), with optional ids."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence | None = None):
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be [N, D], got {list(embeddings.shape)}.")
        if ids is not None and len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} ids for {embeddings.shape[0]} embeddings.")
        check_finite_rows(embeddings, "gallery embeddings")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.ids = list(ids) if ids is not None else None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [Q, k], indices [Q, k]) by cosine similarity; `ids_of(indices)` maps to ids."""
        if queries.dim() != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries must be [Q, {self.embeddings.shape[1]}], got {list(queries.shape)}.")
        check_k(k)
        check_finite_rows(queries, "queries")
        similarity = F.normalize(queries.float(), dim=-1).to(self.embeddings.device) @ self.embeddings.T
        return similarity.topk(min(k, len(self)), dim=1)

    def ids_of(self, indices: torch.Tensor) -> list[list]:
        """The id of each gallery item in `indices` [Q, k] (the indices themselves for a gallery without ids)."""
        if self.ids is None:
            return indices.tolist()
        return [[self.ids[i] for i in row] for row in indices.tolist()]


__all__ = ["EmbeddingIndex", "check_finite_rows", "check_k"]
