"""Regenerate every quality benchmark: the controlled set and the real-signal avdigits set.

    python -m benchmarks.run            # default size, 5 seeds each, at the committed tuned hyperparameters
    python -m benchmarks.run --tune     # first re-tune every method on each benchmark's validation split
    python -m benchmarks.run --quick    # CI size, written under outputs/benchmarks_quick

Each benchmark writes its markdown table (with the command that made it), JSON and PNG plot next to its code
(`benchmarks/synthetic/results.*`, `benchmarks/avdigits/results.*`). At the default size, the summaries are also
copied into model_card.md between its `<!-- benchmarks:... -->` markers (README.md and docs/ link the tables).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from .avdigits import run as avdigits
from .cli import report, run_seed, run_tasks, summary_path
from .synthetic import run as synthetic
from .synthetic import run_av as synthetic_av


ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {"synthetic": synthetic, "synthetic_av": synthetic_av, "avdigits": avdigits}
DOCUMENTS = ("model_card.md",)


def update_document(path: Path, name: str, results: Path) -> bool:
    """Replace the text between `<!-- benchmarks:{name}:start -->` and `...:end -->` in `path` with the short
    version of `results` (its `_summary.md`). Returns False (and leaves the file alone) where the markers are
    absent."""
    text = path.read_text()
    start, end = f"<!-- benchmarks:{name}:start -->", f"<!-- benchmarks:{name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    if not pattern.search(text):
        return False
    body = summary_path(results).read_text().strip()
    path.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text))
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size; results go under --output-dir")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes per benchmark, seeds split between them (default: one per core)")
    parser.add_argument("--tune", action="store_true",
                        help="re-tune each benchmark's methods on its validation split first (writes its "
                             "hyperparameters.json)")
    parser.add_argument("--only", choices=list(BENCHMARKS), nargs="+", default=list(BENCHMARKS))
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where results go (default: next to each benchmark; outputs/benchmarks_quick with --quick)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or (ROOT / "outputs" / "benchmarks_quick" if args.quick else None)
    started = time.perf_counter()
    if args.tune and not args.quick:
        for name in args.only:
            BENCHMARKS[name].main(["--tune", *(["--processes", str(args.processes)] if args.processes else [])])
            print(f"\n{name}: tuned ({time.perf_counter() - started:.0f} s since the start)\n")
    benchmarks = {name: BENCHMARKS[name].BENCHMARK for name in args.only}
    seeds = list(range(args.seeds))
    tuned = {name: json.loads(benchmark.hyperparameters.read_text()) for name, benchmark in benchmarks.items()}
    # one pool for every benchmark's seeds, the longest (avdigits) first, so no core idles while one benchmark's
    # last seed runs
    order = sorted(benchmarks, key=lambda name: name != "avdigits")
    tasks = [(name, seed) for name in order for seed in seeds]
    results = run_tasks([(run_seed, benchmarks[name].module, args.quick, seed, benchmarks[name].methods, tuned[name])
                         for name, seed in tasks], args.processes)
    print(f"\nall seeds of {', '.join(order)}: {time.perf_counter() - started:.0f} s wall\n")
    command = "python -m benchmarks.run" + " --quick" * args.quick + "".join(
        f" --{flag} {value}" for flag, value in (("seeds", args.seeds if args.seeds != 5 else None),
                                                 ("processes", args.processes),
                                                 ("only", " ".join(args.only) if args.only != list(BENCHMARKS)
                                                  else None)) if value is not None)
    summaries = {}
    for name, benchmark in benchmarks.items():
        output = output_dir / name / benchmark.results.name if output_dir else benchmark.results
        per_seed = {seed: result for (task_name, seed), result in zip(tasks, results) if task_name == name}
        summaries[name] = report(benchmark, per_seed, tuned[name], output, command)
        if not args.quick and output_dir is None:
            for document in DOCUMENTS:
                if update_document(ROOT / document, name, output):
                    print(f"updated {document}")
    return summaries


if __name__ == "__main__":
    main()
