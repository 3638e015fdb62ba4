"""Worker for test_matching's multi-process check: `torchrun --nproc_per_node 2 dist_matching_worker.py OUT`.

Each process holds a batch of a different size; the matching term draws its hard negatives from the gathered
pool. Rank 0 writes the drawn pool indices, the pool size and whether the loss and gradients are finite.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

import calmrl_hf.matching_head as fusion  # noqa: E402
import calmrl_hf.modeling_calmrl as modeling  # noqa: E402
from tiny_models import tiny_batch, tiny_config  # noqa: E402


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same weights on every process
    # pairwise InfoNCE: unlike PMRL it gathers nothing, so the two processes may hold batches of different sizes
    model = modeling.CalMRLModel(tiny_config(fusion_num_layers=1, alignment_objective="pairwise_infonce"))
    draws = []
    original = fusion.sample_hard_negatives

    def recording(similarity, positives=None, valid=None, generator=None, num_negatives=None):
        picked = original(similarity, positives, valid, generator, num_negatives)
        draws.append({"picked": picked, "positives": positives, "pool": similarity.shape[1], "valid": valid})
        return picked

    fusion.sample_hard_negatives = recording  # the matching head's plumbing draws through this name
    rows = 4 if rank == 0 else 6  # unequal batches: the pool is padded
    mask = torch.ones(rows, 4, dtype=torch.bool)
    mask[1, 1] = False
    out = model(**tiny_batch(mask, seed=rank), return_loss=True)
    out.loss.backward()
    finite = bool(torch.isfinite(out.matching_loss)) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if rank == 0:
        torch.save({"draws": draws, "finite": finite}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
