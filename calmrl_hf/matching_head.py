"""The matching head: a fusion encoder that reads caption tokens and attends to the other modalities' tokens.

VAST / PMRL / CalMRL train a binary matching term next to the alignment loss (weight alpha = 0.1 in the paper),
computed on observed modalities only, and re-rank the top retrieval candidates with it at test time. Each
fusion layer is bidirectional self-attention over the caption tokens, cross-attention to the condition tokens
(the observed non-caption modalities of an instance, projected to the fusion width, plus a modality type
embedding) and a feed-forward block; the head classifies the first token (match / no match).

transformers 5's `BertLayer` builds cross-attention only for `is_decoder=True`, which also makes its
self-attention causal; a fusion encoder must see the whole caption, so its layers are built here.

The plumbing between the model and the head lives here too: which rows are paired, their condition tokens
(`condition_memory`), the hard negatives drawn across processes (`matching_step`), re-ranking scores
(`match_probability`, `rerank_with_head`) and the model's matching API (`MatchingHeadMixin`: `matching_step`,
`get_matching_tokens`, `rerank`). Imports torch only (and same-folder files): this file is copied into checkpoints
as remote code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import clamp_temperature
from .collective import gather_padded, world_size


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor | None = None,
                          valid: torch.Tensor | None = None, generator: torch.Generator | None = None,
                          num_negatives: int | None = None) -> torch.Tensor:
    """For each row i of `similarity` [n, m], a column j != positives[i] drawn with probability
    softmax_j(similarity[i, j]) over the `valid` columns (default: the square case, positive i = column i).

    Returns [n]; with `num_negatives` = K, [n, K]: K distinct columns per row, drawn without replacement (as many as
    the row has, repeated cyclically if it has fewer than K). The positive is never drawn; every row needs at least
    one other valid column.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [n, m], got {list(similarity.shape)}.")
    if num_negatives is not None and num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}.")
    n, m = similarity.shape
    if n == 0:  # a process without qualifying rows of its own (the others' rows were gathered all the same)
        shape = (0,) if num_negatives is None else (0, num_negatives)
        return torch.zeros(shape, dtype=torch.long, device=similarity.device)
    positives = torch.arange(n, device=similarity.device) if positives is None else positives
    allowed = torch.ones(n, m, dtype=torch.bool, device=similarity.device) if valid is None else \
        valid.unsqueeze(0).expand(n, m).clone()
    allowed[torch.arange(n, device=similarity.device), positives] = False  # exclude the positive
    available = allowed.sum(dim=1)
    if not bool((available > 0).all()):
        raise ValueError("Hard negatives need at least 2 rows: some row has no other candidate.")
    logits = similarity.detach().float().masked_fill(~allowed, float("-inf"))
    if num_negatives is None:
        return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    draws = min(num_negatives, int(available.min()))
    picked = torch.multinomial(logits.softmax(dim=1), draws, replacement=False, generator=generator)  # [n, draws]
    return picked.repeat(1, -(-num_negatives // draws))[:, :num_negatives]


class FusionEncoder(nn.Module):
    """Caption tokens [n, L, W] x condition tokens [n, M, W] -> match logits [n, 2].

    `modalities` are the model's modalities (in the order of its k axis), `caption` the one whose tokens the
    encoder reads (its tower's width is `width`); `condition_widths` the token width of each other modality.
    """

    def __init__(self, width: int, num_layers: int, num_heads: int, condition_widths: dict[str, int],
                 modalities: list[str], caption: str, dropout: float = 0.1):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"The fusion width {width} is not divisible by {num_heads} attention heads.")
        self.modalities, self.caption = list(modalities), caption
        self.token_projections = nn.ModuleDict({name: nn.Linear(w, width) for name, w in condition_widths.items()})
        self.modality_type = nn.Embedding(len(self.modalities), width)
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

        Not the N(0, initializer_range = 0.02) that transformers' `_init_weights` gives every `nn.Linear`: such a
        layer scales a vector by about 0.02 sqrt(W), and the condition reaches the [CLS] state through three of
        them (token projection, attention value, attention output), so the head would start as a function of the
        caption alone, blind to the candidate it is asked to match.
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

    def condition_memory(self, modality_mask: torch.Tensor, tokens: dict, rows: torch.Tensor):
        """Condition tokens of batch rows `rows`: their observed non-caption modalities' tokens in the fusion space,
        one block of each modality's tokens after the other, masked where a row does not observe it: ([n, M, W],
        bool mask [n, M]). Imputed modalities have no tokens: never fed.

        `tokens` maps each modality to (token states [n_m, L, H], token mask [n_m, L]) of its observed rows. Every
        modality's projection enters the graph, used or not (a zero-row block at worst), so every parameter of the
        head gets a gradient on every process: sharded engines reduce the gradients of a group of parameters
        together, and a process whose batch leaves one out would send fewer of them than the others.
        """
        blocks, block_masks = [], []
        for name, (states, state_mask) in tokens.items():
            if name == self.caption:
                continue
            index = self.modalities.index(name)
            observed = modality_mask[rows, index]  # [n]: which of the rows observe this modality
            position = (modality_mask[:, index].long().cumsum(0) - 1)[rows][observed]  # their rows among its inputs
            slots = observed.nonzero().squeeze(1)
            projected = self.condition_tokens(name, index, states)  # [n_m, L, W]
            blocks.append(projected.new_zeros(rows.numel(), *projected.shape[1:])
                          .index_put((slots,), projected[position]))
            block_masks.append(state_mask.new_zeros(rows.numel(), state_mask.shape[1])
                               .index_put((slots,), state_mask[position]))
        if not blocks:
            raise ValueError(f"The matching head needs tokens of a modality other than {self.caption!r}.")
        # cross-attention has no key positions: the order of the keys, padding included, changes nothing
        return torch.cat(blocks, dim=1), torch.cat(block_masks, dim=1).bool()

    def matching_step(self, embeddings: torch.Tensor, modality_mask: torch.Tensor, tokens: dict, temperature,
                      gather: bool = False, num_negatives: int = 1) -> torch.Tensor | None:
        """The matching term with hard negatives, over the rows observing the caption and another modality.

        Per row: the positive pair, `num_negatives` negative conditions for its caption and as many negative
        captions for its condition, each drawn in proportion to softmax(alignment similarity / temperature) from the
        batch (of every process with `gather`), the positive excluded, without replacement. `embeddings` [B, k, D]
        and `modality_mask` [B, k] are the observed ones. The positives are weighted so that they count as much as
        the negatives together (the paper's 1 : 2 balance, whatever `num_negatives`). Returns None when fewer than
        two rows qualify (in the batches of every process with `gather`: every process enters the same gathers
        whatever its batch holds, and all return None together). With `gather`, the loss is this process's share:
        world size x the sum over its pairs / all pairs.
        """
        gather = gather and world_size() > 1
        caption_index = self.modalities.index(self.caption)
        others = torch.ones(len(self.modalities), dtype=torch.bool, device=modality_mask.device)
        others[caption_index] = False
        rows = (modality_mask[:, caption_index] & (modality_mask & others).any(dim=1)).nonzero().flatten()
        if rows.numel() < 2 and not gather:
            return None
        pairs = self._local_pairs(embeddings, modality_mask, tokens, rows, caption_index, others)
        # negatives come from the batch of every process (padded gather; the local part keeps its gradient)
        pool = [gather_padded(t) if gather else (t, None, 0) for t in pairs]
        (all_captions, valid, offset), (all_captions_mask, _, _), (all_memory, _, _), (all_memory_mask, _, _), \
            (all_caption_embeds, _, _), (all_condition_embeds, _, _) = pool
        total = rows.numel() if valid is None else int(valid.sum())
        if total < 2:
            return None
        caption_embeds, condition_embeds = pairs[4], pairs[5]
        n, k = rows.numel(), num_negatives
        own = torch.arange(n, device=rows.device) + offset  # the local rows among the gathered ones
        temperature = clamp_temperature(temperature)
        negative_condition = sample_hard_negatives(caption_embeds @ all_condition_embeds.T / temperature,
                                                   own, valid, num_negatives=k).flatten()  # [n k]: row-major
        negative_caption = sample_hard_negatives(condition_embeds @ all_caption_embeds.T / temperature,
                                                 own, valid, num_negatives=k).flatten()
        own_k = own.repeat_interleave(k)  # each local row once per negative
        pair_captions = torch.cat([all_captions[own], all_captions[own_k], all_captions[negative_caption]])
        pair_captions_mask = torch.cat([all_captions_mask[own], all_captions_mask[own_k],
                                        all_captions_mask[negative_caption]])
        pair_memory = torch.cat([all_memory[own], all_memory[negative_condition], all_memory[own_k]])
        pair_memory_mask = torch.cat([all_memory_mask[own], all_memory_mask[negative_condition],
                                      all_memory_mask[own_k]])
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n * k)]).long().to(rows.device)
        # positive : negative weight k : 1, so their totals keep the 1 : 2 balance of k = 1 (weights sum to 3n)
        weights = torch.cat([torch.full((n,), 3.0 * k / (2 * k + 1)),
                             torch.full((2 * n * k,), 3.0 / (2 * k + 1))]).to(rows.device)
        logits = self(pair_captions, pair_captions_mask, pair_memory, pair_memory_mask)  # [(2k + 1) n, 2]
        share = world_size() * n / total if gather else 1.0
        return matching_loss(logits, labels, share, weights)

    def _local_pairs(self, embeddings, modality_mask, tokens, rows, caption_index, others):
        """(caption tokens, their mask, condition tokens, their mask, caption embeddings, condition embeddings) of
        the batch rows `rows` (none at all is fine: zero-row tensors of the right widths)."""
        caption_states, caption_mask = tokens[self.caption]
        caption_position = modality_mask[:, caption_index].long().cumsum(0) - 1
        captions, captions_mask = caption_states[caption_position[rows]], caption_mask[caption_position[rows]]
        memory, memory_mask = self.condition_memory(modality_mask, tokens, rows)  # zero rows when none qualify
        # similarity of caption i and condition j: caption embedding vs mean of j's observed other embeddings
        condition_embeds = F.normalize((embeddings[rows] * (modality_mask[rows] & others).unsqueeze(-1)).sum(dim=1),
                                       dim=-1)
        return captions, captions_mask, memory, memory_mask, embeddings[rows, caption_index], condition_embeds

    def match_logits(self, caption_states: torch.Tensor, caption_mask: torch.Tensor, tokens: dict) -> torch.Tensor:
        """Match log-odds [n] = logit(match) - logit(no match) of n (caption, condition) pairs: caption tokens
        [n, L, H] and mask [n, L], and `tokens` {condition modality: (states [n, M, H], mask [n, M])}, all n rows
        observed."""
        n = caption_states.shape[0]
        mask = torch.zeros(n, len(self.modalities), dtype=torch.bool, device=caption_states.device)
        for name, (states, _) in tokens.items():
            if states.shape[0] != n:
                raise ValueError(f"condition {name!r} has {states.shape[0]} rows for {n} captions.")
            mask[:, self.modalities.index(name)] = True
        memory, memory_mask = self.condition_memory(mask, tokens, torch.arange(n, device=mask.device))
        logits = self(caption_states, caption_mask, memory, memory_mask).float()
        return logits[:, 1] - logits[:, 0]

    def match_probability(self, caption_states: torch.Tensor, caption_mask: torch.Tensor,
                          tokens: dict) -> torch.Tensor:
        """P(match) [n] = sigmoid(match log-odds) of n (caption, condition) pairs (see `match_logits`)."""
        return torch.sigmoid(self.match_logits(caption_states, caption_mask, tokens))


