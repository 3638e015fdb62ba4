"""The CalMRL training loop on accelerate: the paper's bi-step, every step.

(i)  imputer step: sufficient statistics of the batch's detached embeddings (observed entries only),
     summed across processes with one all-reduce, accumulated (exponential moving average or per epoch),
     closed-form M-step; every process runs the identical M-step on identical statistics.
(ii) encoder step: the alignment loss on observed + imputed embeddings (or observed only, or mean / zero
     imputation: the baselines run through the same loop, only `config.imputer_method` differs).

One `Accelerator` owns devices, processes, mixed precision, gradient accumulation, checkpoints and
trackers; the loop reads top to bottom like accelerate's `complete_nlp_example.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data.collator import model_inputs
from .data.loaders import dataset_modalities
from .evaluation import RetrievalRecall
from .hub import HUB_STRATEGIES, TRACKER_PROJECT, CheckpointPusher
from .imputer import PPCAStatistics
from .modeling_calmrl import CalMRLModel


logger = get_logger(__name__)

_CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


@dataclass
class TrainingArguments:
    """Everything the loop needs besides the model and the data. Field names follow transformers' Trainer."""

    output_dir: str = "outputs/calmrl"
    seed: int = 42
    max_steps: int = 100  # optimizer steps
    per_device_train_batch_size: int = 32
    train_batch_size: int | None = None  # global; if set, must equal per_device * processes * accumulation
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    cpu: bool = False  # force CPU processes (torchrun on CPU: gloo all-reduce)
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in output_dir/checkpoints
    imputer_statistics: str = "ema"  # "ema" | "epoch" | "frozen" (no M-step in training: warm start or loaded only)
    imputer_ema_decay: float = 0.95
    imputer_min_rows: int | None = None  # rows a modality needs before its first M-step; default 2 (q + 1)
    imputer_warm_start: bool = False  # full EM on the embeddings of `warm_start_dataset` before training
    imputer_warm_start_max_iter: int = 50
    freeze_modalities: Sequence[str] = ()  # towers to keep frozen (e.g. a pretrained text tower)
    freeze_projections: Sequence[str] = ()  # projection heads to keep frozen
    log_with: str | None = None  # e.g. "tensorboard"
    dataloader_num_workers: int = 0
    push_to_hub: str | None = None  # repo id
    hub_strategy: str = "end"  # "end" | "every_save" (the model at each checkpoint) | "checkpoint" (+ last-checkpoint/)
    hub_endpoint: str | None = None
    hub_token: str | None = None
    hub_private: bool = False
    eval_pairs: Sequence[Sequence[str]] | None = None  # e.g. [["text", "vision"], ["vision", "text"]]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingArguments":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown training arguments {unknown}; known ones are {sorted(known)}.")
        coerced = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            # YAML reads "1e-3" as a string: convert strings for numeric fields, with a clear error
            if isinstance(value, str) and isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                try:
                    value = type(f.default)(float(value)) if isinstance(f.default, int) else float(value)
                except ValueError:
                    raise ValueError(f"Training argument {f.name} must be a number, got {value!r}.") from None
            coerced[f.name] = value
        return cls(**coerced)

    def __post_init__(self):
        if self.imputer_statistics not in ("ema", "epoch", "frozen"):
            raise ValueError(f"imputer_statistics = {self.imputer_statistics!r}; expected 'ema', 'epoch' or 'frozen'.")
        if not 0.0 <= self.imputer_ema_decay < 1.0:
            raise ValueError(f"imputer_ema_decay must be in [0, 1), got {self.imputer_ema_decay}.")
        if self.hub_strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy = {self.hub_strategy!r}; expected one of {HUB_STRATEGIES}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision = {self.mixed_precision!r}; expected 'no', 'bf16' or 'fp16'.")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


@dataclass
class TrainOutput:
    output_dir: str
    global_step: int
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step (all processes)


