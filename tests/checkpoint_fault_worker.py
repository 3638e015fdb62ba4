"""Worker of test_checkpointing's fault injection: `python checkpoint_fault_worker.py OUTPUT_ROOT N [N ...]`.

For each N, a forked child (the imports are paid once) runs `training_fixtures.resumable_run` in OUTPUT_ROOT/kill_N
and kills itself with SIGKILL in the middle of the N-th file write of its checkpoint saves (half the bytes on
disk), as a preempted machine would. Exits non-zero when a child was not killed that way.
"""

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

import calmrl_hf.training.checkpoints as checkpointing  # noqa: E402
from training_fixtures import resumable_run  # noqa: E402


def die_at_write(kill_at: int) -> None:
    write_file, writes = checkpointing.write_file, [0]

    def write_then_die(path, data: bytes) -> None:
        writes[0] += 1
        if writes[0] == kill_at:
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        write_file(path, data)

    checkpointing.write_file = write_then_die


def main(root: str, kill_points: list[int]) -> int:
    torch.set_num_threads(1)  # the test resumes with one thread: the same float reductions
    for kill_at in kill_points:
        child = os.fork()
        if child == 0:
            die_at_write(kill_at)
            resumable_run(Path(root) / f"kill_{kill_at}")
            os._exit(0)  # not killed: the write count is not what the test expects
        _, status = os.waitpid(child, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            print(f"write {kill_at}: the run was not killed (status {status})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], [int(n) for n in sys.argv[2:]]))
