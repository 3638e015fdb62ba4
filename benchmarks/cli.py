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
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .methods import ALL_METHODS, BASE, METHODS, TUNED_METHODS, hyperparameters_of
from .protocol import Experiment, run_methods, tune_methods
from .report import calibration_gaps, markdown_table, comparison_markdown, paired_comparisons, summarise, write_results


AGREEMENT = ["own_imputation_cosine", "true_missing_cosine"]  # `metrics.agreement_metrics`


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
    default_methods: Sequence[str] | None = None  # what a run without --methods runs (None: every method)

    @property
    def methods(self) -> list[str]:
        return list(self.default_methods or METHODS)

    @property
    def hyperparameters(self) -> Path:
        return self.folder / f"hyperparameters{self.hyperparameters_suffix}.json"

    @property
    def results(self) -> Path:
        return self.folder / f"{self.stem}.md"


def tune(benchmark: Benchmark, quick: bool, seed: int, methods: list[str], path: Path,
         processes: int | None = None) -> dict:
    """Each method's grid on the validation split of world `seed`; merges {method: best} into `path` and the
    whole grid into its `.grid.json` sibling. With `processes` > 1 the methods are split between worker processes
    (each trains the same stage-1 model: same seed, same thread count)."""
    processes = max(1, min(processes or available_cores(), len(methods)))
    groups = [methods[index::processes] for index in range(processes)]
    tuned = {}
    chosen = json.loads(path.read_text()) if path.exists() else {}
    for part in run_tasks([(tune_group, benchmark.module, quick, seed, group, chosen) for group in groups],
                          processes):
        tuned.update(part)
    tuned = {name: tuned[name] for name in [*methods, BASE]}
    chosen.update({name: entry["best"] for name, entry in tuned.items()})
    path.write_text(json.dumps(chosen, indent=1))
    grid_path = path.with_suffix(".grid.json")
    grids = json.loads(grid_path.read_text()) if grid_path.exists() else {}
    grids.update({name: {"validation": benchmark.headline, "seed": seed, "grid": entry["grid"]}
                  for name, entry in tuned.items()})
    grid_path.write_text(json.dumps(grids, indent=1))
    return tuned


def tune_group(module: str, quick: bool, seed: int, methods: list[str], chosen: dict) -> dict:
    """`tune_methods` of benchmark `module` for `methods` on world `seed`'s validation split (`chosen`: the
    hyperparameters tuned before, which methods that `inherits` extend)."""
    benchmark = importlib.import_module(module).BENCHMARK
    with tempfile.TemporaryDirectory() as workdir:
        setup, validate, _ = benchmark.experiment(benchmark.quick if quick else benchmark.sizes, seed, Path(workdir))
        return tune_methods(setup, methods, validate, benchmark.headline, chosen=chosen)


def main(benchmark: Benchmark, argv=None, default_methods: Sequence[str] | None = None) -> dict:
    default_methods = list(default_methods or benchmark.methods)
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
    if args.tune:
        if args.quick and args.hyperparameters == benchmark.hyperparameters:
            parser.error("--tune --quick would overwrite the default-size hyperparameters: give --hyperparameters")
        return tune(benchmark, args.quick, args.tune_seed, [m for m in args.methods if m in TUNED_METHODS],
                    args.hyperparameters, args.processes)
    tuned = json.loads(args.hyperparameters.read_text())
    if args.merge:
        merged = {seed: result for path in args.merge for seed, result in json.loads(path.read_text()).items()}
        seeds, per_seed = [int(seed) for seed in merged], list(merged.values())
        args.methods = list(per_seed[0])
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        per_seed = run_seeds(benchmark.module, args.quick, seeds, args.methods, tuned, args.processes)
    command = None
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
    return report(benchmark, dict(zip(seeds, per_seed)), tuned, args.output, command)