class ImputerUpdater:
    """The imputer step of the bi-step, passed to `CalMRLModel.forward` as `imputer_update_fn`.

    Statistics are additive (`PPCAStatistics` are sums over rows), so the batch statistics of all processes
    are summed with ONE all-reduce of a flat float64 vector, accumulated, and every process runs the same
    closed-form M-step.
    """

    def __init__(self, model: CalMRLModel, accelerator: Accelerator, args: TrainingArguments):
        self.imputer = model.imputer
        self.accelerator = accelerator
        self.mode = args.imputer_statistics
        self.decay = args.imputer_ema_decay
        imputer = self.imputer
        self.min_rows = args.imputer_min_rows or 2 * (imputer.latent_dim + 1)
        self.statistics = PPCAStatistics.zeros(imputer.num_modalities, imputer.dim, imputer.latent_dim,
                                               device=imputer.weight.device)
        self.prior_statistics = self.statistics.scale(0.0)  # warm-start statistics, see `seed`
        self.enabled = model.config.imputer_method in ("ppca", "mean") and self.mode != "frozen"

    def start_epoch(self) -> None:
        if self.mode == "epoch":
            self.statistics = self.statistics.scale(0.0)

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> None:
        if not self.enabled:
            return
        embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))  # bf16 -> float32
        batch_stats = self.imputer.sufficient_statistics(embeddings, modality_mask)
        flat = self.accelerator.reduce(batch_stats.to_flat(), reduction="sum")  # one all-reduce
        imputer = self.imputer
        batch_stats = PPCAStatistics.from_flat(flat, imputer.num_modalities, imputer.dim, imputer.latent_dim)
        decay = self.decay if self.mode == "ema" else 1.0
        # S <- decay * S + S_batch (ema), or S <- S + S_batch within the epoch
        self.statistics = self.statistics.scale(decay) + batch_stats
        total = self.statistics + self.prior_statistics
        ready = total.count >= self.min_rows  # a modality's first M-step waits for enough rows
        if bool(ready.any()):
            self.imputer.m_step(total, modalities=ready)

    def seed(self, statistics: PPCAStatistics, window_rows: float) -> None:
        """Keep warm-start statistics as a fixed prior that every M-step adds to the accumulated ones.

        Scaled to at most `window_rows` rows per modality (the training loop passes the mass of one full EMA window,
        or one epoch in epoch mode), so it weighs like the recent data; it never decays:
        it is the only source of the cross-modal statistics that partial data (video-text, audio-text) never
        observes together (vision-audio), which online EM on partial batches alone would forget.
        """
        self.prior_statistics = statistics.scale((window_rows / statistics.count.clamp_min(1.0)).clamp(max=1.0))

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": self.statistics.state_dict(), "prior_statistics": self.prior_statistics.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics.load_state_dict(state["statistics"])
        if "prior_statistics" in state:  # absent from checkpoints of runs without a warm start prior
            self.prior_statistics.load_state_dict(state["prior_statistics"])


