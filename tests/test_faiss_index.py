"""FAISS retrieval over an embedding dataset (as `calmrl embed` writes it): the exact index returns the
brute-force top-k, ids included, also after a parquet round trip; approximate indices take FAISS's factory."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("faiss", reason="retrieval at scale needs faiss-cpu")

from datasets import Dataset  # noqa: E402

from calmrl_hf.evaluation.faiss_index import FaissIndex, embedding_dataset  # noqa: E402
from calmrl_hf.evaluation.retrieval import EmbeddingIndex  # noqa: E402

MODALITIES = ["vision", "audio", "text"]


def gallery(n=400, dim=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(n, 3, dim, generator=generator), dim=-1)
    mask = torch.rand(n, 3, generator=generator) > 0.3
    mask[:, 2] = True
    ids = [f"clip{i:04d}" for i in range(n)]
    return ids, embeddings, mask


def test_exact_index_equals_brute_force_top_k(tmp_path):
    ids, embeddings, mask = gallery()
    path = tmp_path / "gallery.parquet"
    embedding_dataset(ids, embeddings, mask, MODALITIES).to_parquet(str(path))
    dataset = Dataset.from_parquet(str(path))
    index = FaissIndex(dataset, "vision")
    rows = mask[:, 0].nonzero().flatten()
    assert len(index) == len(rows)
    queries = torch.randn(16, 24, generator=torch.Generator().manual_seed(1)) * 3.0  # not unit norm
    scores, found = index.search(queries, k=7)
    reference = EmbeddingIndex(embeddings[rows, 0], ids=[ids[i] for i in rows.tolist()])
    expected_scores, expected_positions = reference.search(queries, k=7)
    assert torch.equal(found, rows[expected_positions])  # dataset rows of the same neighbours, same order
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    assert index.ids_of(found) == reference.ids_of(expected_positions)


def test_approximate_index_and_bad_inputs():
    ids, embeddings, mask = gallery(n=600)
    dataset = embedding_dataset(ids, embeddings, mask, MODALITIES)
    approximate = FaissIndex(dataset, "text", string_factory="HNSW32")
    scores, found = approximate.search(embeddings[:20, 2], k=1)  # the gallery's own rows: each finds itself
    assert found[:, 0].tolist() == list(range(20))
    torch.testing.assert_close(scores[:, 0], torch.ones(20), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"queries must be \[Q, 24\]"):
        approximate.search(torch.randn(2, 5))
    with pytest.raises(ValueError, match="no column 'smell'"):
        FaissIndex(dataset, "smell")
    with pytest.raises(ValueError, match=r"modality_mask \[N, k\]"):
        embedding_dataset(ids, embeddings, mask[:, :2], MODALITIES)
