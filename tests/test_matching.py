import pytest
import torch

from calmrl_hf import CalMRLModel
from calmrl_hf.evaluation import recall_at_k
from calmrl_hf.matching_head import rerank_top_k
from calmrl_hf.matching_head import sample_hard_negatives

from launching import torchrun
from tiny_models import MIXED_MASK, NUM_FRAMES, match_probability, tiny_batch, tiny_config


def matching_model(**overrides) -> CalMRLModel:
    torch.manual_seed(0)
    return CalMRLModel(tiny_config(fusion_num_layers=1, **overrides))


def test_hard_negatives_never_include_the_positive_and_follow_similarity():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(6, 6, generator=generator)
    draws = torch.stack([sample_hard_negatives(similarity, generator=generator) for _ in range(500)])  # [500, 6]
    assert not (draws == torch.arange(6)).any()
    peaked = torch.zeros(4, 4)
    peaked[:, 2] = 10.0  # every row strongly prefers column 2 (except row 2 itself)
    picks = torch.stack([sample_hard_negatives(peaked, generator=generator) for _ in range(200)])
    assert (picks[:, [0, 1, 3]] == 2).float().mean() > 0.95 and not (picks[:, 2] == 2).any()
    with pytest.raises(ValueError, match="at least 2 rows"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_matching_term_is_added_with_its_weight_and_reaches_fusion_and_towers():
    model = matching_model().train()
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    assert out.matching_loss is not None and out.matching_loss > 0
    torch.testing.assert_close(out.loss, out.alignment_loss + 0.1 * out.matching_loss)
    out.matching_loss.backward()
    assert model.fusion.head.weight.grad.abs().sum() > 0
    for name in ("vision", "audio", "subtitle"):
        assert model.fusion.token_projections[name].weight.grad.abs().sum() > 0, name
    for name in ("vision", "audio", "text"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[name].parameters()), name


def test_zero_weight_turns_the_matching_term_off():
    model = matching_model(matching_weight=0.0)
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    assert out.matching_loss is None and torch.equal(out.loss, out.alignment_loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.fusion.parameters())


def test_only_observed_modalities_are_fed_to_the_fusion_encoder():
    model = matching_model()
    with torch.no_grad():
        embeddings, mask, tokens = model.embed_modalities(return_tokens=True, **tiny_batch(MIXED_MASK))
    rows = torch.arange(MIXED_MASK.shape[0])
    memory, memory_mask = model.fusion.condition_memory(mask, tokens, rows)
    for row in rows.tolist():
        expected = 0
        for index, name in enumerate(model.config.modalities):
            if name != "text" and MIXED_MASK[row, index]:
                position = int(MIXED_MASK[: row + 1, index].sum()) - 1  # the row among this modality's inputs
                expected += int(tokens[name][1][position].sum())  # its real (unpadded) tokens
        assert int(memory_mask[row].sum()) == expected
    assert tokens["vision"][0].shape[1] % NUM_FRAMES == 0  # vision gives T frames x its tokens


def test_condition_memory_holds_each_rows_own_tokens_in_any_key_order():
    """Each row's real memory tokens are its observed non-caption modalities' projected tokens (built here row by
    row), and the fusion encoder gives the same logits on them packed per row: cross-attention has no key
    positions, so the per-modality blocks and their masked padding change nothing."""
    model = matching_model().eval()
    with torch.no_grad():
        _, mask, tokens = model.embed_modalities(return_tokens=True, **tiny_batch(MIXED_MASK))
        text = model.config.modality_index("text")
        rows = torch.tensor([0, 1, 2, 5])  # text and another modality observed
        memory, memory_mask = model.fusion.condition_memory(mask, tokens, rows)
        packed = []
        for row in rows.tolist():
            pieces = []
            for index, name in enumerate(model.config.modalities):
                if name != "text" and mask[row, index]:
                    position = int(mask[: row + 1, index].sum()) - 1
                    states, state_mask = tokens[name]
                    pieces.append(model.fusion.condition_tokens(name, index, states)[position][state_mask[position]])
            packed.append(torch.cat(pieces))
        for slot, reference in enumerate(packed):
            torch.testing.assert_close(memory[slot][memory_mask[slot]], reference)
        packed_memory = torch.nn.utils.rnn.pad_sequence(packed, batch_first=True)
        packed_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p), dtype=torch.bool) for p in packed],
                                                      batch_first=True)
        caption_states, caption_mask = tokens["text"]
        positions = mask[:, text].long().cumsum(0)[rows] - 1
        captions, captions_mask = caption_states[positions], caption_mask[positions]
        torch.testing.assert_close(model.fusion(captions, captions_mask, memory, memory_mask),
                                   model.fusion(captions, captions_mask, packed_memory, packed_mask))