def matching_loss(logits: torch.Tensor, labels: torch.Tensor, share: float = 1.0,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary matching cross-entropy over positive (label 1) and negative (label 0) pairs: their (`weights`-weighted)
    mean, times `share` (a process's part of pairs gathered from every process); 0 for no pair (still in the
    graph)."""
    if labels.numel() == 0:
        return logits.float().sum() * 0.0
    if weights is None:
        return F.cross_entropy(logits.float(), labels) * share
    # sum_i w_i CE_i / sum_i w_i
    per_pair = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_pair * weights).sum() / weights.sum() * share


def rerank_top_k(similarity: torch.Tensor, score_fn: Callable, k: int) -> torch.Tensor:
    """Re-rank each query's top-`k` gallery items by `score_fn` (e.g. a matching head), as VAST does with K = 50.

    `score_fn(query_indices, gallery_indices) -> scores` scores the Q x k candidate pairs (flat index tensors).
    Returns a [Q, G] score matrix whose ranking puts the top-k candidates first, ordered by their scores, and the
    other items after them in their original order; feed it to `recall_at_k`.
    """
    num_queries, gallery = similarity.shape
    k = min(k, gallery)
    top = similarity.topk(k, dim=1).indices  # [Q, k]
    queries = torch.arange(num_queries, device=similarity.device).unsqueeze(1).expand(-1, k)
    scores = score_fn(queries.reshape(-1), top.reshape(-1)).reshape(num_queries, k).to(similarity.dtype)
    # everything outside the top-k goes below every re-ranked candidate, keeping its own order
    reranked = scores.min() - 1.0 - (similarity.max() - similarity)
    return reranked.scatter(1, top, scores)


def rerank_with_head(fusion, similarity: torch.Tensor, query_tokens: tuple[torch.Tensor, torch.Tensor],
                     gallery_tokens: dict[str, tuple[torch.Tensor, torch.Tensor]], top_k: int, batch_size: int,
                     similarity_weight: float, logit_scale: torch.Tensor) -> torch.Tensor:
    """[Q, G] scores whose ranking re-orders each query's top-`top_k` by
    score(q, g) = match log-odds(q, g) + similarity_weight * exp(logit_scale) * similarity(q, g)
    (the head alone with weight 0, VAST's re-ranking; the contrastive logit added as a second expert otherwise)."""
    query_states, query_mask = query_tokens
    if query_states.shape[0] != similarity.shape[0]:
        raise ValueError(f"similarity has {similarity.shape[0]} queries but the query tokens hold "
                         f"{query_states.shape[0]} rows.")
    for name, (states, _) in gallery_tokens.items():
        if states.shape[0] != similarity.shape[1]:
            raise ValueError(f"similarity has {similarity.shape[1]} gallery items but the {name!r} tokens hold "
                             f"{states.shape[0]} rows.")
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size and top_k must be >= 1, got {batch_size} and {top_k}.")
    device = fusion.head.weight.device
    contrastive_scale = float(logit_scale.exp()) * similarity_weight

    def score(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, queries.numel(), batch_size):
            q, g = queries[start:start + batch_size], candidates[start:start + batch_size]
            caption = query_states[q.to(query_states.device)].to(device)
            caption_mask = query_mask[q.to(query_mask.device)].to(device)
            tokens = {name: (states[g.to(states.device)].to(device), mask[g.to(mask.device)].to(device))
                      for name, (states, mask) in gallery_tokens.items()}
            scores.append(fusion.match_logits(caption, caption_mask, tokens).to(similarity.device))
        logits = torch.cat(scores) if scores else similarity.new_zeros(0)
        return logits + contrastive_scale * similarity[queries, candidates].float()

    return rerank_top_k(similarity, score, top_k)


class MatchingHeadMixin:
    """The matching head's API of `CalMRLModel`: the training term (`matching_step`) and re-ranking
    (`get_matching_tokens`, `rerank`), over the model's `fusion` encoder (None without a head), its towers
    (`_run_modality`) and its temperature."""

    def matching_step(self, embeddings: torch.Tensor, modality_mask: torch.Tensor, tokens: dict):
        """The matching term with hard negatives (`FusionEncoder.matching_step`), drawn from the batch of every
        process when `config.gather_across_processes`; None when fewer than two rows qualify."""
        return self.fusion.matching_step(embeddings, modality_mask, tokens, self.temperature,
                                         gather=self.config.gather_across_processes,
                                         num_negatives=self.config.matching_num_negatives)

    def _require_matching_head(self) -> None:
        if self.fusion is None:
            raise ValueError("This model has no matching head: set fusion_num_layers > 0 in its config.")

    @torch.no_grad()
    def get_matching_tokens(self, modality: str, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [n, L, H] and bool mask [n, L] of `modality`'s tower on `inputs` (e.g. input_ids,
        attention_mask): what the matching head reads, to cache for `rerank`."""
        self._require_matching_head()
        out = self._run_modality(modality, inputs, {})
        return out.last_hidden_state, out.token_mask

    @torch.no_grad()
    def rerank(self, similarity: torch.Tensor, query_tokens: tuple[torch.Tensor, torch.Tensor],
               gallery_tokens: dict[str, tuple[torch.Tensor, torch.Tensor]], top_k: int = 50,
               batch_size: int = 256, similarity_weight: float = 1.0) -> torch.Tensor:
        """Re-rank each query's top-`top_k` gallery items with the matching head (VAST / PMRL: top 50).

        `similarity` [Q, G] ranks the gallery (e.g. `logits_per_text_vision`, or cosines); `query_tokens` are the
        caption modality's (states [Q, L, H], mask [Q, L]) and `gallery_tokens` {modality: (states [G, M, H],
        mask [G, M])}, both from `get_matching_tokens` (or `reranking.collect_matching_tokens` over a dataset).
        Candidates are scored by match log-odds + `similarity_weight` x exp(logit_scale) x similarity (weight 0:
        the head alone), `batch_size` pairs at a time on the model's device. Returns [Q, G] scores: the top-k in
        their new order, every other item below them in its old order (give it to `evaluation.recall_at_k`).
        """
        self._require_matching_head()
        return rerank_with_head(self.fusion, similarity, query_tokens, gallery_tokens, top_k, batch_size,
                                similarity_weight, self.clamped_logit_scale())


__all__ = ["FusionEncoder", "MatchingHeadMixin", "matching_loss", "rerank_top_k", "rerank_with_head",
           "sample_hard_negatives"]
