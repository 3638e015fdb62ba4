"""Worker for test_sharding: `torchrun --nproc_per_node 2 dist_fsdp_worker.py OUT_DIR MODE [MODE ...]` (ddp, fsdp).

Trains the tiny model with a matching head for 3 steps on the unequal split of `model_batch` (rank 1 has no vision
row, and a single row for the matching head: its negatives come from rank 0), wrapped in DDP or sharded with
FSDP2's `fully_shard` (each tower, then the root). Rank 0 writes
the loss curve and the full state dict (gathered as `accelerator.get_state_dict` gathers it), and saves the model
with `save_pretrained` to OUT_DIR/model_MODE.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from collective_fixtures import MODEL_SPLIT, model_batch, model_config, rows_of  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402


def shard_or_wrap(model: CalMRLModel, mode: str):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for tower in model.encoders.values():
        fully_shard(tower)
    return fully_shard(model)


def run(out_dir: str, mode: str) -> None:
    rank = dist.get_rank()
    local = rows_of(model_batch(), slice(0, MODEL_SPLIT) if rank == 0 else slice(MODEL_SPLIT, None))
    local = {k: v.double() if v.is_floating_point() else v for k, v in local.items()}
    torch.manual_seed(0)  # the same weights on every process
    model = CalMRLModel(model_config("pairwise_infonce")).double().eval()  # eval: no dropout
    prepared = shard_or_wrap(model, mode)
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        torch.manual_seed(1)  # the matching head's negative draws, the same in both modes
        loss = prepared(**local, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    if mode == "ddp":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"losses": losses, "state": state}, Path(out_dir) / f"{mode}.pt")
        model.save_pretrained(Path(out_dir) / f"model_{mode}", state_dict=dict(state))  # it empties the dict
    dist.barrier()


def main(out_dir: str, *modes: str) -> None:
    dist.init_process_group("gloo")
    for mode in modes:  # one after the other, in the same processes
        run(out_dir, mode)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
