"""The command line both quality benchmarks share: tune on validation, run seeds on test, write the results.

    python -m benchmarks.<name>.run --tune                       # each method's grid on the validation split
    python -m benchmarks.<name>.run --seeds N --first-seed S     # seeds S..S+N-1 at the tuned hyperparameters
    python -m benchmarks.<name>.run --quick                      # CI size
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .methods import ALL_METHODS, METHODS, TUNED_METHODS, hyperparameters_of
from .protocol import Experiment, run_methods, tune_methods
from .report import calibration_gaps, summarise, write_results


@dataclass
class Benchmark:
    """`experiment(sizes, seed, workdir)` -> (the seed's Experiment, evaluate(model, full) on validation,
    evaluate(model) on test); `markdown(summary, gaps)` -> the results text."""

    module: str  # e.g. "benchmarks.synthetic.run"
    description: str
    sizes: object
    quick: object
    experiment: Callable[..., tuple[Experiment, Callable, Callable]]
    headline: str
    family_metrics: Sequence[str]
    markdown: Callable[[dict, dict], str]
    summary_markdown: Callable[[dict, dict], str]  # the short version README.md and model_card.md carry
    title: str
    folder: Path
    stem: str = "results"  # writes {stem}.md, .json, .png; tuned values in hyperparameters{suffix}.json
    hyperparameters_suffix: str = ""

    @property
    def hyperparameters(self) -> Path:
        return self.folder / f"hyperparameters{self.hyperparameters_suffix}.json"

    @property
    def results(self) -> Path:
        return self.folder / f"{self.stem}.md"


def tune(benchmark: Benchmark, sizes, seed: int, methods: list[str], path: Path) -> dict:
    """Each method's grid on the validation split of world `seed`; merges {method: best} into `path` and the
    whole grid into its `.grid.json` sibling."""
    with tempfile.TemporaryDirectory() as workdir:
        setup, validate, _ = benchmark.experiment(sizes, seed, Path(workdir))
        tuned = tune_methods(setup, methods, validate, benchmark.headline)
    chosen = json.loads(path.read_text()) if path.exists() else {}
    chosen.update({name: entry["best"] for name, entry in tuned.items()})
    path.write_text(json.dumps(chosen, indent=1))
    grid_path = path.with_suffix(".grid.json")
    grids = json.loads(grid_path.read_text()) if grid_path.exists() else {}
    grids.update({name: {"validation": benchmark.headline, "seed": seed, "grid": entry["grid"]}
                  for name, entry in tuned.items()})
    grid_path.write_text(json.dumps(grids, indent=1))
    return tuned


def main(benchmark: Benchmark, argv=None, default_methods: Sequence[str] | None = None) -> dict:
    default_methods = list(default_methods or METHODS)
    parser = argparse.ArgumentParser(description=benchmark.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(ALL_METHODS), default=default_methods, metavar="METHOD",
                        help=f"methods to run (default: %(default)s; choices: {list(ALL_METHODS)})")
    parser.add_argument("--tune", action="store_true",
                        help="choose the methods' hyperparameters on the validation split of --tune-seed's world and "
                             "write them to --hyperparameters (the test split is not used)")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--hyperparameters", type=Path, default=benchmark.hyperparameters)
    parser.add_argument("--processes", type=int, default=None,
                        help="run the seeds in this many worker processes, the cores split between them (default: "
                             "one per core, at most one per seed)")
    parser.add_argument("--output", type=Path, default=benchmark.results)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="SEEDS_JSON",
                        help="instead of running, aggregate the per-seed results of earlier runs (their "
                             "`.seeds.json`, e.g. seeds run in parallel processes) and write --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = benchmark.quick if args.quick else benchmark.sizes
    if args.tune:
        if args.quick and args.hyperparameters == benchmark.hyperparameters:
            parser.error("--tune --quick would overwrite the default-size hyperparameters: give --hyperparameters")
        return tune(benchmark, sizes, args.tune_seed, [m for m in args.methods if m in TUNED_METHODS],
                    args.hyperparameters)
    tuned = json.loads(args.hyperparameters.read_text())
    if args.merge:
        merged = {seed: result for path in args.merge for seed, result in json.loads(path.read_text()).items()}
        seeds, per_seed = [int(seed) for seed in merged], list(merged.values())
        args.methods = list(per_seed[0])
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        per_seed = run_seeds(benchmark.module, args.quick, seeds, args.methods, tuned, args.processes)
    summary = summarise(per_seed, {name: hyperparameters_of(name, tuned) for name in args.methods})
    gaps = calibration_gaps(per_seed, benchmark.family_metrics)
    text = benchmark.markdown(summary, gaps)
    print(text)
    if args.output:
        command = (f"python -m {benchmark.module}{' --quick' if args.quick else ''} --seeds {args.seeds}"
                   f"{f' --first-seed {args.first_seed}' if args.first_seed else ''}")
        if args.merge:
            command = (f"python -m {benchmark.module} --merge {' '.join(str(p) for p in args.merge)} (seeds "
                       f"{', '.join(map(str, seeds))}; each file written by a run of: python -m {benchmark.module} "
                       f"--seeds N --first-seed S --output ...)")
        if args.processes and not args.merge:
            command += f" --processes {args.processes}"
        if args.output != benchmark.results:
            command += f" --output {args.output}"
        if args.hyperparameters != benchmark.hyperparameters:
            command += f" --hyperparameters {args.hyperparameters}"
        if args.methods != default_methods:
            command += " --methods " + " ".join(f"'{m}'" for m in args.methods)
        write_results(args.output, command, text, summary, title=benchmark.title,
                      recall=[(metric, metric.replace("_R@1", "")) for metric in benchmark.family_metrics],
                      siblings={"calibration": gaps, "seeds": {str(s): r for s, r in zip(seeds, per_seed)}})
        summary_path(args.output).write_text(f"Command: `{command}` (all tables: `{args.output.name}`)\n\n"
                                             f"{benchmark.summary_markdown(summary, gaps)}\n")
    return summary


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_seed(module: str, quick: bool, seed: int, methods: list[str], tuned: dict) -> dict[str, dict[str, float]]:
    """One seed of benchmark `module` (stage 1, then each method's stage 2, each evaluated on the test split)."""
    benchmark = importlib.import_module(module).BENCHMARK
    with tempfile.TemporaryDirectory() as workdir:
        setup, _, evaluate = benchmark.experiment(benchmark.quick if quick else benchmark.sizes, seed, Path(workdir))
        return run_methods(setup, methods, tuned, evaluate)


def run_seeds(module: str, quick: bool, seeds: list[int], methods: list[str], tuned: dict,
              processes: int | None = None) -> list[dict[str, dict[str, float]]]:
    """Per-seed results in seed order. Seeds are independent, so with `processes` > 1 they run in worker processes
    (spawned: a fresh interpreter each) that split the cores between them: small models keep one core busier than
    two threads of one process keep two."""
    cores = available_cores()
    processes = min(processes or cores, len(seeds))
    if processes <= 1:
        return [run_seed(module, quick, seed, methods, tuned) for seed in seeds]
    threads = max(1, cores // processes)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(run_seed, module, quick, seed, methods, tuned) for seed in seeds]
        return [future.result() for future in futures]


def torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    logging.basicConfig(level=logging.WARNING)


def summary_path(output: Path) -> Path:
    """Where the short version of results `output` goes (`results.md` -> `results_summary.md`)."""
    return output.with_name(f"{output.stem}_summary.md")
