"""The paper-scale training step on one GPU: the towers of `recipes/configs/vast.yaml` at their real sizes.

    python -m benchmarks.bench_gpu                     # one CUDA GPU, meant to take under 5 minutes
    python -m benchmarks.bench_gpu --compile off       # without the compiled rows
    python -m benchmarks.bench_gpu --sizes tiny        # tiny towers, on CPU where there is no GPU (seconds)

The model is vast.yaml's (its `model.config` section: projection 512, q = 64, PMRL, the matching head) around towers
built from their configs with random weights (no download; the sizes of the named checkpoints are in
`TOWER_CONFIGS`); the training arguments are vast.yaml's stage 2 (batch 64, bf16, the paper's calibration, EMA
imputer statistics) without data, evaluation or checkpoints. A batch is 64 rows, half video + caption (8 frames of
224 x 224), half audio + caption (AST's 1024 x 128 log-mel map), captions of 40 tokens: stage 2's two corpora. Each
row of the table starts from a copy of one randomly initialised model and runs the package's training step
(`calmrl_hf.training.loop.train_step`: the imputer step inside forward, loss, backward, clipping, AdamW, schedule)
with the towers' attention in SDPA or eager, compiled (`calmrl_hf.training.compiling.compile_model`) or not. Time
per step: `--warmup` steps (compilation and the imputer's first M-steps included), then `--steps` timed with CUDA
events; the imputer's share is the time between events around the imputer step (batch statistics, all-reduce, EMA,
M-step) in the same steps. Peak memory: `torch.cuda.max_memory_allocated` over the row (model, AdamW state,
activations). A row that runs out of memory says so; rows that would end past `--budget_s` are reported as skipped,
so that the script ends within 5 minutes on one H100 (not yet run on a GPU: no figure exists).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import logging
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import ASTConfig, BertConfig, CLIPVisionConfig

from calmrl_hf import CalMRLConfig, CalMRLModel
from calmrl_hf.recipe.run import DEFAULT_CONFIG
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator
from calmrl_hf.training.calibration import Calibration
from calmrl_hf.training.imputer_step import ImputerUpdater
from calmrl_hf.training.loop import train_step
from calmrl_hf.training.setup import build_optimizer

from ._timing import machine


VAST_RECIPE = Path(DEFAULT_CONFIG).with_name("vast.yaml")

# The config of each checkpoint vast.yaml names, as its config.json on the Hub gives it (random weights here).
TOWER_CONFIGS = {
    # openai/clip-vit-base-patch16: the vision half of CLIP ViT-B/16
    "openai/clip-vit-base-patch16": lambda: CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    # MIT/ast-finetuned-audioset-10-10-0.4593: AST, 16 x 16 patches every 10 frames and 10 mel bins
    "MIT/ast-finetuned-audioset-10-10-0.4593": lambda: ASTConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        frequency_stride=10, time_stride=10, max_length=1024, num_mel_bins=128, qkv_bias=True),
    # bert-base-uncased
    "bert-base-uncased": lambda: BertConfig(
        vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=512, type_vocab_size=2),
}

# Small towers of the same kinds, for `--sizes tiny` (the script's code paths on CPU in seconds).
TINY_TOWERS = {
    "vision": lambda: CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16),
    "audio": lambda: ASTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               patch_size=16, frequency_stride=16, time_stride=16, max_length=64, num_mel_bins=32),
    "text": lambda: BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=64),
}


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """One batch: `rows` rows, half video + caption, half audio + caption."""

    rows: int = 64
    num_frames: int = 8  # vast.yaml's processor.num_frames
    image_size: int = 224
    audio_frames: int = 1024  # AST's max_length (10 ms frames)
    mel_bins: int = 128
    text_length: int = 40  # vast.yaml's processor.max_length
    vocab_size: int = 30522


TINY_BATCH = BatchSizes(rows=8, num_frames=2, image_size=32, audio_frames=64, mel_bins=32, text_length=8,
                        vocab_size=128)
TINY_MODEL = {"projection_dim": 16, "imputer_latent_dim": 4, "fusion_num_layers": 1}


def recipe() -> dict:
    return yaml.safe_load(VAST_RECIPE.read_text())


def build_config(sizes: str, attention: str) -> CalMRLConfig:
    """vast.yaml's model: its towers (`TOWER_CONFIGS`, or `TINY_TOWERS`) and its config section."""
    model = recipe()["model"]
    if sizes == "tiny":
        towers = {name: make() for name, make in TINY_TOWERS.items()}
        settings = {**model["config"], **TINY_MODEL}
    else:
        unknown = [spec for spec in model["towers"].values() if spec not in TOWER_CONFIGS]
        if unknown:
            raise ValueError(f"{VAST_RECIPE} names towers {unknown} that TOWER_CONFIGS has no sizes for; add their "
                             f"config.json values there.")
        towers = {name: TOWER_CONFIGS[spec]() for name, spec in model["towers"].items()}
        settings = dict(model["config"])
    return CalMRLConfig(encoder_configs=towers, attn_implementation=attention, **settings)


