"""What `train` builds before its loop: checks, frozen modules, data loaders, optimizer and schedule, and
`accelerator.prepare` (with the imputer kept in float32 and FSDP2's shard groups set)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ..data.loaders import dataset_modalities
from ..modeling_calmrl import CalMRLModel
from ..sharing.hub import TRACKER_PROJECT, CheckpointPusher
from .arguments import CalMRLTrainingArguments, recorded_arguments
from .fsdp import set_shard_groups


# The `train` argument that gives each dataset role `validate_setup` checks.
ROLE_ARGUMENTS = {"train": "train_dataset", "eval": "eval_dataset", "warm start": "warm_start_dataset"}


def validate_setup(model: CalMRLModel, datasets: dict[str, Any], args: CalMRLTrainingArguments,
                   num_processes: int) -> int:
    """Fail before training starts, with a message that says what to change. Returns the per-device batch size."""
    modalities = model.config.modalities
    for role, dataset in datasets.items():
        if dataset is None:
            continue
        if hasattr(dataset, "__len__") and len(dataset) == 0:  # a streaming dataset may not know its length
            instead = "" if role == "train" else f", or pass {ROLE_ARGUMENTS.get(role, role)}=None to do without it"
            raise ValueError(f"The {role} dataset is empty (0 rows): give it rows{instead}.")
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
    unknown_pairs = sorted({m for pair in args.eval_pairs or () for m in pair if m not in modalities})
    if unknown_pairs:
        raise ValueError(f"eval_pairs name unknown modalities {unknown_pairs}; the modalities are {modalities}.")
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


def freeze_modules(model: CalMRLModel, args: CalMRLTrainingArguments) -> None:
    """Keep the towers of `freeze_modalities` and the heads of `freeze_projections` fixed; with
    `gradient_checkpointing`, the towers recompute their activations in backward."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    for name in args.freeze_modalities:
        model.encoders[model.config.encoder_owner(name)].requires_grad_(False)
    for name in args.freeze_projections:
        model.projections[name].requires_grad_(False)


def build_dataloaders(train_dataset, eval_dataset, warm_start_dataset, collate_fn: Callable, per_device: int,
                      args: CalMRLTrainingArguments, on_gpu: bool = False,
                      ) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    """(train, eval, warm-start) loaders; eval and warm start are None where there is no dataset (or no warm
    start asked for). Train batches are whole (`drop_last`); a map-style train set is shuffled by the loader,
    a streaming one shuffles itself (e.g. `dataset.shuffle(seed, buffer_size)`), reshuffled every epoch."""
    streaming = isinstance(train_dataset, torch.utils.data.IterableDataset)
    # the loader's own generator (reseeded every epoch, `loop.epoch_batches`): its draws never touch the global RNG,
    # whose state at a checkpoint is then exactly what dropout continues from after a resume
    train_loader = DataLoader(train_dataset, batch_size=per_device, shuffle=not streaming, drop_last=True,
                              collate_fn=collate_fn, num_workers=args.dataloader_num_workers,
                              pin_memory=args.dataloader_pin_memory and on_gpu, **worker_settings(args),
                              generator=torch.Generator().manual_seed(args.seed))
    eval_loader = warm_loader = None
    # the eval loader has its own generator too: without one it draws its base seed from the global RNG at every pass,
    # and an evaluation during training would change the dropout that follows it
    if eval_dataset is not None:
        eval_loader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn,
                                 generator=torch.Generator().manual_seed(args.seed))
    if warm_start_dataset is not None and args.imputer_warm_start:
        warm_loader = DataLoader(warm_start_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)
    return train_loader, eval_loader, warm_loader


