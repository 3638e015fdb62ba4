"""Multi-process launches for the tests: a free rendezvous port, a clean environment, and a run that cannot hang.

    torchrun("dist_model_worker.py", str(out))                           # 2 CPU processes, gloo; fails if rc != 0
    run_launch(["accelerate", "launch", ..., "--main_process_port", free_port(), script, ...],
               env=launch_environment(out), timeout=240)

Every launch runs in its own process group with a timeout: past it, the launcher AND its worker processes are killed
(a hung rendezvous or collective would otherwise keep the workers alive after the launcher is gone) and the test
fails with the output so far.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


HERE = Path(__file__).parent
# what a launch inherits from the test process and must not: the checkout on PYTHONPATH (workers put it first
# themselves), and an outer launcher's settings (ACCELERATE_*, WORLD_SIZE)
DROPPED = ("PYTHONPATH", "ACCELERATE_", "WORLD_SIZE")


def free_port() -> str:
    """A TCP port free on this host now (the OS picks it), as a command-line argument."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_environment(out: str | Path | None = None) -> dict[str, str]:
    """This process's environment without `DROPPED`, one thread per process (2 processes on 2 cores), and, with
    `out`, a Hugging Face cache of the run's own (`out/hf_home`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED)}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if out is not None:
        env["HF_HOME"] = str(Path(out) / "hf_home")
    return env


def kill_group(process: subprocess.Popen) -> None:
    """Kill `process` and every process it started (it must have been started with `start_new_session=True`)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already
        pass


def run_launch(command: list[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `command` (a launcher and the processes it starts) and return its result; with `check`, fail the test
    unless it exits with 0. Past `timeout` seconds the whole process group is killed and the test fails."""
    process = subprocess.Popen([str(part) for part in command], env=launch_environment() if env is None else env,
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"hung: killed after {timeout} s: {' '.join(map(str, command))}\n{stderr[-4000:]}")
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C): leave no worker behind
            kill_group(process)
            process.wait()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, stderr[-4000:]
    return result


def torchrun(worker: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run tests/`worker` under torchrun on `nproc` CPU processes; it must exit with 0 within `timeout` seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(HERE / worker), *args]
    return run_launch(command, timeout=timeout)


__all__ = ["free_port", "kill_group", "launch_environment", "run_launch", "torchrun"]