class _TrainState:
    """Position saved with every checkpoint (accelerate's `register_for_checkpointing`): the optimizer step, and
    the epoch and micro-batch within it, so a resumed run skips exactly the batches already seen (also for
    streaming datasets, whose length is unknown)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self):
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state):
        self.global_step = int(state["global_step"])
        self.epoch = int(state.get("epoch", 0))
        self.batches_in_epoch = int(state.get("batches_in_epoch", 0))


def validate_setup(model: CalMRLModel, datasets: dict[str, Any], args: TrainingArguments, num_processes: int) -> int:
    """Fail before training starts, with a message that says what to change. Returns the per-device batch size."""
    modalities = model.config.modalities
    for role, dataset in datasets.items():
        if dataset is None:
            continue
        lacking = [m for m in dataset_modalities(dataset) if m not in modalities]
        if lacking:
            raise ValueError(
                f"The {role} dataset has modalities {lacking} that the model lacks (model modalities: {modalities}). "
                f"Add them to CalMRLConfig.modalities with an encoder, or drop those columns "
                f"(dataset.remove_columns({lacking}))."
            )
    unknown_frozen = [m for m in (*args.freeze_modalities, *args.freeze_projections) if m not in modalities]
    if unknown_frozen:
        raise ValueError(f"freeze_modalities / freeze_projections name unknown modalities {unknown_frozen}; the "
                         f"modalities are {modalities}.")
    per_device = args.per_device_train_batch_size
    if args.train_batch_size is not None:
        divisor = num_processes * args.gradient_accumulation_steps
        if args.train_batch_size % divisor:
            raise ValueError(
                f"train_batch_size={args.train_batch_size} is not divisible by processes ({num_processes}) x "
                f"gradient_accumulation_steps ({args.gradient_accumulation_steps}) = {divisor}; choose a multiple "
                f"of {divisor}."
            )
        per_device = args.train_batch_size // divisor
    if model.config.alignment_objective != "pmrl" and per_device < 2:
        raise ValueError(f"A contrastive objective needs at least 2 rows per device batch, got {per_device}.")
    train = datasets.get("train")
    if train is not None and hasattr(train, "__len__") and len(train) < per_device * num_processes:
        raise ValueError(
            f"The train dataset has {len(train)} rows, fewer than one global batch ({per_device} x {num_processes} "
            f"processes); lower the batch size."
        )
    return per_device


def build_accelerator(args: TrainingArguments) -> Accelerator:
    return Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.log_with,
        project_dir=args.output_dir,
        # towers of modalities absent from a batch get no gradient: DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # batches hold the observed rows of each modality only (ragged), so they are never split or dispatched
        # across processes: each process collates its own examples
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                  dispatch_batches=False),
    )


@torch.no_grad()
def embed_dataset(model, dataloader, accelerator: Accelerator | None = None) -> dict[str, torch.Tensor]:
    """Embeddings [N, k, D], modality masks [N, k] (and labels, where every batch has them) of a whole dataset.

    `dataloader` is any iterable of collated batches; with an `accelerator` they are gathered from all processes
    (`gather_for_metrics`). The one embedding loop of the library: the training loop, the CLI and the benchmarks
    embed through it.
    """
    model.eval()
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda value: value)
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    chunks: dict[str, list[torch.Tensor]] = {"embeddings": [], "modality_mask": [], "labels": []}
    for batch in dataloader:
        labels = batch.get("labels")
        embeddings, mask = unwrapped.embed_modalities(**model_inputs(batch))
        gathered = gather((embeddings.float(), mask))
        chunks["embeddings"].append(gathered[0].cpu())
        chunks["modality_mask"].append(gathered[1].cpu())
        if isinstance(labels, torch.Tensor):
            chunks["labels"].append(gather(labels).cpu())
    data = {key: torch.cat(value) for key, value in chunks.items() if value}
    if "labels" in data and data["labels"].shape[0] != data["embeddings"].shape[0]:
        del data["labels"]  # some batches had none
    return data


def evaluate(model, dataloader, accelerator: Accelerator, pairs=None) -> dict[str, float]:
    """Retrieval Recall@1/5/10 in every direction (class level too when the data has labels), computed by the
    `RetrievalRecall` evaluate metric on the embeddings gathered from all processes."""
    data = embed_dataset(model, dataloader, accelerator)
    labels = data.get("labels")
    metric = RetrievalRecall(accelerator.unwrap_model(model).config.modalities, pairs=pairs,
                             config_name="instance" if labels is None else "class", keep_in_memory=True)
    inputs = {"embeddings": data["embeddings"].numpy(), "modality_mask": data["modality_mask"].numpy()}
    if labels is not None:
        inputs["labels"] = labels.numpy()
    metric.add_batch(**inputs)
    return metric.compute()


def warm_start_imputer(
    model, dataloader, accelerator: Accelerator, max_iter: int
) -> tuple[list[float], PPCAStatistics]:
    """Fit the imputer by full EM on the embeddings of a (full-modality) dataset; identical on every process.

    Returns the log-likelihood history and the statistics of the data under the fitted parameters.
    """
    data = embed_dataset(model, dataloader, accelerator)
    imputer = accelerator.unwrap_model(model).imputer
    embeddings = data["embeddings"].to(imputer.weight.device)
    mask = data["modality_mask"].to(imputer.weight.device)
    history = imputer.fit(embeddings, mask, max_iter=max_iter)
    return history, imputer.sufficient_statistics(embeddings, mask)


def _latest_checkpoint(output_dir: str) -> str | None:
    root = Path(output_dir) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _CHECKPOINT_PATTERN.match(p.name))]
    return str(max(steps)[1]) if steps else None


def _prune_checkpoints(output_dir: str, keep: int | None) -> None:
    if not keep:
        return
    root = Path(output_dir) / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _CHECKPOINT_PATTERN.match(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Run:
    """What the steps of `train` share: the prepared objects and the loop's running state."""

    accelerator: Accelerator
    args: TrainingArguments
    model: Any
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]  # the parameters the optimizer steps (gradient clipping)
    train_loader: Any
    eval_loader: Any
    warm_loader: Any
    streaming: bool  # an IterableDataset: it shuffles itself and may not know its length
    imputer_step: ImputerUpdater
    state: _TrainState
    on_checkpoint: Callable[[int], None] | None
    hub_pusher: CheckpointPusher | None = None  # pushes at each checkpoint (hub_strategy every_save / checkpoint)
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step (all processes)
    running_loss: torch.Tensor | None = None  # sum over the micro-batches of the current optimizer step
    running_count: int = 0