def test_every_head_parameter_gets_a_gradient_when_the_batch_uses_a_modality_nowhere():
    """Rows 1 and 2 observe no subtitle: its token projection still gets a (zero) gradient, not None. Sharded
    engines reduce a group's gradients together, so a process whose batch left one out would send fewer."""
    model = matching_model()
    _, mask, tokens = model.embed_modalities(return_tokens=True, **tiny_batch(MIXED_MASK))
    rows = torch.tensor([1, 2])
    memory, memory_mask = model.fusion.condition_memory(mask, tokens, rows)
    caption_states, caption_mask = tokens["text"]
    positions = mask[:, model.config.modality_index("text")].long().cumsum(0)[rows] - 1
    model.fusion(caption_states[positions], caption_mask[positions], memory, memory_mask).sum().backward()
    for name, parameter in model.fusion.named_parameters():
        assert parameter.grad is not None, name
    assert model.fusion.token_projections["subtitle"].weight.grad.abs().sum() == 0
    assert model.fusion.token_projections["vision"].weight.grad.abs().sum() > 0


def test_reranking_with_the_similarity_itself_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(12, 12, generator=generator)
    unchanged = rerank_top_k(similarity, lambda q, g: similarity[q, g], k=5)
    assert torch.equal(unchanged.argsort(dim=1, descending=True)[:, :5],
                       similarity.argsort(dim=1, descending=True)[:, :5])
    assert recall_at_k(unchanged) == recall_at_k(similarity)
    oracle = rerank_top_k(similarity, lambda q, g: (q == g).float(), k=12)  # a perfect matcher over all items
    assert recall_at_k(oracle)[1] == 100.0


def test_match_probability_and_round_trip(tmp_path):
    model = matching_model().eval()
    batch = tiny_batch(torch.ones(3, 4, dtype=torch.bool))
    caption = {"input_ids": batch["text_input_ids"], "attention_mask": batch["text_attention_mask"]}
    condition = {"vision": {"pixel_values": batch["vision_pixel_values"]},
                 "audio": {"input_values": batch["audio_input_values"]}}
    scores = match_probability(model, caption, condition)
    assert scores.shape == (3,) and torch.all((scores > 0) & (scores < 1))
    model.save_pretrained(tmp_path)
    loaded = CalMRLModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(match_probability(loaded, caption, condition), scores)
    without_head = CalMRLModel(tiny_config())
    with pytest.raises(ValueError, match="no matching head"):
        without_head.get_matching_tokens("text", **caption)


def test_hard_negatives_from_a_gathered_pool_respect_offsets_and_padding():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.randn(3, 8, generator=generator)  # 3 local rows against a pool of 8 (2 processes x 4)
    valid = torch.tensor([True, True, True, False, True, True, True, True])  # row 3 is padding
    positives = torch.arange(3) + 4  # this process's rows start at offset 4
    draws = torch.stack([sample_hard_negatives(similarity, positives, valid, generator=generator)
                         for _ in range(300)])
    assert not (draws == positives).any() and not (draws == 3).any()
    assert (draws < 4).any()  # other processes' rows are drawn too


@pytest.mark.slow
def test_negatives_are_drawn_across_processes(tmp_path):
    out = tmp_path / "draws.pt"
    torchrun("dist_matching_worker.py", str(out), timeout=300)
    record = torch.load(out, weights_only=False)
    assert record["finite"]
    for draw in record["draws"]:
        assert draw["pool"] == 12  # 2 processes x 6 rows (rank 0's 4 rows padded to 6)
        assert draw["valid"].tolist() == [True] * 4 + [False] * 2 + [True] * 6
        assert not (draw["picked"] == draw["positives"].unsqueeze(1)).any()  # [n, negatives] vs [n]
        assert draw["valid"][draw["picked"]].all()
    picked = torch.cat([d["picked"] for d in record["draws"]])
    assert (picked >= 6).any()  # rank 0 drew negatives from rank 1's rows


