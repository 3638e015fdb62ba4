"""The CalMRL training loop on accelerate: the paper's bi-step, every step.

(i)  imputer step: sufficient statistics of the batch's detached embeddings (observed entries only),
     summed across processes with one all-reduce, accumulated (exponential moving average or per epoch),
     closed-form M-step; every process runs the identical M-step on identical statistics.
(ii) encoder step: the alignment loss on observed + imputed embeddings (or observed only, or mean / zero
     imputation: the baselines run through the same loop, only `config.imputer_method` differs).

One `Accelerator` owns devices, processes, mixed precision, gradient accumulation and trackers; the loop reads
top to bottom like accelerate's `complete_nlp_example.py`. Checkpoints are the package's own (`checkpointing`:
safetensors and JSON, atomic, verified, with the run's manifest), not accelerate's `save_state`, whose pickled
custom states `load_state` would unpickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file, save
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import get_scheduler

from .checkpoints import (
    INCOMPLETE_SUFFIX, MANIFEST_FORMAT, CheckpointError, capture_rng_state, commit_checkpoint,
    ensure_writable_directory, find_checkpoints, load_state_file, manifest_differences, prune_checkpoints,
    read_manifest, restore_rng_state, start_checkpoint, state_file_bytes, write_checkpoint_files,
)
from ..configuration_calmrl import CalMRLConfig

from ..data.collator import model_inputs
from ..data.loaders import dataset_modalities
from ..evaluation.metrics import RetrievalRecall
from ..sharing.hub import TRACKER_PROJECT, CheckpointPusher
from ..imputer import PPCAStatistics
from .launch import (
    build_accelerator, check_checkpoint_folders, refuse_unsupported_engine_settings, resolve_launch_settings,
)
from ..modeling_calmrl import CalMRLModel
from .progress import step_progress
from .fsdp import (
    as_its_own_class, full_optimizer_state, is_sharded, load_full_model_state, load_full_optimizer_state,
    set_shard_groups,
)
from .arguments import CalMRLTrainingArguments


logger = get_logger(__name__)

# Arguments that do not change what a resumed run computes: they may differ from the checkpoint's run.
ARGUMENTS_OUTSIDE_THE_TRAJECTORY = frozenset({
    "output_dir", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint",
    "allow_resume_changes", "report_to", "dataloader_num_workers", "use_cpu",
    "dataloader_prefetch_factor", "dataloader_persistent_workers", "dataloader_pin_memory", "per_device_eval_batch_size",
    "eval_pairs", "push_to_hub", "hub_strategy", "hub_model_id", "hub_endpoint", "hub_token", "hub_private_repo",
})


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

    def __init__(self, model: CalMRLModel, accelerator: Accelerator, args: CalMRLTrainingArguments):
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
    """Position saved in every checkpoint's manifest: the optimizer step, and the epoch and micro-batch within it,
    so a resumed run skips exactly the batches already seen (also for streaming datasets, whose length is
    unknown)."""

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


def validate_setup(model: CalMRLModel, datasets: dict[str, Any], args: CalMRLTrainingArguments,
                   num_processes: int) -> int:
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
    # a wrapped or sharded model (DDP, FSDP, DeepSpeed) embeds through its forward, which gathers the shards
    through_forward = unwrapped is not model or is_sharded(model)
    for batch in dataloader:
        labels = batch.get("labels")
        if through_forward:
            outputs = model(**model_inputs(batch))
            embeddings, mask = outputs.embeddings, outputs.modality_mask
        else:
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


@dataclass
class _Run:
    """What the steps of `train` share: the prepared objects and the loop's running state."""

    accelerator: Accelerator
    args: CalMRLTrainingArguments
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    warm_loader: Any
    streaming: bool  # an IterableDataset: it shuffles itself and may not know its length
    imputer_step: ImputerUpdater
    state: _TrainState
    on_checkpoint: Callable[[int], None] | None
    manifest: dict[str, Any]  # what the run is (`run_manifest`): recorded in checkpoints, compared on resume
    hub_pusher: CheckpointPusher | None = None  # pushes at each checkpoint (hub_strategy every_save / checkpoint)
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step (all processes)
    running_loss: torch.Tensor | None = None  # sum over the micro-batches of the current optimizer step
    running_count: int = 0