def freeze_modules(model: CalMRLModel, args: TrainingArguments) -> None:
    """Keep the towers of `freeze_modalities` and the heads of `freeze_projections` fixed."""
    for name in args.freeze_modalities:
        model.encoders[model.config.encoder_owner(name)].requires_grad_(False)
    for name in args.freeze_projections:
        model.projections[name].requires_grad_(False)


def build_dataloaders(train_dataset, eval_dataset, warm_start_dataset, collate_fn: Callable, per_device: int,
                      args: TrainingArguments) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    """(train, eval, warm-start) loaders; eval and warm start are None where there is no dataset (or no warm
    start asked for). Train batches are whole (`drop_last`); a map-style train set is shuffled by the loader,
    a streaming one shuffles itself (e.g. `dataset.shuffle(seed, buffer_size)`), reshuffled every epoch."""
    streaming = isinstance(train_dataset, torch.utils.data.IterableDataset)
    train_loader = DataLoader(train_dataset, batch_size=per_device, shuffle=not streaming, drop_last=True,
                              collate_fn=collate_fn, num_workers=args.dataloader_num_workers)
    eval_loader = warm_loader = None
    if eval_dataset is not None:
        eval_loader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)
    if warm_start_dataset is not None and args.imputer_warm_start:
        warm_loader = DataLoader(warm_start_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)
    return train_loader, eval_loader, warm_loader


