"""How the matching head is trained, chosen on the validation split (seed 0), never the test split.

    python -m benchmarks.matching_head --benchmark synthetic              # every variant, one process
    python -m benchmarks.matching_head --benchmark avdigits --variants 'head lr 1e-3, 4 negatives'

Each variant is CalMRL (PPCA) with a one-layer matching head (weight 0.1) trained from its own stage 1 on (the
protocol of `benchmarks.protocol.run_methods`), at the tuned stage-2 hyperparameters of CalMRL (PPCA); it differs
in the head's learning rate and warm-up and in the hard negatives per row. Reported on the validation split:
text -> vision and text -> audio Recall@1 by embedding, re-ranked (top 10 and 50, `model.rerank`'s default score:
match log-odds + contrastive logit) and by the head alone. Writes matching_head_{benchmark}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import methods
from .metrics import rerank_columns
from .protocol import run_methods


HERE = Path(__file__).resolve().parent
ARCHITECTURE = {"fusion_num_layers": 1, "fusion_num_attention_heads": 4}
VARIANTS = {  # name -> (matching_num_negatives, head_training)
    "head lr = stage lr, 1 negative (the authors')": (1, {}),
    "head lr 1e-3, 1 negative": (1, {"matching_learning_rate": 1e-3, "matching_warmup_steps": 10}),
    "head lr 1e-3, 4 negatives": (4, {"matching_learning_rate": 1e-3, "matching_warmup_steps": 10}),
    "head lr 3e-3, 8 negatives": (8, {"matching_learning_rate": 3e-3, "matching_warmup_steps": 10}),
}


def variant_method(negatives: int, head_training: dict) -> methods.Method:
    return methods.Method("PMRL", imputer="ppca", tuned_as="CalMRL (PPCA)",
                          architecture={**ARCHITECTURE, "matching_num_negatives": negatives}, head_training=head_training)


def synthetic_setup(workdir: Path):
    from .synthetic import run as synthetic

    sizes, seed = synthetic.Sizes(), 0
    setup, _, _ = synthetic.experiment(sizes, seed, workdir)
    world = synthetic.World(sizes, seed)  # the same draws as `experiment`: stage 1, stage 2, then validation
    world.sample(sizes.stage1, synthetic.FULL, factor_scale=sizes.backbone_factor_scale)
    world.sample(2 * sizes.stage2, synthetic.FULL)
    validation = world.sample(sizes.validation, synthetic.FULL)
    tuned = json.loads((synthetic.HERE / "hyperparameters.json").read_text())
    return setup, tuned, lambda model: synthetic.evaluate(model, validation), "R"


def avdigits_setup(workdir: Path):
    from .avdigits import run as avdigits

    sizes, seed = avdigits.Sizes(), 0
    setup, _, _ = avdigits.experiment(sizes, seed, workdir)
    world, processor = avdigits.world_and_processor(sizes)
    _, validation, _ = avdigits.encode_splits(world, processor, sizes, np.random.default_rng(seed))
    tuned = json.loads(avdigits.BENCHMARK.hyperparameters.read_text())
    return setup, tuned, lambda model: avdigits.evaluate(model, processor, validation), "class_R"


SETUPS = {"synthetic": synthetic_setup, "avdigits": avdigits_setup}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=list(SETUPS), required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = {f"variant: {name}": name for name in args.variants}
    for method_name, name in names.items():
        methods.ALL_METHODS[method_name] = variant_method(*VARIANTS[name])
    with tempfile.TemporaryDirectory() as workdir:
        setup, tuned, validate, recall = SETUPS[args.benchmark](Path(workdir))
        results = run_methods(setup, list(names), tuned, validate)
    columns = [c for c in rerank_columns(recall) if f"{recall}@1" in c]
    out = HERE / f"matching_head_{args.benchmark}"
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    previous.update({names[m]: {c: r[c] for c in columns} for m, r in results.items()})
    out.with_suffix(".json").write_text(json.dumps(previous, indent=1))
    rows = [f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |" for name, values in previous.items()]
    table = "\n".join([f"| variant (validation, seed 0) | {' | '.join(columns)} |", "|---" + "|---:" * len(columns) + "|",
                       *rows])
    command = f"python -m benchmarks.matching_head --benchmark {args.benchmark}" + (
        "" if args.variants == list(VARIANTS) else " --variants " + " ".join(f"'{v}'" for v in args.variants))
    text = f"Command: `{command}` (variants merged into {out.name}.json)\n\n{table}\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return previous


if __name__ == "__main__":
    main()
