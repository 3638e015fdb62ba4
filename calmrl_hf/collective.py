"""Cross-process communication used by the objectives, kept in one place.

Only `torch.distributed` is used (no accelerate import): this file is copied into checkpoints as remote
code together with the modeling files.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithLocalGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward pass returns the gradient of this process's own slice.

    Each process computes the loss of its local rows against every process's columns, so the gradient
    w.r.t. the local slice is the sum over processes of their gradients w.r.t. it: one all-reduce.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        ctx.rank = dist.get_rank()
        ctx.local_rows = tensor.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather the rows of `tensor` [n, ...] from every process, `n` free to differ across processes (0
    included), keeping the gradient path of the local rows.

    Every process enters the same collectives whatever its `n` (the sizes first, then the rows padded to the
    largest), so unequal batches neither abort nor hang. Returns `(gathered [sum of n, ...], offset)`, the padding
    dropped, `offset` the row of this process's first row: the interface the objectives' `gather_fn` expects.
    On a single process it is `(tensor, 0)`.
    """
    if world_size() == 1:
        return tensor, 0
    padded, rows, max_rows = _gather_rows(tensor)
    # each process's rows are the first of its block of max_rows: slices, not a boolean index (no read)
    gathered = torch.cat([padded[rank * max_rows : rank * max_rows + count] for rank, count in enumerate(rows)])
    return gathered, sum(rows[: dist.get_rank()])


def gather_padded(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather a tensor whose first two sizes may differ across processes (rows; tokens of [n, L, ...] tensors).

    Pads rows (and dim 1 of tensors with 2+ dims) to the largest size of any process, gathers with the gradient
    of the local part, and returns `(gathered [world * max_rows, ...], valid_rows [world * max_rows], offset)`
    with `offset` the position of this process's first row. Bool tensors travel as uint8. On one process:
    `(tensor, all-True, 0)`.
    """
    if world_size() == 1:
        return tensor, torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device), 0
    gathered, rows, max_rows = _gather_rows(tensor)
    valid = torch.cat([torch.arange(max_rows, device=tensor.device) < count for count in rows])
    return gathered, valid, dist.get_rank() * max_rows


def _gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """(the rows of every process padded to the largest number [world * max_rows, ...], each process's number of
    rows, max_rows): the sizes travel first and are read back once, the one sync of a gather."""
    is_bool = tensor.dtype == torch.bool
    local = tensor.to(torch.uint8) if is_bool else tensor
    sizes = torch.full((2,), local.shape[0], dtype=torch.long, device=local.device)  # fills: no host-to-device copy
    sizes[1] = local.shape[1] if local.dim() > 1 else 0
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    shapes = torch.stack(all_sizes).tolist()  # [[rows, tokens] of each process]
    max_rows = max(rows for rows, _ in shapes)
    padding = [0, 0] * (local.dim() - 1) + [0, max_rows - local.shape[0]]  # F.pad order: last dim first
    if local.dim() > 1:  # token axes ([n, L, H] states, [n, L] masks) may differ too; other sizes pad by 0
        padding[-3] = max(tokens for _, tokens in shapes) - local.shape[1]  # right side of dim 1
    padded = torch.nn.functional.pad(local, padding)
    gathered = _AllGatherWithLocalGrad.apply(padded) if padded.is_floating_point() else _gather_plain(padded)
    return (gathered.bool() if is_bool else gathered), [rows for rows, _ in shapes], max_rows


def _gather_plain(tensor: torch.Tensor) -> torch.Tensor:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


__all__ = ["gather_padded", "gather_with_grad", "world_size"]
