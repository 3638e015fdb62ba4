"""Retrieval at scale: 🤗 datasets' FAISS index over an embedding dataset (the one `calmrl embed --output
x.parquet` writes: an `id` column, a `modality_mask` column and one column per modality, None where missing).

    gallery = datasets.Dataset.from_parquet("gallery.parquet")
    index = FaissIndex(gallery, "vision")                      # exact ("Flat"), or e.g. string_factory="HNSW32"
    scores, rows = index.search(model.encode(**queries).fused_embeddings, k=10)
    index.ids_of(rows)                                         # the gallery's ids

Cosine similarity is the inner product of re-normalised rows (`faiss.METRIC_INNER_PRODUCT`), so an exact index
returns `retrieval.EmbeddingIndex`'s top-k. Needs `faiss-cpu` (`pip install calmrl_hf[faiss]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .retrieval import check_finite_rows, check_k


def embedding_dataset(ids: Sequence, embeddings: torch.Tensor, modality_mask: torch.Tensor,
                      modalities: Sequence[str]):
    """The embedding dataset of [N, k, D] `embeddings` and their [N, k] mask: `id`, `modality_mask` and one column
    per modality (a list of D floats, None where the modality is missing)."""
    from datasets import Dataset

    if embeddings.dim() != 3 or modality_mask.shape != embeddings.shape[:2] or len(modalities) != embeddings.shape[1]:
        raise ValueError(f"embeddings [N, k, D] and modality_mask [N, k] over {len(modalities)} modalities expected, "
                         f"got {list(embeddings.shape)} and {list(modality_mask.shape)}.")
    columns = {"id": list(ids), "modality_mask": modality_mask.tolist()}
    for index, name in enumerate(modalities):
        columns[name] = [row if observed else None for row, observed in
                         zip(embeddings[:, index].tolist(), modality_mask[:, index].tolist())]
    return Dataset.from_dict(columns)


def _check_embedding_column(dataset, modality: str) -> None:
    """`modality`'s column holds lists of numbers (embeddings), else an error naming the column and its type."""
    import pyarrow as pa

    column_type = dataset.data.schema.field(modality).type if modality in dataset.data.column_names else None
    if column_type is None:
        return
    listed = pa.types.is_list(column_type) or pa.types.is_large_list(column_type) \
        or pa.types.is_fixed_size_list(column_type)
    value_type = column_type.value_type if listed else None
    if not listed or not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise ValueError(f"The column {modality!r} is not an embedding column: it holds {column_type} (feature "
                         f"{dataset.features[modality]}), not lists of floats. Index a modality column of an "
                         f"embedding dataset (`embedding_dataset`, `calmrl embed --output x.parquet`).")


def _vectors(column, modality: str, rows: np.ndarray) -> np.ndarray:
    """The [N, D] float32 array of an arrow list column, refusing ragged rows and NaN / inf (dataset rows named)."""
    import pyarrow.compute as pc

    lengths = np.asarray(pc.list_value_length(column), dtype=np.int64)
    if len(lengths) and (lengths != lengths[0]).any():
        first = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(f"The column {modality!r} is ragged: dataset row {int(rows[first])} has {lengths[first]} "
                         f"values, row {int(rows[0])} has {lengths[0]}; every embedding must have the same size.")
    if len(lengths) and lengths[0] == 0:
        raise ValueError(f"The column {modality!r} holds empty embeddings (dataset row {int(rows[0])}).")
    if column.flatten().null_count:
        raise ValueError(f"The column {modality!r} has None inside an embedding (rows among "
                         f"{[int(r) for r in rows[:8]]}); an embedding is either whole or missing.")
    vectors = np.ascontiguousarray(np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1))
    check_finite_rows(vectors, f"The column {modality!r} (gallery)", [f"dataset row {int(r)}" for r in rows])
    return vectors


class FaissIndex:
    """A FAISS index (🤗 datasets' `add_faiss_index_from_external_arrays`) over the rows of an embedding dataset
    that observe `modality`. `string_factory` is FAISS's index description ("Flat": exact; "HNSW32", "IVF256,Flat":
    approximate: `train_size` rows train the IVF quantiser, `nprobe` of its lists are searched)."""

    def __init__(self, dataset, modality: str, *, string_factory: str = "Flat", train_size: int | None = None,
                 nprobe: int | None = None):
        import faiss

        if modality not in dataset.column_names:
            raise ValueError(f"The dataset has no column {modality!r}; its columns are {dataset.column_names}.")
        _check_embedding_column(dataset, modality)
        observed = dataset.with_format("arrow")[:][modality].is_valid()  # None where the modality is missing
        self.rows = np.flatnonzero(np.asarray(observed))  # gallery position -> dataset row
        if not len(self.rows):
            raise ValueError(f"No row of the dataset observes {modality!r}.")
        self.gallery = dataset.select(self.rows)
        column = self.gallery.with_format("arrow")[:][modality].combine_chunks()  # lists of D floats, row order
        vectors = _vectors(column, modality, self.rows)
        faiss.normalize_L2(vectors)  # cosine = inner product of unit rows
        self.modality, self.dim = modality, vectors.shape[1]
        self.ids = self.gallery.select_columns(["id"]) if "id" in self.gallery.column_names else None
        self.gallery.add_faiss_index_from_external_arrays(vectors, modality, string_factory=string_factory,
                                                          metric_type=faiss.METRIC_INNER_PRODUCT, train_size=train_size)
        if nprobe is not None:
            faiss.extract_index_ivf(self.gallery.get_index(modality).faiss_index).nprobe = nprobe

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [Q, k], dataset rows [Q, k]) by cosine similarity."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(queries.shape)}.")
        check_k(k)
        check_finite_rows(queries.detach().cpu(), "queries")
        normalised = F.normalize(queries.detach().float().cpu(), dim=-1).numpy()
        result = self.gallery.search_batch(self.modality, normalised, k=min(k, len(self)))
        scores, positions = np.asarray(result.total_scores), np.asarray(result.total_indices)
        return torch.from_numpy(scores), torch.from_numpy(self.rows[positions])

    def ids_of(self, rows: torch.Tensor) -> list[list]:
        """The `id` of each dataset row in `rows` [Q, k] (the rows themselves for a dataset without ids)."""
        if self.ids is None:
            return rows.tolist()
        positions = np.searchsorted(self.rows, rows.numpy())  # dataset row -> gallery position (rows are sorted)
        return [[self.ids[int(p)]["id"] for p in row] for row in positions]


__all__ = ["FaissIndex", "embedding_dataset"]