def freeze_modules(model: CalMRLModel, args: CalMRLTrainingArguments) -> None:
    """Keep the towers of `freeze_modalities` and the heads of `freeze_projections` fixed."""
    for name in args.freeze_modalities:
        model.encoders[model.config.encoder_owner(name)].requires_grad_(False)
    for name in args.freeze_projections:
        model.projections[name].requires_grad_(False)


def train_mode(run: "_Run") -> None:
    """`model.train()`, except the frozen towers, which stay in eval mode: a frozen tower is a fixed function, so
    its dropout stays off and its batch-norm statistics do not drift with the training batches."""
    run.model.train()
    model = run.accelerator.unwrap_model(run.model)
    for name in run.args.freeze_modalities:
        model.encoders[model.config.encoder_owner(name)].eval()


def build_dataloaders(train_dataset, eval_dataset, warm_start_dataset, collate_fn: Callable, per_device: int,
                      args: CalMRLTrainingArguments, on_gpu: bool = False,
                      ) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    """(train, eval, warm-start) loaders; eval and warm start are None where there is no dataset (or no warm
    start asked for). Train batches are whole (`drop_last`); a map-style train set is shuffled by the loader,
    a streaming one shuffles itself (e.g. `dataset.shuffle(seed, buffer_size)`), reshuffled every epoch."""
    streaming = isinstance(train_dataset, torch.utils.data.IterableDataset)
    # the loader's own generator (reseeded every epoch, `run_epoch`): its draws never touch the global RNG, whose
    # state at a checkpoint is then exactly what dropout continues from after a resume
    train_loader = DataLoader(train_dataset, batch_size=per_device, shuffle=not streaming, drop_last=True,
                              collate_fn=collate_fn, num_workers=args.dataloader_num_workers,
                              pin_memory=args.dataloader_pin_memory and on_gpu, **worker_settings(args),
                              generator=torch.Generator().manual_seed(args.seed))
    eval_loader = warm_loader = None
    if eval_dataset is not None:
        eval_loader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)
    if warm_start_dataset is not None and args.imputer_warm_start:
        warm_loader = DataLoader(warm_start_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)
    return train_loader, eval_loader, warm_loader


def worker_settings(args: CalMRLTrainingArguments) -> dict[str, Any]:
    """The DataLoader options that only exist with workers (torch refuses them with `num_workers=0`)."""
    if not args.dataloader_num_workers:
        return {}
    return {"persistent_workers": args.dataloader_persistent_workers,
            "prefetch_factor": args.dataloader_prefetch_factor}


def build_optimizer(model: CalMRLModel, args: CalMRLTrainingArguments, num_processes: int):
    """AdamW over the trainable parameters and the learning-rate schedule: `(optimizer, scheduler)`.

    The matching head's parameters form a second group with its own rate and warm-up when
    `matching_learning_rate` or `matching_warmup_steps` is set (each group follows its own schedule)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    own_schedule = args.matching_learning_rate is not None or args.matching_warmup_steps is not None
    head = [p for name, p in trainable if own_schedule and name.startswith("fusion.")]
    head_ids = {id(p) for p in head}
    groups = [{"params": [p for _, p in trainable if id(p) not in head_ids]}]
    warmups = [args.warmup_steps]
    if head:
        groups.append({"params": head, "lr": args.matching_learning_rate or args.learning_rate})
        warmups.append(args.warmup_steps if args.matching_warmup_steps is None else args.matching_warmup_steps)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    if len(groups) == 1:
        return optimizer, get_scheduler(args.lr_scheduler_type, optimizer, **schedule_steps(args, args.warmup_steps,
                                                                                            num_processes))
    # lr_g(t) = base_lr_g * factor_g(t): each group its own warm-up, in the run's schedule type
    return optimizer, LambdaLR(optimizer, [schedule_factor(args, warmup, num_processes) for warmup in warmups])


def schedule_steps(args: CalMRLTrainingArguments, warmup_steps: int, num_processes: int) -> dict[str, int]:
    # accelerate steps a prepared scheduler once per process per optimizer step: scale the schedule to match
    return {"num_warmup_steps": warmup_steps * num_processes, "num_training_steps": args.max_steps * num_processes}


def schedule_factor(args: CalMRLTrainingArguments, warmup_steps: int, num_processes: int) -> Callable[[int], float]:
    """The learning-rate factor of step t of `lr_scheduler_type` with `warmup_steps` of warm-up."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only its schedule's factor is kept
    schedule = get_scheduler(args.lr_scheduler_type, probe, **schedule_steps(args, warmup_steps, num_processes))
    if not isinstance(schedule, LambdaLR):
        raise ValueError(f"matching_learning_rate / matching_warmup_steps need a step-wise schedule; "
                         f"lr_scheduler_type={args.lr_scheduler_type!r} is not one.")
    return schedule.lr_lambdas[0]