def build_optimizer(model: CalMRLModel, args: TrainingArguments, num_processes: int):
    """AdamW over the trainable parameters and the learning-rate schedule: `(optimizer, scheduler)`."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step: scale the schedule to match
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer,
        num_warmup_steps=args.warmup_steps * num_processes,
        num_training_steps=args.max_steps * num_processes,
    )
    return optimizer, scheduler


def prepare_run(accelerator: Accelerator, args: TrainingArguments, model, optimizer, scheduler, loaders,
                on_checkpoint) -> _Run:
    """`accelerator.prepare` everything; the imputer step and the loop position join the checkpoints."""
    train_loader, eval_loader, warm_loader = loaders
    streaming = isinstance(train_loader.dataset, torch.utils.data.IterableDataset)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if warm_loader is not None:
        warm_loader = accelerator.prepare(warm_loader)
    imputer_step = ImputerUpdater(accelerator.unwrap_model(model), accelerator, args)
    state = _TrainState()
    accelerator.register_for_checkpointing(imputer_step, state)
    if args.log_with:
        accelerator.init_trackers(TRACKER_PROJECT, config={k: v for k, v in asdict(args).items()
                                                    if isinstance(v, (int, float, str, bool))})
    return _Run(accelerator, args, model, optimizer, scheduler, trainable, train_loader, eval_loader, warm_loader,
                streaming, imputer_step, state, on_checkpoint,
                running_loss=torch.zeros((), device=accelerator.device))


def resume_or_warm_start(run: _Run, per_device: int) -> None:
    """Resume from `args.resume_from_checkpoint` ("latest": the newest in output_dir/checkpoints), or else fit the
    imputer on the warm-start data by full EM and keep its statistics as a prior (`ImputerUpdater.seed`)."""
    args, accelerator = run.args, run.accelerator
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = _latest_checkpoint(args.output_dir)
        if resume is None:
            logger.info("No checkpoint in %s/checkpoints: starting from scratch.", args.output_dir)
    if resume:
        accelerator.load_state(resume)
        logger.info("Resumed from %s at step %d.", resume, run.state.global_step)
        return
    if run.warm_loader is None:
        return
    history, warm_statistics = warm_start_imputer(run.model, run.warm_loader, accelerator,
                                                  args.imputer_warm_start_max_iter)
    rows_per_step = per_device * accelerator.num_processes
    if args.imputer_statistics == "ema" or run.streaming:  # one EMA window (an epoch's length may be unknown)
        window_rows = rows_per_step / (1.0 - args.imputer_ema_decay)
    else:  # one epoch
        window_rows = rows_per_step * len(run.train_loader)
    run.imputer_step.seed(warm_statistics, window_rows)
    logger.info("Imputer warm start: %d EM iterations, log-likelihood %.1f -> %.1f.",
                len(history), history[0], history[-1])


def train_step(run: _Run, batch) -> bool:
    """One micro-batch of the bi-step: the imputer step (inside forward, `imputer_update_fn`), then the encoder
    step. True when it completes an optimizer step (the last micro-batch of a gradient accumulation)."""
    accelerator, args = run.accelerator, run.args
    with accelerator.accumulate(run.model):
        outputs = run.model(**model_inputs(batch), return_loss=True, imputer_update_fn=run.imputer_step)
        accelerator.backward(outputs.loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    run.running_loss += outputs.loss.detach().float()
    run.running_count += 1
    if not accelerator.sync_gradients:
        return False
    run.state.global_step += 1
    step_loss = accelerator.reduce(run.running_loss / run.running_count, reduction="mean").item()
    run.losses.append(step_loss)
    run.running_loss.zero_()
    run.running_count = 0
    return True


def after_optimizer_step(run: _Run, progress) -> None:
    """Log every `logging_steps`, evaluate every `eval_steps`, checkpoint every `save_steps`."""
    accelerator, args, step = run.accelerator, run.args, run.state.global_step
    if step % args.logging_steps == 0 or step == args.max_steps:
        progress.set_postfix(loss=f"{run.losses[-1]:.4f}")
        if args.log_with:
            accelerator.log({"train/loss": run.losses[-1], "train/lr": run.scheduler.get_last_lr()[0]}, step=step)
    if run.eval_loader is not None and args.eval_steps and step % args.eval_steps == 0:
        metrics = evaluate(run.model, run.eval_loader, accelerator, args.eval_pairs)
        run.model.train()
        if args.log_with:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if args.save_steps and step % args.save_steps == 0:
        save_checkpoint(run)


def save_checkpoint(run: _Run) -> None:
    """`accelerator.save_state` to output_dir/checkpoints/step_N (model, optimizer, schedule, RNG, imputer
    statistics, loop position), keeping the newest `save_total_limit`."""
    accelerator, args, step = run.accelerator, run.args, run.state.global_step
    checkpoint_dir = Path(args.output_dir) / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(checkpoint_dir))
    if accelerator.is_main_process:
        _prune_checkpoints(args.output_dir, args.save_total_limit)
        if run.hub_pusher is not None:  # staged now, uploaded in the background
            run.hub_pusher.push(accelerator.unwrap_model(run.model), checkpoint_dir, step, recorded_arguments(args))
    accelerator.wait_for_everyone()
    if run.on_checkpoint is not None:
        run.on_checkpoint(step)


def run_epoch(run: _Run, progress) -> bool:
    """One pass over the train loader (after a resume, the rest of the interrupted epoch). True when the epoch
    ran out, False when `max_steps` ended it."""
    state = run.state
    run.train_loader.set_epoch(state.epoch)
    skip = state.batches_in_epoch
    if skip == 0:
        run.imputer_step.start_epoch()
    loader = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    run.model.train()
    for batch in loader:
        state.batches_in_epoch += 1
        if not train_step(run, batch):
            continue
        progress.update(1)
        after_optimizer_step(run, progress)
        if state.global_step >= run.args.max_steps:
            return False
    return True


def run_epochs(run: _Run) -> None:
    """Epochs until `max_steps` optimizer steps."""
    state, args = run.state, run.args
    progress = tqdm(total=args.max_steps, initial=state.global_step,
                    disable=not run.accelerator.is_local_main_process, desc="training")
    while state.global_step < args.max_steps:
        resumed_mid_epoch = state.batches_in_epoch > 0
        if run_epoch(run, progress):
            state.epoch += 1
            state.batches_in_epoch = 0
            if state.global_step == 0 and not resumed_mid_epoch:
                raise ValueError("The train dataset yields no full batch: lower the batch size.")
    progress.close()


def finish(run: _Run, processor=None) -> dict[str, float]:
    """Evaluate (with an eval set), save model and processor with `save_pretrained`, write the run's results,
    arguments and model card, push where asked. Returns the evaluation metrics."""
    accelerator, args, step = run.accelerator, run.args, run.state.global_step
    metrics: dict[str, float] = {}
    if run.eval_loader is not None:
        metrics = evaluate(run.model, run.eval_loader, accelerator, args.eval_pairs)
        if args.log_with:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(run.model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                                        save_function=accelerator.save)
    if accelerator.is_main_process:
        if processor is not None:
            processor.save_pretrained(args.output_dir)
        results = {"global_step": step, "final_loss": run.losses[-1] if run.losses else None, **metrics}
        Path(args.output_dir, "train_results.json").write_text(json.dumps(results, indent=2))
        recorded_args = recorded_arguments(args)
        Path(args.output_dir, "training_args.json").write_text(json.dumps(recorded_args, indent=2, default=str))
        from .hub import write_model_card

        write_model_card(args.output_dir, repo_id=args.push_to_hub, metrics=metrics, training_args=recorded_args)
    accelerator.wait_for_everyone()
    if run.hub_pusher is not None:
        run.hub_pusher.wait()  # the last checkpoint's upload lands before the final model's
    if args.push_to_hub and accelerator.is_main_process:
        from .hub import push_to_hub  # only needed when pushing

        push_to_hub(args.output_dir, args.push_to_hub, token=args.hub_token, endpoint=args.hub_endpoint,
                    private=args.hub_private)
    if args.log_with:
        accelerator.end_training()
    return metrics


def recorded_arguments(args: TrainingArguments) -> dict[str, Any]:
    """The training arguments as written to `training_args.json` and the model card (never the Hub token)."""
    return {k: v for k, v in asdict(args).items() if k != "hub_token"}


def build_hub_pusher(args: TrainingArguments, accelerator: Accelerator, processor=None) -> CheckpointPusher | None:
    """The main process's `CheckpointPusher` for `hub_strategy` "every_save" / "checkpoint" (None otherwise)."""
    if not args.push_to_hub or args.hub_strategy == "end" or not accelerator.is_main_process:
        return None
    return CheckpointPusher(args.push_to_hub, args.hub_strategy, processor=processor, token=args.hub_token,
                            endpoint=args.hub_endpoint, private=args.hub_private)


