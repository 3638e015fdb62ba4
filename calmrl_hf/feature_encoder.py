"""A tower over precomputed features: an MLP that maps feature vectors (or sequences of them) to hidden states.

Many users already hold embeddings from a frozen backbone (CLIP image features, CLAP audio features, ...). A
`FeatureEncoderModel` is a transformers model like any other tower, so `CalMRLConfig(encoder_configs={"audio":
FeatureEncoderConfig(input_dim=512)})` aligns such features with the other modalities; inputs are named
`{modality}_input_features`, [n, F] or [n, L, F] with an optional `{modality}_attention_mask` [n, L].
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .towers import masked_mean


class FeatureEncoderConfig(PreTrainedConfig):
    r"""
    Args:
        input_dim (`int`, *optional*, defaults to 512): size F of each input feature vector.
        hidden_size (`int`, *optional*, defaults to 256): width of the MLP and of its output states.
        num_hidden_layers (`int`, *optional*, defaults to 2): number of Linear + activation blocks.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): activation between layers.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): dropout after each block.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the final LayerNorm.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the Linear weights at initialisation.
    """

    model_type = "calmrl_feature_encoder"

    input_dim: int = 512
    hidden_size: int = 256
    num_hidden_layers: int = 2
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02


class FeatureEncoderModel(PreTrainedModel):
    config: FeatureEncoderConfig
    config_class = FeatureEncoderConfig
    base_model_prefix = "feature_encoder"
    main_input_name = "input_features"

    def __init__(self, config: FeatureEncoderConfig):
        super().__init__(config)
        if config.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {config.num_hidden_layers}.")
        widths = [config.input_dim] + [config.hidden_size] * config.num_hidden_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs) -> BaseModelOutputWithPooling:
        """`input_features` [n, F] (one vector per example) or [n, L, F]; pooled output: the (masked) token mean."""
        if input_features.shape[-1] != self.config.input_dim or input_features.dim() not in (2, 3):
            raise ValueError(f"input_features must be [n, {self.config.input_dim}] or [n, L, {self.config.input_dim}], "
                             f"got {list(input_features.shape)}.")
        hidden = input_features.unsqueeze(1) if input_features.dim() == 2 else input_features  # [n, L, F]
        hidden = hidden.to(self.layers[0].weight.dtype)
        for layer in self.layers:
            hidden = self.dropout(self.activation(layer(hidden)))
        hidden = self.layer_norm(hidden)  # [n, L, H]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=masked_mean(hidden, attention_mask))


__all__ = ["FeatureEncoderConfig", "FeatureEncoderModel"]
