"""Worker for test_collective: `torchrun --nproc_per_node 2 dist_objectives_worker.py OUT_DIR`.

Every objective on the rows of `objective_batches` (shared with the test): rank 0 holds the first `SPLIT` rows,
rank 1 the rest (unequal batches; rank 0 has no row observing both modalities 1 and 2, and one complete row),
the negatives gathered with `collective.gather_with_grad`. Each rank writes its loss and the gradient of its
rows to OUT_DIR/rank_R.pt; the test compares them with the single-process loss on the whole batch.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from collective_fixtures import SPLIT, objective_batches, objective_losses  # noqa: E402

from calmrl_hf.collective import gather_with_grad  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    embeddings, mask = objective_batches()
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    record = {}
    for name, loss_fn in objective_losses().items():
        local = embeddings[rows].clone().requires_grad_(True)
        loss = loss_fn(local, mask[rows], gather_with_grad)
        loss.backward()
        record[name] = {"loss": loss.detach(), "grad": local.grad}
    torch.save(record, Path(out_dir) / f"rank_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
