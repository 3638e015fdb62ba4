"""How the processes of a run were launched, checked before anything trains.

`torchrun`, `accelerate launch --multi_gpu` and an `accelerate config` with `distributed_type: MULTI_GPU` start N
processes and say so in `WORLD_SIZE`; on a machine without GPUs a plain `Accelerator()` then sees one process in
each of them (N separate runs writing one output_dir), so `wants_cpu_processes` turns them into one N-process run
over gloo. `accelerate launch --num_processes N` without `--multi_gpu` (and `--cpu`, or `distributed_type:
MULTI_CPU`) starts ONE process on such a machine (multi-CPU needs mpirun); `requested_processes` reads the launch
command of the parent process (Linux' /proc) so that this is refused with the command to run instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class LaunchError(RuntimeError):
    """The processes that started are not the ones the launch asked for; the message says what to run instead."""


def launched_processes() -> int:
    """Processes the launcher started (`WORLD_SIZE`, set by torchrun and by `accelerate launch --multi_gpu`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_cpu_processes() -> bool:
    """Several processes on a machine with no accelerator device: they can only be CPU processes (gloo)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA alone before
    device_available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return launched_processes() > 1 and not device_available


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _config_processes(config_file: str | None) -> int:
    """`num_processes` of an `accelerate config` file (the given one, or accelerate's default), 1 without one."""
    if config_file is None:
        from accelerate.commands.config import default_config_file

        config_file = default_config_file
    path = Path(config_file)
    if not path.is_file():
        return 1
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else None
    except yaml.YAMLError:
        return 1
    return int((values or {}).get("num_processes") or 1)


def requested_processes(parent_argv: list[str] | None = None) -> int:
    """Processes an `accelerate launch` parent asked for (`--num_processes`, else its config file's), or
    `launched_processes()` when this process was not started by `accelerate launch`."""
    if parent_argv is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return launched_processes()
        parent_argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    is_accelerate_launch = any(Path(a).name == "accelerate" for a in parent_argv[:2]) and "launch" in parent_argv
    if not is_accelerate_launch:
        return launched_processes()
    flag = _flag_value(parent_argv, "--num_processes")
    return int(flag) if flag is not None else _config_processes(_flag_value(parent_argv, "--config_file"))


def check_launch(num_processes: int, parent_argv: list[str] | None = None) -> None:
    """Refuse a run whose Accelerator sees `num_processes` while the launch started or asked for another number."""
    started, asked = launched_processes(), requested_processes(parent_argv)
    wanted = max(started, asked)
    if wanted == num_processes:
        return
    instead = (f"torchrun --nproc_per_node {wanted} SCRIPT ... (or accelerate launch --multi_gpu --num_processes "
               f"{wanted} SCRIPT ...; on a machine without GPUs both give {wanted} CPU processes over gloo)")
    if started != num_processes:
        raise LaunchError(f"The launcher started {started} processes (WORLD_SIZE={started}) but the Accelerator sees "
                          f"{num_processes}: every process would train on its own and write the same output_dir. "
                          f"Run {instead}, or pass use_cpu=True / --cpu for CPU processes.")
    raise LaunchError(f"accelerate launch asked for {asked} processes but started {started} (without --multi_gpu, "
                      f"or with --cpu / distributed_type MULTI_CPU, it starts one process unless mpirun is set up). "
                      f"Run {instead}.")


__all__ = ["LaunchError", "check_launch", "launched_processes", "requested_processes", "wants_cpu_processes"]
