"""Sharded training on 2 CPU processes (gloo): FSDP2's `fully_shard` against DDP on the same global batches.

accelerate refuses FSDP on a machine without GPUs (`accelerate launch --use_fsdp` gives processes that see
DistributedType.NO; with `--cpu` or `--multi_gpu` it is rejected), so the worker makes the torch calls its FSDP2
plugin makes: `fully_shard` on each tower, then on the root, and `get_model_state_dict(full_state_dict=True)` as
`accelerator.get_state_dict` does.
"""

from __future__ import annotations

import pytest
import torch

from test_collective import torchrun

from calmrl_hf import CalMRLModel


pytest.importorskip("torch.distributed.fsdp", reason="needs torch's FSDP2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    for mode in ("ddp", "fsdp"):
        torchrun("dist_fsdp_worker.py", str(out), mode)
    return out, {mode: torch.load(out / f"{mode}.pt") for mode in ("ddp", "fsdp")}


def test_fsdp_trains_like_ddp_with_a_modality_missing_from_one_process(runs):
    """3 AdamW steps, rank 1 without any vision row (its vision tower runs on a placeholder row, so the
    parameter gathers and gradient reductions of both processes match): the same loss curve and final weights."""
    _, result = runs
    ddp, fsdp = result["ddp"], result["fsdp"]
    assert len(fsdp["losses"]) == 3 and fsdp["losses"][-1] < fsdp["losses"][0]
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-10, atol=1e-12)
    assert fsdp["state"].keys() == ddp["state"].keys()
    for key, value in ddp["state"].items():
        torch.testing.assert_close(fsdp["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_fsdp_full_state_saves_and_loads_exactly(runs):
    out, result = runs
    loaded = CalMRLModel.from_pretrained(out / "model_fsdp")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, result["fsdp"]["state"][key]), key
