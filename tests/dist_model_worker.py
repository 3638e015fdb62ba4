"""Worker for test_collective: `torchrun --nproc_per_node 2 dist_model_worker.py OUT_DIR`.

The tiny model with a matching head on the batch of `model_batch` (shared with the test), split unequally: rank 0
holds rows [0, 4) with every modality, rank 1 rows [4, 7) with no vision at all and a single row that qualifies
for the matching term. Each rank records which towers ran, its losses, and which parameters got a gradient.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from collective_fixtures import MODEL_SPLIT, model_batch, model_config, rows_of  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batch = model_batch()
    local = rows_of(batch, slice(0, MODEL_SPLIT) if rank == 0 else slice(MODEL_SPLIT, None))
    record = {}
    for objective in ("pmrl", "pairwise_infonce", "gram"):
        torch.manual_seed(0)  # the same weights on every process
        model = CalMRLModel(model_config(objective)).eval()  # eval: no dropout, so processes and reference agree
        calls = []
        for name, tower in model.encoders.items():
            tower.register_forward_hook(lambda *_, name=name: calls.append(name))
        out = model(**local, return_loss=True)
        out.loss.backward()
        record[objective] = {
            "alignment_loss": out.alignment_loss.detach(), "matching_loss": out.matching_loss.detach(),
            "towers": sorted(set(calls)), "no_grad": [n for n, p in model.named_parameters() if p.grad is None],
        }
    torch.save(record, Path(out_dir) / f"rank_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
