"""Which from-scratch towers learn within the avdigits budget: measured, per candidate (vision tower, audio tower).

    python -m benchmarks.avdigits.towers                 # the committed comparison (towers.md)
    python -m benchmarks.avdigits.towers --candidates resnet+resnet --seeds 1 --output ''   # one quick look

For each candidate and seed, under the benchmark's protocol (`run.experiment`: stage 1 on the narrow "backbone"
condition, stage 2 and test on the target one), this trains stage 1 (pairwise InfoNCE, full modality, text tower
frozen) and reports the base model's mean class R@1, its class R@1 in each of the 6 directions, zero-shot
accuracy of images and speech, and the stage-1 wall time; then ONE stage-2 oracle run per stage-2 learning rate
(pairwise InfoNCE on every modality of the stage-2 instances, the most stage 2 can give), its mean class R@1 and
its wall time, so the table shows oracle - base. Wall times are as measured on this machine (see `machine`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import dataclasses
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks._timing import machine
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train

from .data import AVDigits
from .run import (AUDIO_TOWERS, DIRECTIONS, QUICK, VISION_TOWERS, Sizes, build_model, build_processor, encode_splits,
                  evaluate, make_collate)


CANDIDATES = ["resnet+resnet", "vit+ast", "resnet+ast", "convnext+resnet"]
STAGE2_LEARNING_RATES = (1e-4, 3e-4)


def arguments(workdir: Path, name: str, steps: int, learning_rate: float, batch_size: int, seed: int,
              **extra) -> CalMRLTrainingArguments:
    """As `benchmarks.protocol.run_methods` sets them (warm-up 5% of the steps, text tower frozen)."""
    return CalMRLTrainingArguments(output_dir=str(workdir / name), max_steps=steps, seed=seed,
                                   per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                                   warmup_steps=max(1, steps // 20), logging_steps=10 ** 6, save_steps=10 ** 6,
                                   freeze_modalities=["text"], **extra)


def measure(candidate: str, splits, test, processor, sizes: Sizes, seed: int, workdir: Path,
            oracle: bool = True) -> dict[str, float]:
    vision, audio = candidate.split("+")
    collate = make_collate(audio)
    torch.manual_seed(seed)
    model = build_model(vision=vision, audio=audio)
    args = arguments(workdir, f"{candidate}-seed{seed}-stage1", sizes.stage1_steps, sizes.stage1_learning_rate,
                     sizes.stage1_batch_size, seed)
    accelerator = build_accelerator(args)
    start, cpu = time.perf_counter(), time.process_time()
    train(model, splits.stage1, args, collate_fn=collate, accelerator=accelerator)
    result = {"stage1_s": time.perf_counter() - start, "stage1_cpu_s": time.process_time() - cpu}
    stage1_model = accelerator.unwrap_model(model)
    stage1_model.eval()
    base = evaluate(stage1_model, processor, test, collate)
    result.update({key: base[key] for key in ["mean_class_R@1", "zero_shot_vision_top1", "zero_shot_audio_top1",
                                              *DIRECTIONS]})
    for learning_rate in STAGE2_LEARNING_RATES if oracle else ():
        model = copy.deepcopy(stage1_model)
        model.config.imputer_method = "none"  # every modality observed: nothing to impute
        args = arguments(workdir, f"{candidate}-seed{seed}-oracle-{learning_rate:g}", sizes.stage2_steps,
                         learning_rate, sizes.stage2_batch_size, seed)
        start, cpu = time.perf_counter(), time.process_time()
        train(model, splits.stage2_full, args, collate_fn=collate, accelerator=accelerator)
        result[f"stage2_s@{learning_rate:g}"] = time.perf_counter() - start
        result[f"stage2_cpu_s@{learning_rate:g}"] = time.process_time() - cpu
        model = accelerator.unwrap_model(model)
        model.eval()
        result[f"oracle@{learning_rate:g}"] = evaluate(model, processor, test, collate)["mean_class_R@1"]
    return result


def cell(values: list[float], digits: int = 1) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def seconds(runs: list[dict[str, float]], stage: str, suffix: str = "") -> str:
    wall = statistics.mean(run[f"{stage}_s{suffix}"] for run in runs)
    return f"{wall:.0f} ({statistics.mean(run[f'{stage}_cpu_s{suffix}'] for run in runs):.0f})"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    rates = [f"{rate:g}" for rate in STAGE2_LEARNING_RATES]
    header = (["towers (vision+audio)", "base mean class R@1", *[f"oracle @ lr {r}" for r in rates],
               "best oracle - base", "zero-shot vision", "zero-shot audio", "stage 1 wall s (CPU s)",
               *[f"stage-2 run @ lr {r} wall s (CPU s)" for r in rates]])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for candidate, runs in results.items():
        gain = [max(run[f"oracle@{r}"] for r in rates) - run["mean_class_R@1"] for run in runs]
        cells = [cell([run["mean_class_R@1"] for run in runs]),
                 *[cell([run[f"oracle@{r}"] for run in runs]) for r in rates], cell(gain),
                 cell([run["zero_shot_vision_top1"] for run in runs]),
                 cell([run["zero_shot_audio_top1"] for run in runs]),
                 seconds(runs, "stage1"), *[seconds(runs, "stage2", f"@{r}") for r in rates]]
        lines.append(f"| {candidate} | " + " | ".join(cells) + " |")
    directions = ["| towers (vision+audio) | " + " | ".join(d.replace("_class_R@1", "") for d in DIRECTIONS) + " |",
                  "|---|" + "---:|" * len(DIRECTIONS)]
    for candidate, runs in results.items():
        directions.append(f"| {candidate} | " + " | ".join(cell([run[d] for run in runs]) for d in DIRECTIONS) + " |")
    return "\n".join(lines) + "\n\nBase (stage 1 only) class R@1 (%) per direction:\n\n" + "\n".join(directions)


def describe_towers(candidates: list[str]) -> str:
    rows = []
    for name in sorted({c.split("+")[0] for c in candidates}):
        tower = VISION_TOWERS[name]
        rows.append(f"- vision `{name}` ({tower.image_size[0]}x{tower.image_size[1]} input): {summary(tower.config())}")
    for name in sorted({c.split("+")[1] for c in candidates}):
        tower = AUDIO_TOWERS[name]
        floor = f", floored {tower.dynamic_range_db:g} dB below the clip's peak" if tower.dynamic_range_db else ""
        rows.append(f"- audio `{name}` ([200 frames, {tower.num_mel_bins} mel] log-mel{floor}"
                    f"{' as a 1-channel image' if tower.as_image else ''}): "
                    f"{summary(tower.config())}")
    return "\n".join(rows)


def summary(config) -> str:
    keys = ["hidden_size", "num_hidden_layers", "patch_size", "embedding_size", "hidden_sizes", "depths",
            "layer_type", "num_stages", "frequency_stride", "time_stride"]
    values = config.to_dict()
    from transformers import AutoModel

    parameters = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    return (f"{type(config).__name__}(" + ", ".join(f"{k}={values[k]}" for k in keys if k in values)
            + f"), {parameters / 1e6:.2f} M parameters")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES, metavar="VISION+AUDIO",
                        help=f"vision among {list(VISION_TOWERS)}, audio among {list(AUDIO_TOWERS)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="RUNS.json",
                        help="write the table from saved runs (the .json next to an output) instead of measuring")
    parser.add_argument("--quick", action="store_true", help="CI size (a smoke test)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="change Sizes fields, e.g. stage1_steps=300 stage1_learning_rate=3e-3")
    parser.add_argument("--base-only", action="store_true", help="stage 1 only (no oracle runs)")
    parser.add_argument("--output", default="benchmarks/avdigits/towers.md", help="'' to write nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    fields = {field.name: field.type for field in dataclasses.fields(Sizes)}
    changed = {}
    for assignment in args.set:
        key, value = assignment.split("=")
        changed[key] = (float if fields[key] in ("float", float) else int)(value)
    sizes = replace(sizes, **changed)
    results: dict[str, list[dict[str, float]]] = {candidate: [] for candidate in args.candidates}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.from_json:  # runs saved by separate processes (e.g. one per seed), merged in candidate order
        for path in args.from_json:
            for candidate, runs in json.loads(path.read_text()).items():
                results.setdefault(candidate, []).extend(runs)
        results = {candidate: runs for candidate, runs in results.items() if runs}
        seeds = sorted({run["seed"] for runs in results.values() for run in runs})
        render(args, results, sizes, seeds, changed)
        return results
    world = AVDigits(sizes.clips_per_number, sizes.test_clips_per_number,
                     backbone_clips_per_number=sizes.backbone_clips_per_number)
    with tempfile.TemporaryDirectory() as workdir:
        for seed in seeds:
            encoded = {}  # per image size: the splits encoded once by that processor
            for candidate in args.candidates:
                vision, audio = candidate.split("+")
                size = (VISION_TOWERS[vision].image_size, AUDIO_TOWERS[audio].num_mel_bins)
                if size not in encoded:
                    processor = build_processor(vision, audio)
                    encoded[size] = (processor, *encode_splits(world, processor, sizes, np.random.default_rng(seed)))
                processor, splits, _, test = encoded[size]  # validation unused here
                run = {"seed": seed, **measure(candidate, splits, test, processor, sizes, seed, Path(workdir),
                                               not args.base_only)}
                results[candidate].append(run)
                print(candidate, f"seed {seed}:", {key: round(value, 1) for key, value in run.items()}, flush=True)
    if args.output:
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=1))
    if not args.base_only:
        render(args, results, sizes, seeds, changed)
    return results


def render(args, results: dict[str, list[dict[str, float]]], sizes: Sizes, seeds: list[int], changed: dict) -> None:
    text = table(results)
    print(text)
    if not args.output:
        return
    command = "python -m benchmarks.avdigits.towers" + " --quick" * args.quick + "".join(
        f" --{flag} {value}" for flag, value in (("candidates", " ".join(results) if list(results) != CANDIDATES
                                                  else None),
                                                 ("seeds", len(seeds) if len(seeds) != 2 else None),
                                                 ("first-seed", seeds[0] or None),
                                                 ("threads", args.threads),
                                                 ("set", " ".join(args.set) or None)) if value is not None)
    settings = {key: value for key, value in asdict(sizes).items()
                if key.startswith(("stage1", "stage2")) and key != "stage2_learning_rate"}
    Path(args.output).write_text(
        f"Command: `{command}`\n\n"
        f"Seeds {', '.join(map(str, seeds))} (mean ± std over seeds). Stage 1 on the backbone condition, oracle and "
        f"test on the target one; oracle: pairwise InfoNCE on every modality of the stage-2 instances, one run per "
        f"stage-2 learning rate. Settings: {settings}. Wall times measured on {machine()}, a machine shared "
        f"with other jobs, so they are inflated; CPU s: this process's CPU time.\n\n{text}\n\n"
        f"Towers:\n\n{describe_towers(list(results))}\n")


if __name__ == "__main__":
    main()
