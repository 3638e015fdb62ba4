"""The batch and objectives of the cross-process checks (test_collective and its torchrun workers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calmrl_hf.alignment import anchor_infonce_loss, gram_loss, pairwise_infonce_loss, pmrl_loss, triangle_loss


SPLIT = 4  # rank 0 holds rows [0, 4), rank 1 rows [4, 11): unequal batches


def objective_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm embeddings [11, 3, 8] (float64) and their mask [11, 3]: rank 0's rows never observe modalities 1
    and 2 together (no row of its own for that InfoNCE pair, none for TRIANGLE); rank 1's rows are mixed."""
    generator = torch.Generator().manual_seed(3)
    embeddings = F.normalize(torch.randn(11, 3, 8, generator=generator, dtype=torch.float64), dim=-1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 0, 1],
                         [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    return embeddings, mask


def objective_losses() -> dict:
    """name -> loss(embeddings, mask, gather_fn) for every objective (temperatures chosen away from saturation)."""
    return {
        "pmrl": lambda z, m, g: pmrl_loss(z, m, tau1=0.5, tau2=0.3, gather_fn=g),
        "gram": lambda z, m, g: gram_loss(z, m, temperature=0.3, gather_fn=g),
        "triangle": lambda z, m, g: triangle_loss(z, m, temperature=0.3, gather_fn=g),
        "anchor_infonce": lambda z, m, g: anchor_infonce_loss(z, m, anchor=0, temperature=0.3, gather_fn=g),
        "pairwise_infonce": lambda z, m, g: pairwise_infonce_loss(z, m, temperature=0.3, gather_fn=g),
    }


MODEL_SPLIT = 4  # model_batch: rank 0 rows [0, 4), rank 1 rows [4, 7)


def model_config(objective: str):
    from tiny_models import tiny_config

    return tiny_config(fusion_num_layers=1, alignment_objective=objective, imputer_method="none")


def model_batch() -> dict[str, torch.Tensor]:
    """7 rows (order: vision, audio, text, subtitle): rows 0-3 observe everything but one slot, rows 4-6 no vision
    and only row 4 a caption (text) with another modality."""
    from tiny_models import tiny_batch

    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1],
                         [0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    return tiny_batch(mask, seed=5, video=False)


def rows_of(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The inputs of batch rows `rows`: each modality's inputs hold its observed rows only, in batch order."""
    mask = batch["modality_mask"]
    order = ("vision", "audio", "text", "subtitle")
    selected = {"modality_mask": mask[rows]}
    for key, value in batch.items():
        if key == "modality_mask":
            continue
        column = order.index(key.split("_")[0])
        before = int(mask[: rows.start or 0, column].sum())
        count = int(mask[rows, column].sum())
        if count:
            selected[key] = value[before : before + count]
    return selected