def stage_arguments(output_dir: str, sizes: str) -> CalMRLTrainingArguments:
    """vast.yaml's stage 2 without data, evaluation, checkpoints, trackers or warm start; on CPU for tiny sizes."""
    stage = recipe()["stage2"]
    for key in ("save_steps", "eval_steps", "report_to", "imputer_warm_start"):
        stage.pop(key, None)
    cpu = sizes == "tiny" and not torch.cuda.is_available()
    if sizes == "tiny":
        stage["per_device_train_batch_size"] = TINY_BATCH.rows
    return CalMRLTrainingArguments(**stage, output_dir=output_dir, use_cpu=cpu)


def make_batch(sizes: BatchSizes, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows 0 .. rows/2 - 1 video + caption, the rest audio + caption (modalities vision, audio, text, subtitle)."""
    generator = torch.Generator().manual_seed(seed)
    videos = sizes.rows // 2
    clips = sizes.rows - videos
    mask = torch.zeros(sizes.rows, 4, dtype=torch.bool)
    mask[:videos, 0] = mask[videos:, 1] = mask[:, 2] = True
    ids = torch.randint(1, sizes.vocab_size, (sizes.rows, sizes.text_length), generator=generator)
    batch = {
        "modality_mask": mask,
        "vision_pixel_values": torch.randn(videos, sizes.num_frames, 3, sizes.image_size, sizes.image_size,
                                           generator=generator),
        "audio_input_values": torch.randn(clips, sizes.audio_frames, sizes.mel_bins, generator=generator),
        "text_input_ids": ids,
        "text_attention_mask": torch.ones_like(ids),
    }
    return {key: value.to(device) for key, value in batch.items()}


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no sync until read), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def milliseconds(self, start, end) -> float:
        if not self.cuda:
            return 1e3 * (end - start)
        torch.cuda.synchronize()
        return start.elapsed_time(end)


class TimedImputerStep:
    """The run's `ImputerUpdater`, with a mark before and after each call while `timing` is on."""

    def __init__(self, updater: ImputerUpdater, clock: Clock):
        self.updater, self.clock, self.timing, self.marks = updater, clock, False, []

    @torch.compiler.disable  # run as the loop's imputer step runs: eagerly, outside any compiled graph
    def __call__(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> None:
        start = self.clock.mark() if self.timing else None
        self.updater(embeddings, modality_mask)
        if self.timing:
            self.marks.append((start, self.clock.mark()))


def compile_function():
    """`calmrl_hf.training.compiling.compile_model` (compiles a model in place), or a clear error without it."""
    try:
        from calmrl_hf.training.compiling import compile_model
    except ImportError as error:
        raise RuntimeError(f"The compiled rows need calmrl_hf.training.compiling.compile_model, which this checkout "
                           f"lacks ({error}); run with --compile off.") from error
    return compile_model


def measure_row(initial: CalMRLModel, sizes: str, attention: str, compiled: bool, warmup: int, steps: int,
                output_dir: str) -> dict[str, float]:
    """A copy of the `initial` model with `attention`, `warmup` + `steps` training steps on one batch; times,
    throughput and peak memory."""
    args = stage_arguments(output_dir, sizes)
    accelerator = build_accelerator(args)
    device = accelerator.device
    model = copy.deepcopy(initial)  # every row starts from the same weights, on the CPU until prepare moves it
    model.set_attn_implementation(attention)
    if compiled:
        compile_function()(model)
    optimizer, scheduler = build_optimizer(model, args, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    clock = Clock(device)
    unwrapped = accelerator.unwrap_model(model)  # once, as train() takes it
    imputer_step = TimedImputerStep(ImputerUpdater(unwrapped, accelerator, args), clock)
    calibration = Calibration(unwrapped, args, None, accelerator)
    batch = make_batch(TINY_BATCH if sizes == "tiny" else BatchSizes(), device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step(accelerator, model, optimizer, scheduler, imputer_step, calibration, batch, args.max_grad_norm,
                   unwrapped)
    imputer_step.timing = True
    start = clock.mark()
    for _ in range(steps):
        train_step(accelerator, model, optimizer, scheduler, imputer_step, calibration, batch, args.max_grad_norm,
                   unwrapped)
    step_ms = clock.milliseconds(start, clock.mark()) / steps
    imputer_ms = sum(clock.milliseconds(a, b) for a, b in imputer_step.marks) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rows = batch["modality_mask"].shape[0]
    return {"step_ms": step_ms, "steps_per_s": 1e3 / step_ms, "samples_per_s": 1e3 * rows / step_ms,
            "peak_gib": peak, "imputer_ms": imputer_ms, "imputer_share": imputer_ms / step_ms}


def rows_to_run(compile_choice: str) -> list[tuple[str, bool]]:
    compiled = {"off": [False], "on": [True], "both": [False, True]}[compile_choice]
    return [(attention, flag) for flag in compiled for attention in ("sdpa", "eager")]


def over_budget(elapsed: float, budget: float, compiled: bool, durations: dict[bool, float]) -> bool:
    """A row is skipped when it would end past `budget` seconds, judged by the last row of its kind (compiled or
    not); the first of a kind starts whenever the budget is not spent."""
    return elapsed + durations.get(compiled, 0.0) > budget


def format_row(attention: str, compiled: bool, result: dict | str) -> str:
    head = f"| {attention} | {'yes' if compiled else 'no'} |"
    if isinstance(result, str):
        return head + f" {result} |" + " |" * 5
    peak = "n/a (CPU)" if result["peak_gib"] != result["peak_gib"] else f"{result['peak_gib']:.1f}"
    return (head + f" {result['step_ms']:.1f} | {result['steps_per_s']:.2f} | {result['samples_per_s']:.0f} | "
            f"{peak} | {result['imputer_ms']:.2f} | {100 * result['imputer_share']:.1f}% |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=["vast", "tiny"], default="vast")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    # 5: the imputer's first M-step of vision and audio waits for 2 (q + 1) = 130 rows (32 a step, EMA 0.99), after
    # which imputed columns enter the objective; the timed steps are the steady state
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row (compilation included)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--budget_s", type=float, default=285.0,
                        help="a row that would end past this many seconds (judged by the last row of its kind) is "
                             "reported as skipped")
    args = parser.parse_args(argv)
    if args.sizes != "tiny" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu measures the paper-scale step on a CUDA GPU and found none "
                         "(torch.cuda.is_available() is False). Run it on a GPU machine, or with --sizes tiny to "
                         "exercise the script on CPU.")
    if args.compile != "off":
        compile_function()  # missing: say so before any row runs
    # the recipe's stage 2 is the paper's calibration, which Calibration warns about once per row: known here
    logging.getLogger("calmrl_hf.training.calibration").setLevel(logging.ERROR)

    start = time.perf_counter()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"Machine: {machine()}; device: {device}\n")
    sizes = TINY_BATCH if args.sizes == "tiny" else BatchSizes()
    print(f"{VAST_RECIPE.name} towers ({args.sizes} sizes), batch {sizes.rows} (half {sizes.num_frames} frames of "
          f"{sizes.image_size}^2 + caption, half {sizes.audio_frames} x {sizes.mel_bins} log-mel + caption, "
          f"{sizes.text_length} tokens), bf16, {args.warmup} warm-up + {args.steps} timed steps per row\n", flush=True)
    print("| attention | compiled | step (ms) | steps/s | samples/s | peak memory (GiB) | imputer step (ms) | "
          "imputer share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    results, durations = [], {}
    torch.manual_seed(0)
    # built on the CPU: under a CUDA default device the imputer's seeded initialisation (a CPU generator) fails
    initial = CalMRLModel(build_config(args.sizes, "sdpa"))
    with tempfile.TemporaryDirectory() as output_dir:
        for attention, compiled in rows_to_run(args.compile):
            row_start = time.perf_counter()
            if over_budget(row_start - start, args.budget_s, compiled, durations):
                result = f"skipped: it would end past the {args.budget_s:.0f} s budget"
            else:
                try:
                    result = measure_row(initial, args.sizes, attention, compiled, args.warmup, args.steps,
                                         output_dir)
                except torch.cuda.OutOfMemoryError:
                    result = "out of memory"
                gc.collect()  # the row's model, optimizer state and activations, before the next row's
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                durations[compiled] = time.perf_counter() - row_start
            print(format_row(attention, compiled, result), flush=True)
            results.append({"attention": attention, "compiled": compiled, "result": result})
    print(f"\n{time.perf_counter() - start:.0f} s in all.")
    return results


if __name__ == "__main__":
    main()
