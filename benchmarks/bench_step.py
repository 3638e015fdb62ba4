"""The training loop's cost over a bare accelerate loop doing the same work, measured side by side.

    python -m benchmarks.bench_step                 # the main job's stage-2 model, 5 runs of each loop per case
    python -m benchmarks.bench_step --quick         # tiny towers, seconds

`calmrl_hf.training.train` against `bare_loop`: one Accelerator, `prepare`, AdamW with the same hyperparameters, the
same schedule, the same batches in the same order, `loss = model(**batch, return_loss=True).loss`, backward,
gradient clipping, optimizer and scheduler step, and in the PPCA case the same imputer step (`OnlinePPCA`: batch
statistics, one all-reduce, exponential moving average, closed-form M-step). Both start from the same seed and end
bit-identical (tests/test_bench_step.py), so the difference in time is what `train` adds per step: its
accumulation context, calibration hooks, per-step loss reduction (`.item()`), progress and logging checks.

The model is the main job's stage 2 (`recipes/configs/mini_vast.yaml`) with random weights: ResNet towers for the
4 frames of 32x32 and the 64 x 32 log-mel map as the recipe configures them, a text tower of all-MiniLM-L6-v2's
size (frozen, as the recipe freezes it), projection 64, q = 8, PMRL, batch 32 of video-text and audio-text rows
(the stage-2 corpus's patterns). Batches are collated from tensors in memory (no media decoding), so the loader
costs both loops the same little. Time per step: from a post-step hook on every optimizer (the same in both loops),
the steps after `--warmup` (`StepClock`: on CPU the median step in CPU time of the process, on a GPU the mean
step in wall time), best of `--repeats` runs of each loop interleaved (bare, train, bare, train, ...); the median
ratio of the back-to-back pairs is given too.
`train` runs without evaluation, checkpoints, trackers or warm start (`eval_dataset=None`, `save_steps=None`,
`report_to=None`, `logging_steps=max_steps`); its final save falls after the timed window.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, get_scheduler

from calmrl_hf import CalMRLModel
from calmrl_hf.imputer import PPCAStatistics
from calmrl_hf.recipe.run import DEFAULT_CONFIG, resolve_tower
from calmrl_hf.training import CalMRLTrainingArguments, train

from ._timing import machine


# sentence-transformers/all-MiniLM-L6-v2 (the main job's text tower), its config.json sizes; random weights here
MINILM_L6 = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512)
MODALITIES = ("vision", "audio", "text", "subtitle")  # the model's default k axis


@dataclasses.dataclass(frozen=True)
class InputSizes:
    """The shapes the main job's processor produces (mini_vast.yaml's processor section)."""

    num_frames: int = 4
    image_size: int = 32
    audio_frames: int = 64
    mel_bins: int = 32
    text_length: int = 24
    vocab_size: int = MINILM_L6["vocab_size"]


class StageTwoRows(Dataset):
    """Rows alternating video + text and audio + text (stage 2's two corpora), random tensors made once; missing
    modalities are None. The same object feeds both loops."""

    def __init__(self, num_rows: int, sizes: InputSizes, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        half = (num_rows + 1) // 2
        self.frames = torch.randn(half, sizes.num_frames, 3, sizes.image_size, sizes.image_size, generator=generator)
        self.log_mel = torch.randn(num_rows // 2, 1, sizes.audio_frames, sizes.mel_bins, generator=generator)
        self.token_ids = torch.randint(1, sizes.vocab_size, (num_rows, sizes.text_length), generator=generator)
        # captions of 12 to text_length tokens, padded to text_length
        self.lengths = torch.randint(12, sizes.text_length + 1, (num_rows,), generator=generator)
        self.num_rows = num_rows

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        attention = (torch.arange(self.token_ids.shape[1]) < self.lengths[index]).long()
        return {"vision": self.frames[index // 2] if index % 2 == 0 else None,
                "audio": self.log_mel[index // 2] if index % 2 == 1 else None,
                "text": (self.token_ids[index] * attention, attention)}


def collate_rows(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The processor's contract: the observed rows of each modality in batch order and the [B, k] mask."""
    mask = torch.tensor([[example.get(name) is not None for name in MODALITIES] for example in examples])
    batch = {"modality_mask": mask}
    frames = [e["vision"] for e in examples if e["vision"] is not None]
    log_mel = [e["audio"] for e in examples if e["audio"] is not None]
    if frames:
        batch["vision_pixel_values"] = torch.stack(frames)
    if log_mel:
        batch["audio_pixel_values"] = torch.stack(log_mel)  # audio_as_image: [n, 1, T, mel]
    batch["text_input_ids"] = torch.stack([e["text"][0] for e in examples])
    batch["text_attention_mask"] = torch.stack([e["text"][1] for e in examples])
    return batch


def main_job_model_kwargs(imputer_method: str) -> dict:
    """`CalMRLModel.from_encoders` keyword arguments of the main job's stage 2, towers as configs (random weights)."""
    recipe = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["model"]
    towers = {name: resolve_tower(spec) for name, spec in recipe["towers"].items() if isinstance(spec, dict)}
    towers["text"] = BertConfig(**MINILM_L6)
    return {**towers, **recipe["config"], "imputer_method": imputer_method}


def main_job_arguments(output_dir: str, max_steps: int, batch_size: int | None = None) -> CalMRLTrainingArguments:
    """Stage 2's training arguments (mini_vast.yaml) with everything around the step off: no evaluation,
    checkpoints, trackers, warm start, decoding workers; the progress line once, at the end."""
    stage = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["stage2"]
    return CalMRLTrainingArguments(
        output_dir=output_dir, seed=0, max_steps=max_steps,
        per_device_train_batch_size=batch_size or stage["per_device_train_batch_size"],
        learning_rate=stage["learning_rate"], warmup_steps=stage["warmup_steps"],
        freeze_modalities=list(stage["freeze_modalities"]), logging_steps=max_steps, save_steps=None,
        eval_steps=None, report_to=None, imputer_warm_start=False, dataloader_num_workers=0)


# ---------------------------------------------------------------------------- the bare loop
class OnlinePPCA:
    """The imputer step as a bare loop would write it (the `imputer_update_fn` the model calls in forward): the
    batch's E-step statistics, summed over processes, S <- decay * S + S_batch, and the closed-form M-step of every
    modality with at least `min_rows` rows. The unchecked `_` twins: forward validated the batch where it entered
    (the public ones would check it again, a device-to-host read each)."""

    def __init__(self, model: CalMRLModel, accelerator: Accelerator, args: CalMRLTrainingArguments):
        imputer = model.imputer
        self.imputer, self.accelerator, self.decay = imputer, accelerator, args.imputer_ema_decay
        self.min_rows = args.imputer_min_rows or 2 * (imputer.latent_dim + 1)
        self.shape = (imputer.num_modalities, imputer.dim, imputer.latent_dim)
        self.statistics = PPCAStatistics.zeros(*self.shape, device=imputer.weight.device)

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> None:
        batch = self.imputer._sufficient_statistics(embeddings.float(), modality_mask)
        batch = PPCAStatistics.from_flat(self.accelerator.reduce(batch.to_flat(), reduction="sum"), *self.shape)
        self.statistics = self.statistics.scale(self.decay) + batch
        self.imputer._m_step(self.statistics, modalities=self.statistics.count >= self.min_rows)


def bare_loop(model: CalMRLModel, dataset, collate_fn: Callable, args: CalMRLTrainingArguments) -> CalMRLModel:
    """`args.max_steps` optimizer steps of the bi-step in a plain accelerate loop; returns the trained model.

    What it shares with `train` to give the same trajectory: the seed set after the model is built, the frozen
    towers (no gradient, eval mode: their dropout off), a loader shuffled by its own generator and accelerate's
    seedable sampler (epoch e draws with seed + e), AdamW over the trainable parameters, clipping at
    `max_grad_norm`, and the objective on the observed columns (`impute_modalities` all False: the default
    `imputation_source="none"`)."""
    accelerator = Accelerator(cpu=args.use_cpu, mixed_precision=args.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                                        dispatch_batches=False))
    set_seed(args.seed)
    frozen = [model.encoders[model.config.encoder_owner(name)] for name in args.freeze_modalities]
    for tower in frozen:
        tower.requires_grad_(False)
    loader = DataLoader(dataset, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    imputer_step = OnlinePPCA(unwrapped, accelerator, args) if unwrapped.config.imputer_method == "ppca" else None
    observed_only = torch.zeros(unwrapped.config.num_modalities, dtype=torch.bool, device=accelerator.device)
    step, epoch = 0, 0
    while step < args.max_steps:
        loader.set_epoch(epoch)
        model.train()
        for tower in frozen:
            tower.eval()
        for batch in loader:
            loss = model(**batch, return_loss=True, imputer_update_fn=imputer_step,
                         impute_modalities=observed_only).loss
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step == args.max_steps:
                break
        epoch += 1
    return accelerator.unwrap_model(model)


def package_loop(model: CalMRLModel, dataset, collate_fn: Callable, args: CalMRLTrainingArguments) -> CalMRLModel:
    """`calmrl_hf.training.train` on the same inputs; returns the trained model."""
    train(model, dataset, args, collate_fn=collate_fn)
    return model


LOOPS = {"bare": bare_loop, "train": package_loop}


# ---------------------------------------------------------------------------- timing
class StepClock:
    """Time per optimizer step after `warmup` of `steps` steps: a post-step hook on every torch optimizer records
    the clock at each step, the same in both loops. On CPU the process's CPU time (the machine is shared: other jobs
    move wall time, not the work this process does) and the median step of the window; on a GPU wall time and the
    window's mean, the device synchronised at its two ends only, so that a loop that lets the host run ahead of the
    device keeps that advantage."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        if not 1 <= warmup < steps:
            raise ValueError(f"warmup must be in [1, steps), got warmup={warmup}, steps={steps}.")
        self.warmup, self.steps, self.device, self.times = warmup, steps, device, []
        self.clock = time.perf_counter if device.type == "cuda" else time.process_time

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self._stamp)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _stamp(self, optimizer, args, kwargs) -> None:
        if self.device.type == "cuda" and len(self.times) + 1 in (self.warmup, self.steps):
            torch.cuda.synchronize(self.device)
        self.times.append(self.clock())

    def seconds_per_step(self) -> float:
        if len(self.times) != self.steps:
            raise ValueError(f"{len(self.times)} optimizer steps timed, {self.steps} expected.")
        window = self.times[self.warmup - 1:]
        if self.device.type == "cuda":
            return (window[-1] - window[0]) / (len(window) - 1)
        return statistics.median(later - earlier for earlier, later in zip(window, window[1:]))


def training_device(args: CalMRLTrainingArguments) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu")


def time_loops(build_model: Callable[[], CalMRLModel], dataset, collate_fn: Callable,
               args: CalMRLTrainingArguments, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each loop, `repeats` runs each, interleaved (bare, train, bare, train, ...)."""
    device = training_device(args)
    seconds: dict[str, list[float]] = {name: [] for name in LOOPS}
    for _ in range(repeats):
        for name, loop in LOOPS.items():
            model = build_model()
            with StepClock(warmup, args.max_steps, device) as clock:
                loop(model, dataset, collate_fn, args)
            seconds[name].append(clock.seconds_per_step())
    return seconds


def summarize(seconds: dict[str, list[float]]) -> dict[str, float]:
    bare, package = min(seconds["bare"]), min(seconds["train"])
    paired = [t / b for b, t in zip(seconds["bare"], seconds["train"])]
    return {"bare_ms": 1e3 * bare, "train_ms": 1e3 * package, "ratio": package / bare,
            "median_paired_ratio": statistics.median(paired)}


def tiny_model_kwargs(imputer_method: str) -> dict:
    """Small towers of the same kinds for `--quick` (seconds on CPU)."""
    from transformers import ResNetConfig

    return {"vision": ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                   layer_type="basic"),
            "audio": ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                  layer_type="basic"),
            "text": BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
            "projection_dim": 16, "imputer_latent_dim": 4, "pooling": {"vision": "mean", "audio": "mean"},
            "imputer_method": imputer_method}


