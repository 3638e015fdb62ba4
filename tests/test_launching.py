"""The tests' launch helper (tests/launching.py): a hung launch fails its test and leaves no worker behind."""

import os
import sys
import time

import pytest

from launching import free_port, launch_environment, run_launch

# a "launcher" that starts a worker, writes the worker's pid to {output}, and both hang
HANGING_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({output!r}, "w").write(str(worker.pid))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (killed, not yet reaped by init) counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow  # waits out its 3 s timeout
def test_a_hung_launch_fails_and_its_workers_are_killed(tmp_path):
    output = tmp_path / "pid.txt"
    script = HANGING_LAUNCHER.format(output=str(output))
    started = time.perf_counter()
    with pytest.raises(pytest.fail.Exception, match="hung: killed after 3 s"):
        run_launch([sys.executable, "-c", script], timeout=3)
    assert time.perf_counter() - started < 30
    worker = int(output.read_text())
    deadline = time.perf_counter() + 10
    while _alive(worker) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_a_failed_launch_fails_with_its_stderr_and_the_environment_is_clean(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = launch_environment("/tmp/run")
    assert "ACCELERATE_MIXED_PRECISION" not in env and "PYTHONPATH" not in env
    assert env["HF_HOME"] == "/tmp/run/hf_home" and env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(AssertionError, match="worker error"):
        run_launch([sys.executable, "-c", "import sys; sys.exit('worker error')"], timeout=60)
    assert run_launch([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60, check=False).returncode == 3
    assert 0 < int(free_port()) < 65536
