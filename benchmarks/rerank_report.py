"""Re-ranking with the matching head against the embedding ranking, paired by seed, from the committed results.

    python -m benchmarks.rerank_report      # writes benchmarks/rerank_summary.md

Reads the per-seed results of the method `CalMRL (PPCA) + matching head` (each seed's re-ranked and plain Recall
come from the same model and test split) and reports, per benchmark, direction and top K, the mean ± std over seeds
of (re-ranked - embedding) Recall, its smallest value over seeds and a paired t-test's p.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scipy import stats

from .methods import MATCHING_HEAD
from .metrics import RERANK_GALLERIES


HERE = Path(__file__).resolve().parent
SOURCES = {  # benchmark -> (per-seed results, recall name)
    "controlled": (HERE / "synthetic" / "results.seeds.json", "R"),
    "controlled, audio-visual factors": (HERE / "synthetic" / "results_av.seeds.json", "R"),
    "avdigits (class-level)": (HERE / "avdigits" / "results_matching_head.seeds.json", "class_R"),
}
RANKINGS = {"top 10": "_reranked", "top 50": "_reranked50", "head alone, top 10": "_head_only"}


def paired_rows() -> list[list[str]]:
    rows = []
    for benchmark, (path, recall) in SOURCES.items():
        seeds = [per_seed[MATCHING_HEAD] for per_seed in json.loads(path.read_text()).values()]
        for gallery in RERANK_GALLERIES:
            for k in (1, 5):
                plain = f"text->{gallery}_{recall}@{k}"
                embedding = statistics.mean(s[plain] for s in seeds)
                for ranking, suffix in RANKINGS.items():
                    gains = [s[plain + suffix] - s[plain] for s in seeds]
                    p = stats.ttest_1samp(gains, 0.0).pvalue if any(gains) else float("nan")
                    rows.append([benchmark, f"text->{gallery} R@{k}", ranking, f"{embedding:.2f}",
                                 f"{statistics.mean(s[plain + suffix] for s in seeds):.2f}",
                                 f"{statistics.mean(gains):+.2f} ± {statistics.stdev(gains):.2f}", f"{min(gains):+.2f}",
                                 f"{p:.3f}"])
    return rows


def main() -> str:
    header = ["benchmark", "recall", "re-ranking", "embedding", "re-ranked", "gain (mean ± std)", "worst seed",
              "p (paired t)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    lines += ["| " + " | ".join(row) + " |" for row in paired_rows()]
    text = ("Command: `python -m benchmarks.rerank_report` (from the per-seed results of `python -m benchmarks.run` and "
            "`python -m benchmarks.avdigits.run --methods 'CalMRL (PPCA) + matching head' --output "
            "benchmarks/avdigits/results_matching_head.md`; 5 seeds, test splits)\n\n" + "\n".join(lines) + "\n")
    (HERE / "rerank_summary.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
