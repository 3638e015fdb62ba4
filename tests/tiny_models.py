"""Tiny tower configs and matching random inputs shared by the tests (hidden size 32, one layer)."""

from __future__ import annotations

import torch
from transformers import ASTConfig, BertConfig, ViTConfig

from calmrl_hf import CalMRLConfig


IMAGE_SIZE = 16
NUM_FRAMES = 2
AUDIO_FRAMES = 32
MEL_BINS = 16
VOCAB_SIZE = 64


def tiny_bert() -> BertConfig:
    return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def tiny_vit() -> ViTConfig:
    return ViTConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64)


def tiny_ast() -> ASTConfig:
    return ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     patch_size=8, frequency_stride=8, time_stride=8, max_length=AUDIO_FRAMES, num_mel_bins=MEL_BINS)


def tiny_config(**overrides) -> CalMRLConfig:
    kwargs = dict(
        encoder_configs={"vision": tiny_vit(), "audio": tiny_ast(), "text": tiny_bert()},
        projection_dim=16,
        imputer_latent_dim=4,
    )
    kwargs.update(overrides)
    return CalMRLConfig(**kwargs)


def tiny_batch(modality_mask: torch.Tensor, seed: int = 0, video: bool = True) -> dict[str, torch.Tensor]:
    """Random inputs for the observed rows of each modality (order: vision, audio, text, subtitle)."""
    generator = torch.Generator().manual_seed(seed)
    counts = modality_mask.sum(dim=0).tolist()
    batch: dict[str, torch.Tensor] = {"modality_mask": modality_mask}
    if counts[0]:
        shape = (counts[0], NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE) if video else (counts[0], 3, IMAGE_SIZE, IMAGE_SIZE)
        batch["vision_pixel_values"] = torch.randn(shape, generator=generator)
    if counts[1]:
        batch["audio_input_values"] = torch.randn(counts[1], AUDIO_FRAMES, MEL_BINS, generator=generator)
    for name, count in (("text", counts[2]), ("subtitle", counts[3])):
        if count:
            ids = torch.randint(1, VOCAB_SIZE, (count, 7), generator=generator)
            attention = torch.ones_like(ids)
            attention[0, 5:] = 0  # padding must not change the mean pooling
            batch[f"{name}_input_ids"] = ids * attention
            batch[f"{name}_attention_mask"] = attention
    return batch


# Mixed missingness: all four, vision+text, audio+text, vision+audio+subtitle, text only, ...
MIXED_MASK = torch.tensor(
    [
        [True, True, True, True],
        [True, False, True, False],
        [False, True, True, False],
        [True, True, False, True],
        [False, False, True, False],
        [True, False, True, True],
    ]
)


def match_probability(model, caption_inputs: dict, condition_inputs: dict[str, dict]) -> torch.Tensor:
    """P(match) [n] of n (caption, condition) pairs, row by row, through the public path: each tower's tokens
    (`get_matching_tokens`) and the matching head (`fusion.match_probability`)."""
    caption = model.get_matching_tokens(model.config.matching_modality, **caption_inputs)
    conditions = {name: model.get_matching_tokens(name, **inputs) for name, inputs in condition_inputs.items()}
    with torch.no_grad():
        return model.fusion.match_probability(*caption, conditions)
