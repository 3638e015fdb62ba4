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


def test_reranked_recall_reranks_the_rows_observing_both_with_their_own_tokens():
    from tiny_models import MIXED_MASK, tiny_batch, tiny_config

    from calmrl_hf import CalMRLModel
    from calmrl_hf.evaluation.reranking import collect_matching_tokens, reranked_recall

    torch.manual_seed(0)
    model = CalMRLModel(tiny_config(fusion_num_layers=1)).eval()
    mask = MIXED_MASK.repeat(3, 1)  # 18 rows: text+vision on 9, text+audio on 6, text+subtitle on 6
    batch = tiny_batch(mask, seed=2)
    with torch.no_grad():
        embeddings, _ = model.embed_modalities(**batch)
    modalities = list(model.config.modalities)
    tokens = collect_matching_tokens(model, [batch], modalities)
    labels = torch.arange(18) % 3
    recall = reranked_recall(model, embeddings, mask, tokens, top_k=3, labels=labels, ks=(1, 3, 18))
    plain = retrieval_metrics(embeddings, mask, modalities, ks=(1, 3, 18), labels=labels)
    for gallery in ("vision", "audio", "subtitle"):
        # re-ordering inside each query's top 3 keeps the top 3 as they were
        assert recall[f"text->{gallery}/R@3"] == plain[f"text->{gallery}/R@3"]
        assert recall[f"text->{gallery}/class_R@3"] == plain[f"text->{gallery}/class_R@3"]
        assert recall[f"text->{gallery}/R@18"] == 100.0
    # the same as re-ranking the text -> audio rows alone, with tokens computed from their own inputs
    rows = (mask[:, 1] & mask[:, 2]).nonzero().flatten()
    text_rows, audio_rows = mask[:, 2].cumsum(0)[rows] - 1, mask[:, 1].cumsum(0)[rows] - 1
    query = model.get_matching_tokens("text", input_ids=batch["text_input_ids"][text_rows],
                                      attention_mask=batch["text_attention_mask"][text_rows])
    audio = model.get_matching_tokens("audio", input_values=batch["audio_input_values"][audio_rows])
    similarity = embeddings[rows, 2] @ embeddings[rows, 1].T
    expected = model.rerank(similarity, query, {"audio": audio}, top_k=3)
    scores, rerank = [], model.rerank
    model.rerank = lambda *args, **kwargs: scores.append(rerank(*args, **kwargs)) or scores[-1]
    audio_recall = reranked_recall(model, embeddings, mask, tokens, top_k=3, galleries=["audio"], labels=labels,
                                   ks=(1, 3, 18))
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-5)
    assert len(scores) == 1 and audio_recall == {key: value for key, value in recall.items() if "->audio/" in key}
    assert audio_recall["text->audio/R@1"] == recall_at_k(scores[0], (1,))[1]
    with pytest.raises(ValueError, match="'audio' token states hold 2 rows but 9 rows observe 'audio'"):
        reranked_recall(model, embeddings, mask, {**tokens, "audio": tuple(t[:2] for t in tokens["audio"])}, top_k=3)
    with pytest.raises(ValueError, match="galleries must be modalities of the model other than the caption"):
        reranked_recall(model, embeddings, mask, tokens, top_k=3, galleries=["text"])
