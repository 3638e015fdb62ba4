import pytest
import torch
import torch.nn.functional as F

from calmrl_hf.evaluation.retrieval import EmbeddingIndex


def test_search_returns_the_nearest_items_with_their_ids():
    gallery = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    index = EmbeddingIndex(gallery * 3.0, ids=[f"clip{i}" for i in range(20)])  # norms do not matter
    scores, indices = index.search(gallery[[4, 7]] + 0.01, k=3)
    assert indices[:, 0].tolist() == [4, 7]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    torch.testing.assert_close(scores, (F.normalize(gallery[[4, 7]] + 0.01, dim=-1) @ gallery.T).topk(3).values)
    assert index.ids_of(indices)[0][0] == "clip4"
    with pytest.raises(ValueError, match=r"queries must be \[Q, 8\]"):
        index.search(torch.randn(2, 5))
    with pytest.raises(ValueError, match="ids"):
        EmbeddingIndex(gallery, ids=["a"])
