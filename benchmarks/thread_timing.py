"""How many torch threads a benchmark seed should use: one method's stage 2 at 1 and 2 threads, side by side.

    python -m benchmarks.thread_timing            # default size of the controlled benchmark, best of 3 each
    python -m benchmarks.thread_timing --quick    # CI size
    python -m benchmarks.thread_timing --busy     # with one other busy process (another seed) on the machine

The benchmarks' towers are tiny (2-layer MLPs of width 64, batch 64): per step their matrix products take
microseconds, and a second thread adds synchronisation to each of them. The runs alternate between the thread
counts (1, 2, 1, 2, ...) so a machine's load drifts into both alike; the table is the best of each.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from .synthetic.run import BENCHMARK


def stage2_seconds(experiment, stage1, accelerator, method: str, hyperparameters: dict, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        experiment.train_stage2(stage1, accelerator, method, hyperparameters)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)


def spin() -> None:
    """A busy core: what another seed's process is to this one."""
    while True:
        pass


def main(argv=None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="PMRL (observed only)")
    parser.add_argument("--busy", action="store_true", help="time while one other process keeps a core busy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import json

    tuned = json.loads(BENCHMARK.hyperparameters.read_text())[args.method]
    with tempfile.TemporaryDirectory() as workdir:
        experiment, _, _ = BENCHMARK.experiment(BENCHMARK.quick if args.quick else BENCHMARK.sizes, 0, Path(workdir))
        torch.set_num_threads(1)
        stage1, accelerator = experiment.train_stage1()
        times: dict[int, list[float]] = {1: [], 2: []}
        import multiprocessing

        spinner = multiprocessing.get_context("spawn").Process(target=spin, daemon=True) if args.busy else None
        if spinner is not None:
            spinner.start()
        try:
            for _ in range(args.repeats):
                for threads in times:
                    times[threads].append(stage2_seconds(experiment, stage1, accelerator, args.method, tuned,
                                                         threads))
        finally:
            if spinner is not None:
                spinner.terminate()
    best = {threads: min(values) for threads, values in times.items()}
    print(f"{args.method}, stage 2 ({experiment.stage2.steps} steps, batch {experiment.stage2.batch_size}), "
          f"best of {args.repeats}{', one other process busy' if args.busy else ''}:\n")
    print("| torch threads | seconds |\n|---:|---:|")
    for threads, seconds in best.items():
        print(f"| {threads} | {seconds:.2f} |")
    return best


if __name__ == "__main__":
    main()