GOALS = {"none": 1.05, "ppca": 1.10}  # train / bare: the targets
CASE_NAMES = {"none": "imputer off", "ppca": "PPCA imputer on"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --quick: 8)")
    parser.add_argument("--warmup", type=int, help="steps before the timed window (default 5; --quick: 2)")
    parser.add_argument("--repeats", type=int, help="runs of each loop per case, best taken (default 5; --quick: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cases", nargs="+", default=list(GOALS), choices=list(GOALS))
    parser.add_argument("--quick", action="store_true", help="tiny towers, batch 8 (and the --quick defaults)")
    args = parser.parse_args(argv)
    defaults = (8, 2, 2) if args.quick else (30, 5, 5)
    args.steps, args.warmup, args.repeats = (given if given is not None else default for given, default in
                                             zip((args.steps, args.warmup, args.repeats), defaults))
    torch.set_num_threads(args.threads)
    sizes, batch_size, model_kwargs = InputSizes(), None, main_job_model_kwargs
    if args.quick:
        sizes, batch_size, model_kwargs = InputSizes(text_length=16, vocab_size=128), 8, tiny_model_kwargs
    print(f"Machine: {machine()}\n")
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        training = main_job_arguments(output_dir, args.steps, batch_size)
        dataset = StageTwoRows(training.per_device_train_batch_size * args.steps, sizes)
        for case in args.cases:
            kwargs = model_kwargs(case)

            def build_model():
                torch.manual_seed(0)
                return CalMRLModel.from_encoders(**kwargs)

            seconds = time_loops(build_model, dataset, collate_rows, training, args.warmup, args.repeats)
            results[case] = {**summarize(seconds), "seconds": seconds}
    clock = "wall time" if training_device(training).type == "cuda" else "CPU time of the process"
    print(f"{args.steps} steps per run ({args.warmup} warm-up), batch {training.per_device_train_batch_size}, best of "
          f"{args.repeats} interleaved runs per loop; ms/step in {clock}\n")
    print("| case | bare loop (ms/step) | train() (ms/step) | train / bare | median paired ratio | goal |")
    print("|---|---:|---:|---:|---:|---:|")
    for case, result in results.items():
        print(f"| {CASE_NAMES[case]} | {result['bare_ms']:.1f} | {result['train_ms']:.1f} | {result['ratio']:.3f} | "
              f"{result['median_paired_ratio']:.3f} | <= {GOALS[case]:.2f} |")
    print("\nEvery run (ms/step, in the order run):")
    for case, result in results.items():
        for loop, runs in result["seconds"].items():
            print(f"- {CASE_NAMES[case]}, {loop}: {', '.join(f'{1e3 * s:.1f}' for s in runs)}")
    return results


if __name__ == "__main__":
    main()