def keep_imputer_float32(model: CalMRLModel, saved: dict[str, torch.Tensor]) -> None:
    """Give the imputer back its float32 buffers `saved` before `accelerator.prepare` if the engine cast them
    (older DeepSpeed bf16 / fp16 engines cast the whole module; 0.19.8 casts buffers with `data_types.buffer_dtype`
    set, the imputer's too with `keep_in_fp32_modules` []; FSDP's and accelerate's mixed precision leave buffers
    alone): its closed-form statistics would not survive half precision, nor its modality codes."""
    if any(buffer.dtype in (torch.bfloat16, torch.float16) for buffer in model.imputer.buffers()):
        # as the engine cast them (`buffer.data = ...`): the imputer's `_apply` refuses dtype changes, so
        # `imputer.float()` would leave them in half precision and load_state_dict would round `saved` into them
        for name, value in saved.items():
            buffer = model.imputer.get_buffer(name)
            buffer.data = value.to(buffer.device)


def prepare_run(accelerator: Accelerator, args: CalMRLTrainingArguments, model, optimizer, scheduler, loaders,
                on_checkpoint) -> _Run:
    """`accelerator.prepare` everything, with the imputer step, the loop position and the run's manifest."""
    train_loader, eval_loader, warm_loader = loaders
    manifest = run_manifest(model, args, train_loader.dataset, accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.FSDP:  # its checkpoints' optimizer state: another layout
        manifest["optimizer_state_layout"] = "by parameter name (FSDP)"
    streaming = isinstance(train_loader.dataset, torch.utils.data.IterableDataset)
    imputer_state = {name: buffer.clone() for name, buffer in model.imputer.state_dict().items()}
    set_shard_groups(accelerator, model)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    keep_imputer_float32(accelerator.unwrap_model(model), imputer_state)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if warm_loader is not None:
        warm_loader = accelerator.prepare(warm_loader)
    imputer_step = ImputerUpdater(accelerator.unwrap_model(model), accelerator, args)
    state = _TrainState()
    if args.report_to:
        accelerator.init_trackers(TRACKER_PROJECT, config={k: v for k, v in asdict(args).items()
                                                    if isinstance(v, (int, float, str, bool))})
    return _Run(accelerator, args, model, optimizer, scheduler, train_loader, eval_loader, warm_loader,
                streaming, imputer_step, state, on_checkpoint, manifest,
                running_loss=torch.zeros((), device=accelerator.device))


def resume_or_warm_start(run: _Run, per_device: int) -> None:
    """Resume from `args.resume_from_checkpoint` ("latest": the newest complete one in output_dir/checkpoints), or
    else fit the imputer on the warm-start data by full EM and keep its statistics as a prior
    (`ImputerUpdater.seed`)."""
    args, accelerator = run.args, run.accelerator
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(args.output_dir)
        if resume is None:
            logger.info("No complete checkpoint in %s/checkpoints: starting from scratch.", args.output_dir)
    if resume:
        load_checkpoint(run, resume)
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


def run_manifest(model: CalMRLModel, args: CalMRLTrainingArguments, dataset, world_size: int) -> dict[str, Any]:
    """What a run is, as far as resuming goes: the model config, the training arguments that shape the trajectory,
    the train dataset (datasets' fingerprint where it has one, its length where known) and the process count."""
    config = model.config
    model_fields = {name: getattr(config, name) for name in vars(CalMRLConfig).get("__annotations__", {})}
    training = {name: value for name, value in asdict(args).items() if name not in ARGUMENTS_OUTSIDE_THE_TRAJECTORY}
    try:
        length = len(dataset)
    except TypeError:
        length = None
    return {"model": model_fields, "training": training,
            "dataset": {"fingerprint": getattr(dataset, "_fingerprint", None), "length": length},
            "world_size": world_size}


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir/checkpoints; interrupted or partial ones are skipped, with a
    warning naming them."""
    complete, incomplete = find_checkpoints(output_dir)
    newest = complete[-1][0] if complete else -1
    skipped = [path.name for path in incomplete if int(path.name.split("_")[1].split(".")[0]) > newest]
    if skipped:
        logger.warning("Skipped incomplete checkpoints %s in %s/checkpoints (a save was interrupted, or a folder was "
                       "copied in part); resuming from %s.", skipped, output_dir,
                       complete[-1][1].name if complete else "scratch", main_process_only=False)
    return str(complete[-1][1]) if complete else None


def save_checkpoint(run: _Run) -> None:
    """Checkpoint to output_dir/checkpoints/step_N (`checkpointing`: safetensors and JSON, no pickle; written as
    step_N.incomplete and renamed when complete): model, optimizer, schedule, imputer statistics, every process's
    RNG states, and the manifest (loop position, run, checksums). Keeps the newest `save_total_limit`."""
    accelerator, args, step = run.accelerator, run.args, run.state.global_step
    folder = Path(args.output_dir) / "checkpoints" / f"step_{step}"
    staging = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
    if accelerator.is_main_process:
        start_checkpoint(folder)
    accelerator.wait_for_everyone()
    # every process: collectives under sharded training (the main process gets the full states)
    model_state = accelerator.get_state_dict(run.model)
    optimizer_state = full_optimizer_state(accelerator, run.model, run.optimizer)
    files = {f"rng_state_{accelerator.process_index}.safetensors": lambda: state_file_bytes(capture_rng_state())}
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        files.update({
            "model.safetensors": lambda: save(model_state, metadata={"format": "pt"}),
            "optimizer.safetensors": lambda: state_file_bytes({"optimizer": optimizer_state, "scaler": scaler}),
            "scheduler.safetensors": lambda: state_file_bytes(run.scheduler.state_dict()),
            "imputer_statistics.safetensors": lambda: state_file_bytes(run.imputer_step.state_dict()),
        })
    write_checkpoint_files(staging, files)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_checkpoint(staging, {"format": MANIFEST_FORMAT, "position": run.state.state_dict(), "run": run.manifest})
        prune_checkpoints(args.output_dir, args.save_total_limit)
        if run.hub_pusher is not None:  # staged now, uploaded in the background
            run.hub_pusher.push(accelerator.unwrap_model(run.model), folder, step, recorded_arguments(args),
                                state_dict=model_state)
    accelerator.wait_for_everyone()
    if run.on_checkpoint is not None:
        run.on_checkpoint(step)


def check_resumed_run(run: _Run, manifest: dict[str, Any], folder: str) -> None:
    """Refuse to continue a different run: the differing manifest fields are named, unless
    `allow_resume_changes` lists them; a finished run (nothing left to train) only warns."""
    layouts = [m.get("optimizer_state_layout", "by position (DDP)") for m in (manifest["run"], run.manifest)]
    if layouts[0] != layouts[1]:  # not a setting that allow_resume_changes can let through: the states differ
        raise CheckpointError(f"{folder} holds its optimizer state {layouts[0]}, and this run needs it "
                              f"{layouts[1]}: resume a DDP checkpoint with DDP and an FSDP one with FSDP.")
    differences = manifest_differences(manifest["run"], run.manifest,
                                       [*run.args.allow_resume_changes, "optimizer_state_layout"])
    if not differences:
        return
    listed = "; ".join(differences)
    if manifest["position"]["global_step"] >= run.args.max_steps:
        logger.warning("Resuming the finished run of %s (nothing left to train) with other settings: %s.", folder,
                       listed)
        return
    names = sorted({difference.split(":")[0] for difference in differences})
    raise CheckpointError(f"{folder} was saved by a different run: {listed}. Resume with the same settings, or pass "
                          f"allow_resume_changes={names} to continue with the new ones.")


def load_checkpoint(run: _Run, folder: str) -> None:
    """Restore a checkpoint written by `save_checkpoint` (checksums verified, run compared) into the prepared run."""
    accelerator = run.accelerator
    manifest = read_manifest(folder)
    check_resumed_run(run, manifest, folder)
    root = Path(folder)
    load_full_model_state(accelerator, run.model, load_file(str(root / "model.safetensors")))
    optimizer_state = load_state_file(root / "optimizer.safetensors")
    load_full_optimizer_state(accelerator, run.model, run.optimizer, optimizer_state["optimizer"])
    if accelerator.scaler is not None and optimizer_state["scaler"] is not None:
        accelerator.scaler.load_state_dict(optimizer_state["scaler"])
    run.scheduler.load_state_dict(load_state_file(root / "scheduler.safetensors"))
    run.imputer_step.load_state_dict(load_state_file(root / "imputer_statistics.safetensors"))
    run.state.load_state_dict(manifest["position"])
    apply_changed_hyperparameters(run, manifest["run"]["training"])
    rng_file = root / f"rng_state_{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        restore_rng_state(load_state_file(rng_file), str(rng_file))
    else:  # only reachable when the number of processes changed and that was allowed
        logger.warning("%s has no random states for process %d: its dropout continues from the seed.", folder,
                       accelerator.process_index, main_process_only=False)


def apply_changed_hyperparameters(run: _Run, saved: dict[str, Any]) -> None:
    """A learning rate or weight decay that differs from the checkpoint's (allowed by `allow_resume_changes`)
    takes effect from the resumed step on: the loaded optimizer and schedule would otherwise keep the old ones."""
    args, optimizer = run.args, run.optimizer
    if saved.get("weight_decay") != args.weight_decay:
        for group in optimizer.param_groups:
            group["weight_decay"] = args.weight_decay
    if saved.get("learning_rate") == args.learning_rate:
        return
    schedule = getattr(run.scheduler, "scheduler", run.scheduler)  # accelerate's wrapper
    if not isinstance(schedule, LambdaLR):
        raise CheckpointError(f"Cannot apply the new learning rate {args.learning_rate} to a resumed "
                              f"{type(schedule).__name__} schedule; resume with "
                              f"learning_rate={saved['learning_rate']}.")
    # lr_t = base_lr * factor(t): the same schedule position, the new base
    # the matching head's group (second, when it has its own schedule) keeps matching_learning_rate if set
    head_rate = args.matching_learning_rate or args.learning_rate
    schedule.base_lrs = [args.learning_rate if index == 0 else head_rate for index in range(len(schedule.base_lrs))]
    rates = [base * factor(schedule.last_epoch) for factor, base in zip(schedule.lr_lambdas, schedule.base_lrs)]
    for group, rate, base in zip(optimizer.param_groups, rates, schedule.base_lrs):
        group["lr"], group["initial_lr"] = rate, base
    schedule._last_lr = rates
    logger.info("Learning rate changed on resume: %s -> %s (now %s at step %d).", saved.get("learning_rate"),
                args.learning_rate, rates[0], run.state.global_step)


def train_step(run: _Run, batch) -> bool:
    """One micro-batch of the bi-step: the imputer step (inside forward, `imputer_update_fn`), then the encoder
    step. True when it completes an optimizer step (the last micro-batch of a gradient accumulation)."""
    accelerator, args = run.accelerator, run.args
    with accelerator.accumulate(run.model):
        outputs = run.model(**model_inputs(batch), return_loss=True, imputer_update_fn=run.imputer_step)
        accelerator.backward(outputs.loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            # the prepared model's parameters (frozen ones have no gradient), not a list taken before prepare:
            # FSDP2's fully_shard replaces them with sharded ones
            accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
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
        if args.report_to:
            accelerator.log({"train/loss": run.losses[-1], "train/lr": run.scheduler.get_last_lr()[0]}, step=step)
    if run.eval_loader is not None and args.eval_steps and step % args.eval_steps == 0:
        metrics = evaluate(run.model, run.eval_loader, accelerator, args.eval_pairs)
        train_mode(run)
        if args.report_to:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if args.save_steps and step % args.save_steps == 0:
        save_checkpoint(run)


def run_epoch(run: _Run, progress) -> bool:
    """One pass over the train loader (after a resume, the rest of the interrupted epoch). True when the epoch
    ran out, False when `max_steps` ended it."""
    state = run.state
    run.train_loader.set_epoch(state.epoch)
    if run.train_loader.generator is not None:  # the same draws in an epoch, resumed or not
        run.train_loader.generator.manual_seed(run.args.seed + state.epoch)
    skip = state.batches_in_epoch
    if skip == 0:
        run.imputer_step.start_epoch()
    loader = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    train_mode(run)
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
    # a bar on a terminal, log lines every logging_steps in a log file
    progress = step_progress(args.max_steps, state.global_step, f"training {Path(args.output_dir).name}",
                             enabled=run.accelerator.is_local_main_process)
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
        if args.report_to:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)  # every process: the full state gathered under sharding
    model = accelerator.unwrap_model(run.model)
    with as_its_own_class(model):  # not FSDP2's FSDPCalMRLModel: its code and auto_map are the model's
        model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict,
                              save_function=accelerator.save)
    if accelerator.is_main_process:
        if processor is not None:
            processor.save_pretrained(args.output_dir)
        results = {"global_step": step, "final_loss": run.losses[-1] if run.losses else None, **metrics}
        Path(args.output_dir, "train_results.json").write_text(json.dumps(results, indent=2))
        recorded_args = recorded_arguments(args)
        Path(args.output_dir, "training_args.json").write_text(json.dumps(recorded_args, indent=2, default=str))
        from ..sharing.hub import write_model_card

        write_model_card(args.output_dir, repo_id=args.hub_model_id, metrics=metrics, training_args=recorded_args)
    accelerator.wait_for_everyone()
    if run.hub_pusher is not None:
        run.hub_pusher.wait()  # the last checkpoint's upload lands before the final model's
    if args.push_to_hub and accelerator.is_main_process:
        from ..sharing.hub import push_to_hub  # only needed when pushing

        push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, endpoint=args.hub_endpoint,
                    private=args.hub_private_repo)
    if args.report_to:
        accelerator.end_training()
    return metrics


def recorded_arguments(args: CalMRLTrainingArguments) -> dict[str, Any]:
    """The training arguments as written to `training_args.json` and the model card (never the Hub token)."""
    return {k: v for k, v in asdict(args).items() if k != "hub_token"}


def build_hub_pusher(args: CalMRLTrainingArguments, accelerator: Accelerator, processor=None) -> CheckpointPusher | None:
    """The main process's `CheckpointPusher` for `hub_strategy` "every_save" / "checkpoint" (None otherwise)."""
    if not args.push_to_hub or args.hub_strategy == "end" or not accelerator.is_main_process:
        return None
    return CheckpointPusher(args.hub_model_id, args.hub_strategy, processor=processor, token=args.hub_token,
                            endpoint=args.hub_endpoint, private=args.hub_private_repo)


def train(
    model: CalMRLModel,
    train_dataset,
    args: CalMRLTrainingArguments,
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
    args = resolve_launch_settings(args, accelerator)
    per_device = validate_setup(
        model, {"train": train_dataset, "eval": eval_dataset, "warm start": warm_start_dataset}, args,
        accelerator.num_processes,
    )
    ensure_writable_directory(args.output_dir)  # every process writes there (its RNG states): fail now, not at the end
    refuse_unsupported_engine_settings(args, accelerator)
    check_checkpoint_folders(accelerator, args)
    set_seed(args.seed)
    freeze_modules(model, args)
    loaders = build_dataloaders(train_dataset, eval_dataset, warm_start_dataset, collate_fn, per_device, args,
                                on_gpu=accelerator.device.type == "cuda")
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


__all__ = ["CalMRLTrainingArguments", "ImputerUpdater", "TrainOutput", "build_accelerator",
           "build_dataloaders", "build_hub_pusher", "build_optimizer", "dataset_modalities", "embed_dataset",
           "evaluate", "finish", "freeze_modules", "is_sharded", "keep_imputer_float32", "latest_checkpoint", "load_checkpoint", "prepare_run",
           "recorded_arguments", "resume_or_warm_start", "run_epoch", "run_epochs", "run_manifest", "save_checkpoint",
           "train", "train_step", "validate_setup", "warm_start_imputer"]
