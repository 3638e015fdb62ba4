"""Re-ranking retrieval candidates with the matching head, as VAST / PMRL evaluate (their top 50).

The matching head's scoring (`CalMRLModel.rerank`, `matching_head.rerank_top_k`) is model-side; this file collects
the token states it reads over a dataset.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def pad_tokens(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [n_i, L_i, H] and masks [n_i, L_i] of several batches as one ([sum n_i, max L_i, H], mask)."""
    if not chunks:
        raise ValueError("No token states to pad: no batch held this modality.")
    length = max(states.shape[1] for states, _ in chunks)
    states = torch.cat([nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s, _ in chunks])
    masks = torch.cat([nn.functional.pad(m, (0, length - m.shape[1])) for _, m in chunks])
    return states, masks


@torch.no_grad()
def collect_matching_tokens(model, batches: Iterable[dict], modalities: list[str],
                            device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{modality: (token states [n, L, H], mask [n, L])} of the observed rows of `modalities` over `batches` (the
    collator's dicts: `{modality}_{field}` tensors + `modality_mask`), in row order, kept on `device`; a modality
    no batch holds is left out."""
    parameter = next(model.parameters())
    chunks: dict[str, list] = {name: [] for name in modalities}
    for batch in batches:
        for name in modalities:
            prefix = f"{name}_"
            inputs = {key[len(prefix):]: value.to(parameter.device) for key, value in batch.items()
                      if key.startswith(prefix) and isinstance(value, torch.Tensor)}
            if inputs:
                states, mask = model.get_matching_tokens(name, **inputs)
                chunks[name].append((states.to(device), mask.to(device)))
    return {name: pad_tokens(parts) for name, parts in chunks.items() if parts}  # modalities no row observes: left out


__all__ = ["collect_matching_tokens", "pad_tokens"]