def report(benchmark: Benchmark, per_seed: dict[int, dict[str, dict[str, float]]], tuned: dict,
           output: Path | None, command: str | None) -> dict:
    """Summarise the seeds' results {seed: {method: {metric: value}}} (mean ± std, the paired calibration
    analysis), print the tables, and write them to `output` (with `command`, the command that made them) and its
    siblings: .json, .png, .calibration.json, .seeds.json, _summary.md."""
    results = list(per_seed.values())
    methods = list(results[0])
    summary = summarise(results, {name: hyperparameters_of(name, tuned) for name in methods})
    gaps = calibration_gaps(results, benchmark.family_metrics)
    comparisons = paired_comparisons(results, [*benchmark.family_metrics, *AGREEMENT])
    compared = ("Teachers, calibration and its controls, paired by seed (method - reference, mean ± std over seeds, p "
                "of the paired t-test); a calibration gain counts only over the teacher control with the same "
                "information and no imputation (`... vs PMRL + frozen teacher`):")
    text = benchmark.markdown(summary, gaps)
    if comparisons:
        text += f"\n\n{compared}\n\n{comparison_markdown(comparisons, benchmark.family_metrics)}"
        text += ("\n\nDo the towers agree with their own imputations or with the missing modality? Cosine of an "
                 "observed vision (audio) test embedding with the model's imputation of the hidden audio (vision) "
                 "from the row, and with the true one:\n\n" + markdown_table(summary, AGREEMENT, digits=3))
    print(text)
    if output:
        write_results(output, command, text, summary, title=benchmark.title,
                      recall=[(metric, metric.replace("_R@1", "")) for metric in benchmark.family_metrics],
                      siblings={"calibration": gaps, "comparisons": comparisons,
                                "seeds": {str(s): r for s, r in per_seed.items()}})
        short = benchmark.summary_markdown(summary, gaps)
        if comparisons:
            short += f"\n\n{compared}\n\n{comparison_markdown(comparisons, benchmark.family_metrics[:2])}"
        summary_path(output).write_text(f"Command: `{command}` (all tables: `{output.name}`)\n\n{short}\n")
    return summary


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_seed(module: str, quick: bool, seed: int, methods: list[str], tuned: dict) -> dict[str, dict[str, float]]:
    """One seed of benchmark `module` (stage 1, then each method's stage 2, each evaluated on the test split)."""
    benchmark = importlib.import_module(module).BENCHMARK
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as workdir:
        setup, _, evaluate = benchmark.experiment(benchmark.quick if quick else benchmark.sizes, seed, Path(workdir))
        results = run_methods(setup, methods, tuned, evaluate)
    print(f"{module} seed {seed}: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
          f"({torch_threads_in_use()} torch threads)", flush=True)
    return results


def run_seeds(module: str, quick: bool, seeds: list[int], methods: list[str], tuned: dict,
              processes: int | None = None) -> list[dict[str, dict[str, float]]]:
    """Per-seed results of benchmark `module`, in seed order (see `run_tasks`)."""
    return run_tasks([(run_seed, module, quick, seed, methods, tuned) for seed in seeds], processes)


# Torch threads per seed process: the benchmarks' towers are tiny, and one thread runs their small matrix products
# fastest (measured: `python -m benchmarks.thread_timing`, benchmarks/README.md); more only adds synchronisation.
THREADS_PER_PROCESS = 1


def run_tasks(tasks: list[tuple], processes: int | None = None, threads: int = THREADS_PER_PROCESS) -> list:
    """`function(*arguments)` for each task `(function, *arguments)`, results in task order. Seeds (and tuning
    groups) are independent, so with `processes` > 1 they run in worker processes (spawned: a fresh interpreter
    each) that split the cores between them: small models keep one core busier than two threads of one process
    keep two. Every task runs with `threads` torch threads, in a worker or in this process (then restored after).
    Tasks start in the order given (put the longest first, so the last ones to finish are short)."""
    cores = available_cores()
    processes = min(processes or cores, len(tasks))
    if processes <= 1:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return [function(*arguments) for function, *arguments in tasks]
        finally:
            torch.set_num_threads(previous)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(*task) for task in tasks]
        return [future.result() for future in futures]


def torch_threads_in_use() -> int:
    import torch

    return torch.get_num_threads()


def torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    logging.basicConfig(level=logging.WARNING)


def summary_path(output: Path) -> Path:
    """Where the short version of results `output` goes (`results.md` -> `results_summary.md`)."""
    return output.with_name(f"{output.stem}_summary.md")
