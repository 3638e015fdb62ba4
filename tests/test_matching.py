import pytest
import torch

from calmrl_hf import CalMRLModel
from calmrl_hf.evaluation import recall_at_k, rerank_top_k
from calmrl_hf.fusion import sample_hard_negatives

from tiny_models import MIXED_MASK, NUM_FRAMES, tiny_batch, tiny_config


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


def test_reranking_with_the_similarity_itself_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(12, 12, generator=generator)
    unchanged = rerank_top_k(similarity, lambda q, g: similarity[q, g], k=5)
    assert torch.equal(unchanged.argsort(dim=1, descending=True)[:, :5],
                       similarity.argsort(dim=1, descending=True)[:, :5])
    assert recall_at_k(unchanged) == recall_at_k(similarity)
    oracle = rerank_top_k(similarity, lambda q, g: (q == g).float(), k=12)  # a perfect matcher over all items
    assert recall_at_k(oracle)[1] == 100.0


def test_matching_scores_and_round_trip(tmp_path):
    model = matching_model().eval()
    batch = tiny_batch(torch.ones(3, 4, dtype=torch.bool))
    caption = {"input_ids": batch["text_input_ids"], "attention_mask": batch["text_attention_mask"]}
    condition = {"vision": {"pixel_values": batch["vision_pixel_values"]},
                 "audio": {"input_values": batch["audio_input_values"]}}
    scores = model.matching_scores(caption, condition)
    assert scores.shape == (3,) and torch.all((scores > 0) & (scores < 1))
    model.save_pretrained(tmp_path)
    loaded = CalMRLModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.matching_scores(caption, condition), scores)
    without_head = CalMRLModel(tiny_config())
    with pytest.raises(ValueError, match="no matching head"):
        without_head.matching_scores(caption, condition)


def test_hard_negatives_from_a_gathered_pool_respect_offsets_and_padding():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.randn(3, 8, generator=generator)  # 3 local rows against a pool of 8 (2 processes x 4)
    valid = torch.tensor([True, True, True, False, True, True, True, True])  # row 3 is padding
    positives = torch.arange(3) + 4  # this process's rows start at offset 4
    draws = torch.stack([sample_hard_negatives(similarity, positives, valid, generator=generator)
                         for _ in range(300)])
    assert not (draws == positives).any() and not (draws == 3).any()
    assert (draws < 4).any()  # other processes' rows are drawn too


def test_negatives_are_drawn_across_processes(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "draws.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    worker = Path(__file__).parent / "dist_matching_worker.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", str(worker), str(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    record = torch.load(out, weights_only=False)
    assert record["finite"]
    for draw in record["draws"]:
        assert draw["pool"] == 12  # 2 processes x 6 rows (rank 0's 4 rows padded to 6)
        assert draw["valid"].tolist() == [True] * 4 + [False] * 2 + [True] * 6
        assert not (draw["picked"] == draw["positives"]).any()
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
    positive = model.matching_scores({"input_features": text}, {"vision": {"input_features": vision}})
    negative = model.matching_scores({"input_features": text}, {"vision": {"input_features": vision.roll(1, 0)}})
    assert (positive > negative).float().mean() > 0.8  # N(0, 0.02) init: 0.64
    assert positive.mean() - negative.mean() > 0.2  # N(0, 0.02) init: 0.06