def test_fusion_encoder_keeps_pytorch_init_and_learns_matching_quickly():
    """transformers' `_init_weights` used to give the fusion encoder's Linear layers N(0, 0.02): the condition then
    reached the [CLS] state scaled by ~1e-2, the head sat at the label prior (P(match) ~ 1/3 for every pair) for
    the benchmark's whole training budget and re-ranking fell below chance. With PyTorch's init it learns."""
    from calmrl_hf import CalMRLConfig, FeatureEncoderConfig

    torch.manual_seed(0)
    tower = FeatureEncoderConfig(input_dim=8, hidden_size=32, num_hidden_layers=1)
    config = CalMRLConfig(modalities=["vision", "text"], encoder_configs={"vision": tower, "text": tower},
                          shared_encoders={}, projection_dim=16, imputer_latent_dim=2, fusion_num_layers=1,
                          fusion_num_attention_heads=2, alignment_objective="pairwise_infonce")
    model = CalMRLModel(config)
    projection = model.fusion.token_projections["vision"].weight
    assert projection.std() > 0.05  # kaiming-uniform (1 / sqrt(3 * 32) = 0.10), not N(0, 0.02)
    model.requires_grad_(False)
    model.fusion.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 8, generator=generator)

    def sample(n):  # text = a fixed linear map of the vision features + noise: a learnable matching task
        latent = torch.randn(n, 8, generator=generator)
        return latent, latent @ mixing + 0.1 * torch.randn(n, 8, generator=generator)

    optimizer = torch.optim.Adam(model.fusion.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        vision, text = sample(32)
        embeddings, mask, tokens = model.embed_modalities(return_tokens=True, vision_input_features=vision,
                                                          text_input_features=text)
        loss = model.matching_step(embeddings, mask, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    vision, text = sample(64)
    positive = match_probability(model, {"input_features": text}, {"vision": {"input_features": vision}})
    negative = match_probability(model, {"input_features": text}, {"vision": {"input_features": vision.roll(1, 0)}})
    assert (positive > negative).float().mean() > 0.8  # N(0, 0.02) init: 0.64
    assert positive.mean() - negative.mean() > 0.2  # N(0, 0.02) init: 0.06


def test_several_hard_negatives_are_distinct_never_the_positive_and_follow_similarity():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(6, 6, generator=generator)
    draws = sample_hard_negatives(similarity, num_negatives=4, generator=generator)  # [6, 4]
    assert draws.shape == (6, 4) and not (draws == torch.arange(6).unsqueeze(1)).any()
    assert all(len(set(row.tolist())) == 4 for row in draws)  # without replacement
    peaked = torch.zeros(5, 5)
    peaked[:, 2], peaked[:, 4] = 10.0, 9.0  # two hard negatives per row stand out
    picks = torch.stack([sample_hard_negatives(peaked, num_negatives=2, generator=generator) for _ in range(50)])
    rows = [0, 1, 3]
    assert (picks[:, rows].sort(dim=-1).values == torch.tensor([2, 4])).all(dim=-1).float().mean() > 0.9
    few = sample_hard_negatives(torch.zeros(3, 3), num_negatives=5, generator=generator)  # only 2 others per row
    assert few.shape == (3, 5) and not (few == torch.arange(3).unsqueeze(1)).any()
    with pytest.raises(ValueError, match="num_negatives"):
        sample_hard_negatives(similarity, num_negatives=0)


def test_matching_term_with_k_negatives_equals_its_weighted_cross_entropy():
    """(2k + 1) n pairs; positives weighted k : 1 against negatives; k = 1 is the plain mean of the 3n pairs."""
    import torch.nn.functional as F

    from calmrl_hf import matching_head as fusion

    model = matching_model(matching_num_negatives=3).train()
    batch = tiny_batch(MIXED_MASK)
    embeddings, mask, tokens = model.embed_modalities(return_tokens=True, **batch)
    captured = {}
    original = fusion.matching_loss

    def recording(logits, labels, share=1.0, weights=None):
        captured.update(logits=logits, labels=labels, weights=weights)
        return original(logits, labels, share, weights)

    fusion.matching_loss = recording
    try:
        torch.manual_seed(0)
        loss = model.matching_step(embeddings, mask, tokens)
    finally:
        fusion.matching_loss = original
    logits, labels, weights = captured["logits"], captured["labels"], captured["weights"]
    n = int(labels.sum())
    assert labels.numel() == 7 * n and weights[:n].eq(weights[0]).all() and torch.isclose(weights[0], 3 * weights[-1])
    per_pair = F.cross_entropy(logits.float(), labels, reduction="none")
    reference = (3 * per_pair[:n].sum() + per_pair[n:].sum()) / (3 * n + 6 * n)
    torch.testing.assert_close(loss, reference)
    plain = torch.randn(9, 2), torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(fusion.matching_loss(*plain, weights=torch.ones(9)), F.cross_entropy(*plain))
    with pytest.raises(ValueError, match="matching_num_negatives"):
        tiny_config(fusion_num_layers=1, matching_num_negatives=0)


def test_rerank_equals_head_scores_plus_the_contrastive_logit_in_any_batch_size():
    model = matching_model().eval()
    batch = tiny_batch(torch.ones(6, 4, dtype=torch.bool))
    text = {"input_ids": batch["text_input_ids"], "attention_mask": batch["text_attention_mask"]}
    audio = {"input_values": batch["audio_input_values"]}
    query, gallery = model.get_matching_tokens("text", **text), {"audio": model.get_matching_tokens("audio", **audio)}
    similarity = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    reranked = model.rerank(similarity, query, gallery, top_k=4, batch_size=5)
    torch.testing.assert_close(model.rerank(similarity, query, gallery, top_k=4, batch_size=1000), reranked)

    def reference_score(q, g):  # another way: the head's probabilities, as log-odds, plus exp(logit_scale) x cos
        p = match_probability(model, {k: v[q] for k, v in text.items()}, {"audio": {k: v[g] for k, v in audio.items()}})
        return torch.log(p) - torch.log1p(-p) + model.logit_scale.exp() * similarity[q, g]

    torch.testing.assert_close(reranked, rerank_top_k(similarity, reference_score, 4), atol=1e-4, rtol=1e-4)
    head_only = model.rerank(similarity, query, gallery, top_k=4, similarity_weight=0.0)
    probability = lambda q, g: match_probability(model, {k: v[q] for k, v in text.items()},  # noqa: E731
                                                 {"audio": {k: v[g] for k, v in audio.items()}})
    assert torch.equal(head_only.argsort(dim=1, descending=True),
                       rerank_top_k(similarity, probability, 4).argsort(dim=1, descending=True))
    with pytest.raises(ValueError, match="6 queries but the query tokens hold 2"):
        model.rerank(similarity, tuple(t[:2] for t in query), gallery)


def test_collected_tokens_of_several_batches_equal_one_batch():
    from calmrl_hf.evaluation.reranking import collect_matching_tokens

    model = matching_model().eval()
    whole = tiny_batch(torch.ones(5, 4, dtype=torch.bool))
    whole["text_attention_mask"][3, 4:] = 0  # rows of different lengths
    halves = [{key: value[rows] for key, value in whole.items()} for rows in (slice(0, 2), slice(2, 5))]
    collected = collect_matching_tokens(model, halves, ["text", "audio", "subtitle"])
    assert set(collected) == {"text", "audio", "subtitle"}
    expected = model.get_matching_tokens("text", input_ids=whole["text_input_ids"],
                                         attention_mask=whole["text_attention_mask"])
    states, mask = collected["text"]
    assert torch.equal(mask, expected[1][:, : mask.shape[1]]) and not expected[1][:, mask.shape[1]:].any()
    torch.testing.assert_close(states[mask], expected[0][:, : mask.shape[1]][mask])
    without_vision = collect_matching_tokens(model, [{k: v for k, v in whole.items() if not k.startswith("vision")}],
                                             ["vision", "text"])
    assert set(without_vision) == {"text"}  # no batch held vision


def test_the_matching_head_trains_at_its_own_rate_and_warm_up():
    from calmrl_hf.training import CalMRLTrainingArguments, build_optimizer

    model = matching_model()
    args = CalMRLTrainingArguments(learning_rate=1e-4, warmup_steps=2, matching_learning_rate=1e-3,
                                   matching_warmup_steps=4, max_steps=10, lr_scheduler_type="linear")
    optimizer, scheduler = build_optimizer(model, args, num_processes=1)
    head = {id(p) for p in model.fusion.parameters()}
    assert [all(id(p) in head for p in g["params"]) for g in optimizer.param_groups] == [False, True]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    rates = []
    for _ in range(6):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    linear = lambda step, warmup, base: base * (step / warmup if step < warmup else (10 - step) / (10 - warmup))  # noqa
    for step, (body, fusion_rate) in enumerate(rates):
        assert body == pytest.approx(linear(step, 2, 1e-4)) and fusion_rate == pytest.approx(linear(step, 4, 1e-3))
    single, _ = build_optimizer(model, CalMRLTrainingArguments(learning_rate=1e-4), num_processes=1)
    assert len(single.param_groups) == 1  # without the head's own settings: one group, as before
    with pytest.raises(ValueError, match="matching_learning_rate"):
        CalMRLTrainingArguments(matching_learning_rate=0.0)
