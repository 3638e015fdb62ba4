"""Launch paths on a CPU machine: each gives one multi-process run over gloo, or refuses with what to run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from calmrl_hf.training.launch import LaunchError, check_launch, requested_processes
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, resolve_launch_settings

from launching import free_port as _port, launch_environment, run_launch


HERE = Path(__file__).parent
ACCELERATE_LAUNCH = ["python", "/usr/bin/accelerate", "launch"]


def launch(command: list[str], out: Path, *settings: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run the launch worker under `command` (a hang fails after `timeout` seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    return run_launch([*command, str(HERE / "dist_launch_worker.py"), str(out), *settings],
                      env=launch_environment(out), timeout=timeout, check=False)


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]


needs_accelerate_cli = pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate CLI")


def test_requested_processes_are_read_from_an_accelerate_launch_command(tmp_path):
    assert requested_processes([*ACCELERATE_LAUNCH, "--num_processes", "2", "train.py"]) == 2
    assert requested_processes([*ACCELERATE_LAUNCH, "--num_processes=3", "train.py"]) == 3
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\n")
    assert requested_processes([*ACCELERATE_LAUNCH, "--config_file", str(config), "train.py"]) == 4
    assert requested_processes(["python", "train.py", "--num_processes", "5"]) == 1  # not accelerate launch
    with pytest.raises(LaunchError, match=r"asked for 2 processes but started 1.*torchrun --nproc_per_node 2"):
        check_launch(1, [*ACCELERATE_LAUNCH, "--cpu", "--num_processes", "2", "train.py"])


def test_processes_the_accelerator_does_not_see_are_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match=r"started 2 processes \(WORLD_SIZE=2\) but the Accelerator sees 1"):
        check_launch(1, ["python", "train.py"])


def test_launcher_settings_apply_unless_the_arguments_set_them(tmp_path, monkeypatch):
    """None takes the launcher's (accelerate's environment variables), a value set wins over it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    args = CalMRLTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    resolved = resolve_launch_settings(args, build_accelerator(args))
    assert (resolved.mixed_precision, resolved.gradient_accumulation_steps) == ("bf16", 3)
    args = CalMRLTrainingArguments(output_dir=str(tmp_path), use_cpu=True, mixed_precision="no",
                                   gradient_accumulation_steps=2)
    accelerator = build_accelerator(args)  # a second Accelerator in the process, with other settings
    assert (accelerator.mixed_precision, accelerator.gradient_accumulation_steps) == ("no", 2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 but the Accelerator passed to train uses 2"):
        resolve_launch_settings(CalMRLTrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4),
                                accelerator)


@pytest.mark.slow
@needs_accelerate_cli
def test_a_config_file_launch_gives_one_gloo_run_and_checks_the_output_dir(tmp_path):
    """A config file (MULTI_GPU, bf16) on a machine without GPUs: 2 processes in one group (the all-reduce sums to
    2), the config's mixed precision applies. (torchrun: test_training's 2-process runs; `accelerate launch
    --multi_gpu`: the next test.) Checkpoints' output_dir check (`check_shared_output_dir`): one folder passes;
    a folder per process, as machines without a shared filesystem have, is refused on every process."""
    config = tmp_path / "config.yaml"
    config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                      f"num_machines: 1\nmachine_rank: 0\nmixed_precision: bf16\nmain_process_port: {_port()}\n")
    result = launch(["accelerate", "launch", "--config_file", str(config)], tmp_path, "check_output_dir=true")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = records(tmp_path)
    assert len(seen) == 2 and all(r["num_processes"] == 2 and r["all_reduced"] == 2.0 for r in seen)
    assert all(r["mixed_precision"] == "bf16" for r in seen)
    assert all(r["one_output_dir"] == "accepted" for r in seen)
    assert all("is not the main process's folder" in r["an_output_dir_per_process"] for r in seen)


@pytest.mark.slow
@needs_accelerate_cli
def test_accelerate_launch_flags_apply_unless_the_arguments_set_them(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: one 2-process gloo run (the
    all-reduce sums to 2), and its `--mixed_precision` applies unless the training arguments set it."""
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", _port(),
               "--mixed_precision", "bf16"]
    result = launch(command, tmp_path / "flag", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = records(tmp_path / "flag")
    assert len(seen) == 2 and all(r["num_processes"] == 2 and r["all_reduced"] == 2.0 for r in seen)
    assert [r["mixed_precision"] for r in seen] == ["bf16", "bf16"]
    result = launch(command, tmp_path / "set", "mixed_precision=no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["mixed_precision"] for r in records(tmp_path / "set")] == ["no", "no"]


@pytest.mark.slow
@needs_accelerate_cli
def test_accelerate_launch_without_multi_gpu_refuses_with_what_to_run(tmp_path):
    """`--num_processes 2` without --multi_gpu starts one process on a CPU machine: refused, with the command."""
    result = launch(["accelerate", "launch", "--num_processes", "2"], tmp_path)
    assert result.returncode != 0
    assert "accelerate launch asked for 2 processes but started 1" in result.stderr
    assert "torchrun --nproc_per_node 2" in result.stderr
    assert records(tmp_path) == []
