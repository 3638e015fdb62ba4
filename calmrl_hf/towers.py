"""Running one modality's tower: token states, their mask, and the pooled features the projection head reads.

Any transformers model is a tower: text (BERT-like), images and videos (ViT-like, or convolutional ResNet /
ConvNext whose feature maps become position tokens), audio (AST, Wav2Vec2), precomputed features
(`feature_encoder.FeatureEncoderModel`). Imports torch only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean [n, H] of token states `hidden` [n, L, H] over the tokens the mask [n, L] keeps (all without one)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [n, L, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def pool(mode: str, name: str, tower: nn.Module, outputs, hidden: torch.Tensor,
         attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Pooled features [n, H] of token states `hidden` [n, L, H] by `mode` (`CalMRLConfig.pooling[name]`):
    the first token (`cls`), the masked token mean (`mean`) or the tower's own `pooler_output` (`pooler`)."""
    if mode == "pooler":
        if getattr(outputs, "pooler_output", None) is None:
            raise ValueError(f"pooling[{name!r}] = 'pooler' but the {type(tower).__name__} tower has no pooler_output.")
        return outputs.pooler_output.flatten(1)  # convolutional towers pool to [n, C, 1, 1]
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is not None and attention_mask.shape[1] != hidden.shape[1]:
        # e.g. Wav2Vec2: the mask covers audio samples, the features are frames
        if hasattr(tower, "_get_feature_vector_attention_mask"):
            attention_mask = tower._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
        else:
            attention_mask = None
    return masked_mean(hidden, attention_mask)


def run_tower(tower: nn.Module, mode: str, name: str, inputs: dict[str, torch.Tensor]):
    """Pooled features [n, H], token states [n, L, H] and their bool mask [n, L] of modality `name`'s tower.

    A video [n, T, C, H, W] runs frame by frame: pooled features are averaged over its T frames, token states
    are the T frames' tokens one after the other [n, T * L, H].
    """
    pixel_values = inputs.get("pixel_values")
    num_frames = None
    if pixel_values is not None and pixel_values.dim() == 5:
        num_frames = pixel_values.shape[1]
        inputs = {**inputs, "pixel_values": pixel_values.flatten(0, 1)}  # [n * T, C, H, W]
    outputs = tower(**inputs, return_dict=True)
    attention_mask = inputs.get("attention_mask")
    tokens = outputs.last_hidden_state  # [n (* T), L, H]
    if tokens.dim() == 4:  # convolutional towers (ResNet, ConvNext): feature map [n, C, h, w] -> [n, h * w, C]
        tokens = tokens.flatten(2).transpose(1, 2)
    pooled = pool(mode, name, tower, outputs, tokens, attention_mask)
    if attention_mask is not None and attention_mask.shape == tokens.shape[:2]:
        token_mask = attention_mask.bool()
    else:
        token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if num_frames is not None:
        pooled = pooled.unflatten(0, (-1, num_frames)).mean(dim=1)  # mean over frames
        tokens = tokens.unflatten(0, (-1, num_frames)).flatten(1, 2)  # [n, T * L, H]
        token_mask = token_mask.unflatten(0, (-1, num_frames)).flatten(1, 2)
    return pooled, tokens, token_mask


__all__ = ["masked_mean", "pool", "run_tower"]
