import pytest
import torch
import torch.nn.functional as F

from calmrl_hf import PPCAImputer
from calmrl_hf.evaluation.metrics import (
    anchor_shift_report,
    imputation_error,
    recall_at_k,
    retrieval_metrics,
    zero_shot_accuracy,
)


def test_recall_at_k_counts_ranks_of_the_positive():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.2, 0.3, 0.1]])
    # ranks of the positives: 0, 1, 2
    assert recall_at_k(similarity, ks=(1, 2, 3)) == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0}
    labels = torch.tensor([0, 0, 1])  # query 1's top item is instance 0, same class: a class-level hit
    assert recall_at_k(similarity, ks=(1,), labels=labels)[1] == pytest.approx(200 / 3)


def test_retrieval_metrics_on_identical_modalities_and_masks():
    z = F.normalize(torch.randn(20, 1, 8, generator=torch.Generator().manual_seed(0)), dim=-1).expand(20, 3, 8)
    mask = torch.ones(20, 3, dtype=torch.bool)
    mask[:5, 2] = False
    metrics = retrieval_metrics(z, mask, ["a", "b", "c"], labels=torch.arange(20) % 4)
    assert metrics["a->b/R@1"] == 100.0 and metrics["c->a/R@1"] == 100.0 and metrics["mean_R@1"] == 100.0
    assert metrics["a->c/class_R@1"] == 100.0
    with pytest.raises(ValueError, match="modality_mask"):
        retrieval_metrics(z, mask[:, :2], ["a", "b", "c"])


def test_zero_shot_accuracy():
    prompts = torch.eye(4, 6)
    queries = prompts[torch.tensor([0, 1, 2, 3, 0])] + 0.01
    labels = torch.tensor([0, 1, 2, 3, 1])
    result = zero_shot_accuracy(queries, prompts, labels, ks=(1, 2))
    assert result["top1"] == pytest.approx(80.0) and result["top2"] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="share D"):
        zero_shot_accuracy(queries, torch.eye(4, 5), labels)


def test_imputation_error_and_anchor_shift_report_on_a_planted_model():
    generator = torch.Generator().manual_seed(0)
    imputer = PPCAImputer(4, 16, 3)
    imputer.weight.copy_(torch.randn(4, 16, 3, generator=generator))
    imputer.noise_var.fill_(0.05)
    latent = torch.randn(400, 3, generator=generator)
    truth = torch.einsum("kdq,nq->nkd", imputer.weight, latent) + 0.22 * torch.randn(400, 4, 16, generator=generator)
    truth = F.normalize(truth, dim=-1)
    mask = torch.rand(400, 4, generator=generator) > 0.5
    mask[:, 0] = True
    imputer.fit(truth, torch.ones(400, 4, dtype=torch.bool), max_iter=30)  # fitted on full data
    imputed = F.normalize(imputer.impute(truth, mask), dim=-1)
    zero = torch.where(mask.unsqueeze(-1), truth, torch.zeros_like(truth))
    good = imputation_error(truth, imputed, ~mask, ["a", "b", "c", "d"])
    bad = imputation_error(truth, zero, ~mask)
    assert good["mse"] < 0.5 * bad["mse"] and good["cosine"] > 0.5 and "mse/b" in good
    report = anchor_shift_report(truth, mask, imputed)
    assert report["calibrated"] < report["observed_only"] and report["instances"] == int((~mask.all(1)).sum())


def test_retrieval_recall_metric_equals_retrieval_metrics_over_batches():
    """The evaluate metric, fed batch by batch, gives exactly `retrieval_metrics` of the whole set."""
    from calmrl_hf.evaluation.metrics import RetrievalRecall

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(40, 3, 8, generator=generator), dim=-1)
    mask = torch.rand(40, 3, generator=generator) > 0.3
    mask[:, 2] = True
    labels = torch.randint(0, 5, (40,), generator=generator)
    modalities = ["vision", "audio", "text"]
    expected = retrieval_metrics(embeddings, mask, modalities, labels=labels)
    metric = RetrievalRecall(modalities, config_name="class", keep_in_memory=True)
    for start in range(0, 40, 16):
        metric.add_batch(embeddings=embeddings[start:start + 16].numpy(), modality_mask=mask[start:start + 16].numpy(),
                         labels=labels[start:start + 16].numpy())
    assert metric.compute() == pytest.approx(expected)
    instance = RetrievalRecall(modalities, pairs=[("text", "vision")], keep_in_memory=True)
    instance.add_batch(embeddings=embeddings.numpy(), modality_mask=mask.numpy())
    assert instance.compute() == pytest.approx({k: v for k, v in retrieval_metrics(
        embeddings, mask, modalities, pairs=[("text", "vision")]).items()})
    with pytest.raises(ValueError, match="config_name"):
        RetrievalRecall(modalities, config_name="classes")
