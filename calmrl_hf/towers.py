"""Running one modality's tower: token states, their mask, and the pooled features the projection head reads.

Any transformers model is a tower: text (BERT-like), images and videos (ViT-like, or convolutional ResNet /
ConvNext whose feature maps become position tokens), audio (AST, Wav2Vec2), precomputed features
(`feature_encoder.FeatureEncoderModel`). Building the towers of a config lives here too. Imports torch and
transformers only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel

from .modality_inputs import check_tower_inputs, inputs_checked, raise_bad_values, values_checked


def build_towers(config, given: dict[str, PreTrainedModel]) -> nn.ModuleDict:
    """One tower per entry of `config.encoder_configs`: the `given` model, or one built from the config. Either
    way the tower's config object and the CalMRL config's entry are one object afterwards, so that `dtype`,
    `attn_implementation` and `set_attn_implementation` reach the tower through the CalMRL config."""
    unknown = sorted(set(given) - set(config.encoder_configs))
    if unknown:
        raise ValueError(f"Towers given for {unknown}, which have no encoder config (towers: "
                         f"{sorted(config.encoder_configs)}).")
    towers = {}
    for name, tower_config in config.encoder_configs.items():
        tower = given.get(name)
        if tower is None:
            tower = AutoModel.from_config(tower_config)
        elif not isinstance(tower, PreTrainedModel):
            raise TypeError(f"The tower of {name!r} must be a PreTrainedModel, got {type(tower).__name__}.")
        config.encoder_configs[name] = tower.config
        towers[name] = tower
    return nn.ModuleDict(towers)


def tower_class(tower_config: PreTrainedConfig) -> type | None:
    """The model class `AutoModel` builds for a tower config (None if it knows none)."""
    mapping = AutoModel._model_mapping
    return mapping[type(tower_config)] if type(tower_config) in mapping else None


def towers_support(config, flag: str) -> bool:
    """Whether every tower's model class has `flag` (e.g. `_supports_flash_attn`) set."""
    classes = [tower_class(c) for c in config.encoder_configs.values()]
    return bool(classes) and all(getattr(cls, flag, False) is True for cls in classes)


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


def run_tower(tower: nn.Module, mode: str, name: str, inputs: dict[str, torch.Tensor], **tower_kwargs):
    """Pooled features [n, H], token states [n, L, H], their bool mask [n, L] and the tower's own outputs, for
    modality `name`'s tower; `tower_kwargs` (`output_hidden_states`, `output_attentions`) go to the tower.

    A video [n, T, C, H, W] runs frame by frame: pooled features are averaged over its T frames, token states
    (and each of `hidden_states`) are the T frames' tokens one after the other [n, T * L, H]; `attentions` stay
    per frame [n * T, heads, L, L].

    The inputs are checked against the tower first (`modality_inputs.check_tower_inputs`: shapes and dtypes, then
    the values with one sync), unless the caller checked them already (`inputs_checked`, as `_embed_batch` does
    for a whole batch).
    """
    if not values_checked(name):
        raise_bad_values(check_tower_inputs(name, tower, inputs))
    pixel_values = inputs.get("pixel_values")
    num_frames = None
    if pixel_values is not None and pixel_values.dim() == 5:
        num_frames = pixel_values.shape[1]
        inputs = {**inputs, "pixel_values": pixel_values.flatten(0, 1)}  # [n * T, C, H, W]
    outputs = tower(**inputs, **tower_kwargs, return_dict=True)
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
        tokens, token_mask = (frames_as_tokens(t, num_frames) for t in (tokens, token_mask))  # [n, T * L, H]
        if getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = tuple(frames_as_tokens(h, num_frames) if h.dim() == 3 else h
                                          for h in outputs.hidden_states)
    return pooled, tokens, token_mask, outputs


def placeholder_inputs(tower: nn.Module, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """One row of zeros in the input a tower's config describes (token ids, an image, a spectrogram, a waveform,
    features), for running a tower whose modality the local batch lacks: under DDP / FSDP / ZeRO-3 every process
    must run every tower (the collectives inside it) on every step. Zero-row batches would be cheaper, but
    transformers' attention reshapes refuse them."""
    config, name = tower.config, tower.main_input_name
    if name == "input_ids":
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long, device=device),
                "attention_mask": torch.ones(1, 1, dtype=torch.long, device=device)}
    if name == "pixel_values":
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        return {name: torch.zeros(1, getattr(config, "num_channels", 3), *size, device=device)}
    if name == "input_values" and hasattr(config, "num_mel_bins") and hasattr(config, "max_length"):  # AST
        return {name: torch.zeros(1, config.max_length, config.num_mel_bins, device=device)}
    if name == "input_values":  # a waveform (Wav2Vec2-like): one second at 16 kHz covers any receptive field
        return {name: torch.zeros(1, 16000, device=device)}
    if name == "input_features" and hasattr(config, "input_dim"):  # feature_encoder.FeatureEncoderModel
        return {name: torch.zeros(1, config.input_dim, device=device)}
    raise ValueError(f"Cannot build a placeholder input for a {type(tower).__name__} tower (main input {name!r}): "
                     f"in multi-process training every process needs a batch with a row of each modality.")


def run_on_placeholder(run_modality: Callable, tower: nn.Module, device: torch.device | None = None):
    """A modality's tower and projection head (`run_modality(inputs)`, its `CalMRLModalityOutput`) on a placeholder
    row (`placeholder_inputs`), for a batch without that modality under DDP / FSDP / ZeRO-3: its output with zero
    rows (it observes none), and its zero-row unit-norm features [0, D], still in the graph of the tower (a zero
    gradient reaches every parameter)."""
    with inputs_checked():  # built here: nothing to read back
        placeholder = run_modality(placeholder_inputs(tower, device))
    output = type(placeholder)(last_hidden_state=placeholder.last_hidden_state[:0],
                               pooler_output=placeholder.pooler_output[:0], token_mask=placeholder.token_mask[:0])
    return output, F.normalize(placeholder.pooler_output, dim=-1)[:0]


def tower_input_names(tower: nn.Module) -> frozenset[str]:
    """The inputs a tower's `forward` names (`input_ids`, `pixel_values`, ...): transformers towers also take
    `**kwargs`, which would swallow a misspelt input without a word."""
    parameters = inspect.signature(tower.forward).parameters.values()
    named = (p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return frozenset(name for name in named if name != "return_dict")


def frames_as_tokens(per_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[n * T, L, ...] per-frame token tensors -> [n, T * L, ...] (the frames' tokens one after the other)."""
    return per_frame.unflatten(0, (-1, num_frames)).flatten(1, 2)


__all__ = ["build_towers", "frames_as_tokens", "masked_mean", "placeholder_inputs", "pool", "run_on_placeholder",
           "run_tower", "tower_class", "tower_input_names", "towers_support"]