def train(
    model: CalMRLModel,
    train_dataset,
    args: TrainingArguments,
    *,
    collate_fn: Callable,
    eval_dataset=None,
    warm_start_dataset=None,
    processor=None,
    accelerator: Accelerator | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TrainOutput:
    """Train `model` with CalMRL's bi-step; save model (and processor) to `args.output_dir` at the end.

    `train_dataset` yields examples that `collate_fn` turns into model inputs (`{modality}_{field}` tensors and
    `modality_mask`). `on_checkpoint(step)` is called after each checkpoint (tests use it to stop a run).
    """
    accelerator = accelerator or build_accelerator(args)
    per_device = validate_setup(
        model, {"train": train_dataset, "eval": eval_dataset, "warm start": warm_start_dataset}, args,
        accelerator.num_processes,
    )
    set_seed(args.seed)
    freeze_modules(model, args)
    loaders = build_dataloaders(train_dataset, eval_dataset, warm_start_dataset, collate_fn, per_device, args)
    optimizer, scheduler = build_optimizer(model, args, accelerator.num_processes)
    run = prepare_run(accelerator, args, model, optimizer, scheduler, loaders, on_checkpoint)
    run.hub_pusher = build_hub_pusher(args, accelerator, processor)
    try:
        resume_or_warm_start(run, per_device)
        run_epochs(run)
        metrics = finish(run, processor)
    finally:
        if run.hub_pusher is not None:  # an upload in flight lands even when the run stops with an error
            run.hub_pusher.wait()
    return TrainOutput(output_dir=args.output_dir, global_step=run.state.global_step, metrics=metrics,
                       losses=run.losses)


__all__ = ["ImputerUpdater", "TrainOutput", "TrainingArguments", "build_accelerator", "build_dataloaders",
           "build_hub_pusher", "build_optimizer", "dataset_modalities", "embed_dataset", "evaluate", "finish",
           "freeze_modules", "prepare_run", "recorded_arguments", "resume_or_warm_start", "run_epoch", "run_epochs",
           "save_checkpoint", "train", "train_step", "validate_setup", "warm_start_imputer"]