def with_epoch_steps(args: CalMRLTrainingArguments, train_loader: DataLoader,
                     num_processes: int) -> CalMRLTrainingArguments:
    """`args` with `max_steps` from `num_train_epochs` when max_steps was not given (Trainer's rule):
    max_steps = ceil(num_train_epochs x ceil(batches / gradient_accumulation_steps)), batches being one process's
    whole batches of an epoch (accelerate's sharded loader gives each process len(loader) // processes); a
    `warmup_steps` ratio becomes steps of that length. A train dataset without a length cannot count epochs."""
    if args.max_steps is not None:
        return args
    if isinstance(train_loader.dataset, torch.utils.data.IterableDataset):
        raise ValueError(f"num_train_epochs={args.num_train_epochs} needs a train dataset whose length is known, to "
                         f"count an epoch's steps; this one is streaming ({type(train_loader.dataset).__name__}): "
                         f"give max_steps (optimizer steps) instead.")
    batches = len(train_loader) // num_processes
    accumulation = args.gradient_accumulation_steps or 1
    steps_per_epoch = max(math.ceil(batches / accumulation), 1)
    return replace(args, max_steps=max(math.ceil(args.num_train_epochs * steps_per_epoch), 1))


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
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if len(groups) == 1:
        return optimizer, get_scheduler(args.lr_scheduler_type, optimizer, **schedule_steps(args, args.warmup_steps,
                                                                                            num_processes))
    # lr_g(t) = base_lr_g * factor_g(t): each group its own warm-up, in the run's schedule type
    return optimizer, LambdaLR(optimizer, [schedule_factor(args, warmup, num_processes) for warmup in warmups])


# the settings of `lr_scheduler_kwargs` counted in steps (scaled with the schedule, `schedule_steps`)
SCHEDULE_STEP_SETTINGS = ("num_decay_steps", "num_stable_steps", "timescale")


def schedule_steps(args: CalMRLTrainingArguments, warmup_steps: int, num_processes: int) -> dict[str, Any]:
    """`get_scheduler`'s step counts and `lr_scheduler_kwargs`. accelerate steps a prepared scheduler once per
    process per optimizer step: every count of steps is scaled to match."""
    steps = {"num_warmup_steps": warmup_steps * num_processes, "num_training_steps": args.max_steps * num_processes}
    if args.lr_scheduler_kwargs:
        steps["scheduler_specific_kwargs"] = {
            name: value * num_processes if name in SCHEDULE_STEP_SETTINGS and value is not None else value
            for name, value in args.lr_scheduler_kwargs.items()}
    return steps


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


def prepare_training(accelerator: Accelerator, model: CalMRLModel, optimizer, train_loader: DataLoader, scheduler):
    """`accelerator.prepare` of what trains: `(model, optimizer, train_loader, scheduler)`, prepared, with the
    imputer's float32 buffers as they were (`keep_imputer_float32`) and, under FSDP2, the model's shard groups."""
    imputer_state = {name: buffer.clone() for name, buffer in model.imputer.state_dict().items()}
    set_shard_groups(accelerator, model)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    keep_imputer_float32(accelerator.unwrap_model(model), imputer_state)
    return model, optimizer, train_loader, scheduler


def start_trackers(accelerator: Accelerator, args: CalMRLTrainingArguments) -> None:
    """The trackers of `report_to` (none without), with the run's scalar arguments as their config: the recorded
    ones (`recorded_arguments`), never the Hub token (tensorboard writes its config to hparams.yml and the event
    file, wandb / mlflow to their servers)."""
    if args.report_to:
        accelerator.init_trackers(TRACKER_PROJECT, config={k: v for k, v in recorded_arguments(args).items()
                                                           if isinstance(v, (int, float, str, bool))})


def build_hub_pusher(args: CalMRLTrainingArguments, accelerator: Accelerator,
                     processor=None) -> CheckpointPusher | None:
    """The main process's `CheckpointPusher` for `hub_strategy` "every_save" / "checkpoint" (None otherwise)."""
    if not args.push_to_hub or args.hub_strategy == "end" or not accelerator.is_main_process:
        return None
    return CheckpointPusher(args.hub_model_id, args.hub_strategy, processor=processor, token=args.hub_token,
                            endpoint=args.hub_endpoint, private=args.hub_private_repo, hub_timeout=args.hub_timeout,
                            hub_retries=args.hub_retries)


__all__ = ["build_dataloaders", "build_hub_pusher", "build_optimizer", "freeze_modules", "keep_imputer_float32",
           "prepare_training", "schedule_factor", "schedule_steps", "start_trackers", "validate_setup",
           "with_epoch_steps", "worker_settings"]
