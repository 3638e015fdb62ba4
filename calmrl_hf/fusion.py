"""The matching head: a fusion encoder that reads caption tokens and attends to the other modalities' tokens.

VAST / PMRL / CalMRL train a binary matching term next to the alignment loss (weight alpha = 0.1 in the paper),
computed on observed modalities only, and re-rank the top retrieval candidates with it at test time. Each
fusion layer is bidirectional self-attention over the caption tokens, cross-attention to the condition tokens
(the observed non-caption modalities of an instance, projected to the fusion width, plus a modality type
embedding) and a feed-forward block; the head classifies the first token (match / no match).

transformers 5's `BertLayer` builds cross-attention only for `is_decoder=True`, which also makes its
self-attention causal; a fusion encoder must see the whole caption, so its layers are built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor | None = None,
                          valid: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row i of `similarity` [n, m], a column j != positives[i] drawn with probability
    softmax_j(similarity[i, j]) over the `valid` columns (default: the square case, positive i = column i).

    The positive is never drawn; every row needs at least one other valid column.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [n, m], got {list(similarity.shape)}.")
    n, m = similarity.shape
    positives = torch.arange(n, device=similarity.device) if positives is None else positives
    allowed = torch.ones(n, m, dtype=torch.bool, device=similarity.device) if valid is None else \
        valid.unsqueeze(0).expand(n, m).clone()
    allowed[torch.arange(n, device=similarity.device), positives] = False  # exclude the positive
    if not bool(allowed.any(dim=1).all()):
        raise ValueError("Hard negatives need at least 2 rows: some row has no other candidate.")
    logits = similarity.detach().float().masked_fill(~allowed, float("-inf"))
    return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)


class FusionEncoder(nn.Module):
    """Caption tokens [n, L, W] x condition tokens [n, M, W] -> match logits [n, 2]."""

    def __init__(self, width: int, num_layers: int, num_heads: int, condition_widths: dict[str, int],
                 num_modalities: int, dropout: float = 0.1):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"The fusion width {width} is not divisible by {num_heads} attention heads.")
        self.token_projections = nn.ModuleDict({name: nn.Linear(w, width) for name, w in condition_widths.items()})
        self.modality_type = nn.Embedding(num_modalities, width)
        layer = nn.TransformerDecoderLayer(width, num_heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, num_layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)
        for module in self.modules():
            module._fusion_init = True  # CalMRL's `_init_weights` gives these `init_module`, not N(0, 0.02)
        self.reset_parameters()

    @staticmethod
    def init_module(module: nn.Module) -> None:
        """PyTorch's own initialisation of one fusion-encoder module (Linear: kaiming-uniform, attention
        in-projections: xavier, LayerNorm: identity), the modality type embedding N(0, 0.02).

        Not the N(0, initializer_range = 0.02) that transformers' `_init_weights` gives every `nn.Linear`: at width
        W = 64 such a layer scales a vector by about 0.02 sqrt(W) = 0.16, and the condition reaches the [CLS] state
        through three of them (token projection, attention value, attention output), ~1e-2 of the caption's
        residual. The head then starts as a near-constant function of the caption alone, and on a small training
        budget it stays one: its logits barely depend on the candidate, and what little they do ranks the true
        candidate in the middle of its retrieval neighbours (below chance at Recall@1 after re-ranking).
        """
        if isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()  # xavier in-projection, zero biases (out_proj is a Linear: its own call)
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def reset_parameters(self) -> None:
        for module in self.modules():
            self.init_module(module)

    def condition_tokens(self, name: str, index: int, states: torch.Tensor) -> torch.Tensor:
        """Token states [n, L, H] of modality `name` in the fusion space, tagged with its type embedding."""
        return self.token_projections[name](states) + self.modality_type.weight[index]

    def forward(self, caption: torch.Tensor, caption_mask: torch.Tensor, condition: torch.Tensor,
                condition_mask: torch.Tensor) -> torch.Tensor:
        """Match logits [n, 2]; masks are bool, True where a token is real. Every row needs a condition token."""
        if not bool(condition_mask.any(dim=1).all()):
            raise ValueError("Every pair fed to the fusion encoder needs at least one observed condition token.")
        hidden = self.layers(caption, condition, tgt_key_padding_mask=~caption_mask,
                             memory_key_padding_mask=~condition_mask)
        return self.head(self.norm(hidden[:, 0]))  # the first ([CLS]) token


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary matching cross-entropy over positive (label 1) and negative (label 0) pairs."""
    return F.cross_entropy(logits.float(), labels)


__all__ = ["FusionEncoder", "matching_loss", "sample_hard_negatives"]
