"""The CalMRL training loop on accelerate: the paper's bi-step, every step.

(i)  imputer step (`imputer_step.ImputerUpdater`): sufficient statistics of the batch's detached embeddings
     (observed entries only), summed across processes with one all-reduce, accumulated (exponential moving average
     or per epoch), closed-form M-step; every process runs the identical M-step on identical statistics.
(ii) encoder step: the alignment loss on observed + imputed embeddings (or observed only, or mean / zero
     imputation: the baselines run through the same loop, only `config.imputer_method` differs).

One `Accelerator` owns devices, processes, mixed precision, gradient accumulation and trackers. `train` reads top
to bottom like accelerate's `complete_nlp_example.py`: build the loaders, optimizer and schedule (`setup`),
`accelerator.prepare` them, resume from a checkpoint (`resume`) or warm-start the imputer, loop over epochs
(`run_epochs`, one micro-batch at a time in `train_step`), then evaluate and save (`finish`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from ..modeling_calmrl import CalMRLModel
from ..sharing.hub import CheckpointPusher, HubPushError, push_to_hub, write_model_card
from .arguments import CalMRLTrainingArguments, recorded_arguments
from .calibration import Calibration, ImputationFn
from .checkpoints import ensure_writable_directory
from .compiling import compile_model
from .evaluation import evaluate
from .fsdp import as_its_own_class
from .imputer_step import ImputerUpdater, warm_start, warm_start_window
from .launch import (
    build_accelerator, check_checkpoint_folders, lock_output_dir, refuse_unsupported_engine_settings,
    resolve_launch_settings,
)
from .progress import step_progress
from .resume import RunCheckpoints, checkpoint_to_resume, run_manifest
from .setup import (
    build_dataloaders, build_hub_pusher, build_optimizer, freeze_modules, prepare_training, start_trackers,
    validate_setup, with_epoch_steps,
)


logger = get_logger(__name__)


@dataclass
class TrainOutput:
    output_dir: str
    global_step: int
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step (all processes)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, metrics) every eval_steps


@dataclass
class TrainPosition:
    """Where the loop is, saved in every checkpoint's manifest: the optimizer step, and the epoch and micro-batch
    within it, so a resumed run skips exactly the batches already seen (also for streaming datasets, whose length
    is unknown)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


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
    imputation_fn: ImputationFn | None = None,
) -> TrainOutput:
    """Train `model` with CalMRL's bi-step; save model (and processor) to `args.output_dir` at the end.

    `train_dataset` yields examples that `collate_fn` turns into model inputs (`{modality}_{field}` tensors and
    `modality_mask`). `on_checkpoint(step)` is called after each checkpoint (tests use it to stop a run).
    `imputation_fn(model, batch) -> (imputations, batch)` supplies the imputed columns from elsewhere (diagnostics:
    the true embeddings of the hidden modalities); the teacher and `imputation_source` are `args`' (`calibration`).
    """
    accelerator = accelerator or build_accelerator(args)
    args = resolve_launch_settings(args, accelerator)
    per_device = validate_setup(
        model, {"train": train_dataset, "eval": eval_dataset, "warm start": warm_start_dataset}, args,
        accelerator.num_processes,
    )
    ensure_writable_directory(args.output_dir)  # every process writes there (its RNG states): fail now, not at the end
    refuse_unsupported_engine_settings(args, accelerator)
    lock = lock_output_dir(accelerator, args.output_dir)  # one run at a time in output_dir (main process holds it)
    try:
        return _train_holding_lock(model, train_dataset, args, accelerator, per_device, collate_fn=collate_fn,
                                   eval_dataset=eval_dataset, warm_start_dataset=warm_start_dataset,
                                   processor=processor, on_checkpoint=on_checkpoint, imputation_fn=imputation_fn)
    finally:
        if lock is not None:
            lock.release()


def _train_holding_lock(model, train_dataset, args: CalMRLTrainingArguments, accelerator: Accelerator,
                        per_device: int, *, collate_fn, eval_dataset, warm_start_dataset, processor, on_checkpoint,
                        imputation_fn) -> TrainOutput:
    """`train` once output_dir is this run's (`lock_output_dir`)."""
    check_checkpoint_folders(accelerator, args)
    set_seed(args.seed)
    freeze_modules(model, args)
    calibration = Calibration(model, args, train_dataset, accelerator, imputation_fn)
    train_loader, eval_loader, warm_loader = build_dataloaders(
        train_dataset, eval_dataset, warm_start_dataset, collate_fn, per_device, args,
        on_gpu=accelerator.device.type == "cuda",
    )
    args = with_epoch_steps(args, train_loader, accelerator.num_processes)  # max_steps from num_train_epochs
    if args.torch_compile:
        compile_model(model, backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    optimizer, scheduler = build_optimizer(model, args, accelerator.num_processes)
    manifest = run_manifest(model, args, train_loader.dataset, accelerator)
    streaming = isinstance(train_loader.dataset, torch.utils.data.IterableDataset)  # it may not know its length

    model, optimizer, train_loader, scheduler = prepare_training(accelerator, model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if warm_loader is not None:
        warm_loader = accelerator.prepare(warm_loader)
    imputer_step = ImputerUpdater(accelerator.unwrap_model(model), accelerator, args)
    start_trackers(accelerator, args)
    hub_pusher = build_hub_pusher(args, accelerator, processor)
    checkpoints = RunCheckpoints(accelerator, args, manifest, model, optimizer, scheduler, imputer_step,
                                 calibration=calibration, hub_pusher=hub_pusher, on_checkpoint=on_checkpoint)
    position = TrainPosition()
    try:
        resume = checkpoint_to_resume(args)
        if resume:
            calibration.start(accelerator.unwrap_model(model))  # its teacher's weights come from the checkpoint
            checkpoints.load(resume, position)
        else:
            if warm_loader is not None:  # the imputer's fit on full-modality data stays as a prior
                window_rows = warm_start_window(args, per_device * accelerator.num_processes, train_loader, streaming)
                warm_start(imputer_step, model, warm_loader, accelerator, args.imputer_warm_start_max_iter,
                           window_rows)
            calibration.start(accelerator.unwrap_model(model))  # the teacher: the model as the run starts
        checkpoints.claim_folder(position.global_step)  # later checkpoints of an abandoned run: set aside
        eval_history: list[tuple[int, dict[str, float]]] = []
        losses = run_epochs(accelerator, args, model, optimizer, scheduler, train_loader, imputer_step, position,
                            calibration, eval_loader=eval_loader, checkpoints=checkpoints, eval_history=eval_history)
        metrics = finish(accelerator, args, model, eval_loader, position.global_step, losses, processor=processor,
                         hub_pusher=hub_pusher)
    finally:
        if hub_pusher is not None:  # an upload in flight lands even when the run stops with an error
            hub_pusher.wait()
    return TrainOutput(output_dir=args.output_dir, global_step=position.global_step, metrics=metrics, losses=losses,
                       eval_history=eval_history)


def run_epochs(accelerator: Accelerator, args: CalMRLTrainingArguments, model, optimizer, scheduler,
               train_loader: DataLoader, imputer_step: ImputerUpdater, position: TrainPosition,
               calibration: Calibration, *, eval_loader: DataLoader | None, checkpoints: RunCheckpoints,
               eval_history: list | None = None) -> list[float]:
    """Epochs from `position` until `max_steps` optimizer steps: the bi-step on every micro-batch (`train_step`);
    after each optimizer step, logging, evaluation every `eval_steps` and a checkpoint every `save_steps`; with
    `eval_strategy` / `save_strategy` "epoch", both at the end of each epoch (`end_epoch`).
    Returns the mean loss of each optimizer step (all processes); each evaluation's (step, metrics) is appended to
    `eval_history`."""
    step_losses: list[torch.Tensor] = []  # 0-dim each, on the device
    running_loss, running_count = torch.zeros((), device=accelerator.device), 0  # the micro-batches of one step
    unwrapped = accelerator.unwrap_model(model)
    # a bar on a terminal (also under accelerate launch), elsewhere a line on stderr every logging_steps
    with step_progress(args.max_steps, position.global_step, f"training {Path(args.output_dir).name}",
                       enabled=accelerator.is_local_main_process and not args.disable_tqdm) as progress:
        while position.global_step < args.max_steps:
            resumed_mid_epoch = position.batches_in_epoch > 0
            steps_before = position.global_step
            batches = epoch_batches(accelerator, train_loader, imputer_step, position, args.seed)
            train_mode(model, accelerator, args)
            for batch in batches:
                position.batches_in_epoch += 1
                running_loss += train_step(accelerator, model, optimizer, scheduler, imputer_step, calibration, batch,
                                           args.max_grad_norm, unwrapped)
                running_count += 1
                if not accelerator.sync_gradients:  # inside a gradient accumulation
                    continue
                position.global_step += 1
                step = position.global_step
                # kept on the device: read back at logging steps and once at the end, not every step
                step_losses.append(accelerator.reduce(running_loss / running_count, reduction="mean"))
                running_loss = torch.zeros((), device=accelerator.device)
                running_count = 0
                progress.update(1)
                log_step(accelerator, args, scheduler, progress, step, step_losses[-1], train_loader.collate_fn)
                if eval_loader is not None and args.eval_steps and step % args.eval_steps == 0:
                    metrics = evaluate_during_training(accelerator, args, model, eval_loader, step)
                    if eval_history is not None:
                        eval_history.append((step, metrics))
                if args.save_steps and step % args.save_steps == 0:
                    checkpoints.save(position)
                if step >= args.max_steps:
                    break
            else:  # the epoch ran out (after a resume: the rest of the interrupted one)
                position.epoch += 1
                position.batches_in_epoch = 0
                if position.global_step == 0 and not resumed_mid_epoch:
                    raise ValueError("The train dataset yields no full batch: lower the batch size.")
            if position.global_step > steps_before:  # not an epoch a resume found already done
                end_epoch(accelerator, args, model, position, eval_loader, checkpoints, eval_history)
    return torch.stack(step_losses).tolist() if step_losses else []  # one read for the run's losses


def end_epoch(accelerator: Accelerator, args: CalMRLTrainingArguments, model, position: TrainPosition,
              eval_loader: DataLoader | None, checkpoints: RunCheckpoints, eval_history: list | None) -> None:
    """The end of an epoch (or of the run, where max_steps ends it mid-epoch, as in Trainer): evaluate, then
    checkpoint, where `eval_strategy` / `save_strategy` is "epoch"."""
    if eval_loader is not None and args.eval_strategy == "epoch":
        metrics = evaluate_during_training(accelerator, args, model, eval_loader, position.global_step)
        if eval_history is not None:
            eval_history.append((position.global_step, metrics))
    if args.save_strategy == "epoch":
        checkpoints.save(position)


def epoch_batches(accelerator: Accelerator, train_loader: DataLoader, imputer_step: ImputerUpdater,
                  position: TrainPosition, seed: int):
    """The train loader at the start of `position.epoch`, or where a resumed run left it: the batches already seen
    in the epoch are skipped. A new epoch restarts the imputer's per-epoch statistics."""
    train_loader.set_epoch(position.epoch)
    if train_loader.generator is not None:  # the same draws in an epoch, resumed or not
        train_loader.generator.manual_seed(seed + position.epoch)
    skip = position.batches_in_epoch
    if skip == 0:
        imputer_step.start_epoch()
    return accelerator.skip_first_batches(train_loader, skip) if skip else train_loader


def train_mode(model, accelerator: Accelerator, args: CalMRLTrainingArguments) -> None:
    """`model.train()`, except the frozen towers, which stay in eval mode: a frozen tower is a fixed function, so
    its dropout stays off and its batch-norm statistics do not drift with the training batches."""
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    for name in args.freeze_modalities:
        unwrapped.encoders[unwrapped.config.encoder_owner(name)].eval()


def train_step(accelerator: Accelerator, model, optimizer, scheduler, imputer_step: ImputerUpdater,
               calibration: Calibration, batch, max_grad_norm: float | None, unwrapped) -> torch.Tensor:
    """One micro-batch of the bi-step: the imputer step (inside forward, `imputer_update_fn`), then the encoder
    step (an optimizer step on the last micro-batch of a gradient accumulation) on the alignment loss plus the
    teacher's term (`calibration`); an EMA teacher follows each optimizer step. Returns the detached loss.
    `unwrapped`: `accelerator.unwrap_model(model)`, taken once per run by the caller (it walks the modules)."""
    with accelerator.accumulate(model):
        inputs, extra, teacher_view = calibration.prepare(unwrapped, batch)
        outputs = model(**inputs, return_loss=True, imputer_update_fn=imputer_step, **extra)
        loss = calibration.loss(unwrapped, outputs, teacher_view)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm:
            # the prepared model's parameters (frozen ones have no gradient), not a list taken before prepare:
            # FSDP2's fully_shard replaces them with sharded ones
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    if accelerator.sync_gradients:
        calibration.update(unwrapped)  # t <- decay * t + (1 - decay) * theta, after the optimizer step
    return loss.detach().float()


def log_step(accelerator: Accelerator, args: CalMRLTrainingArguments, scheduler, progress, step: int,
             loss: torch.Tensor | float, collate_fn: Callable | None = None) -> None:
    """Every `logging_steps`: the step's loss and the examples the collator dropped so far (its
    `dropped_examples`, summed over processes) on the progress (`step_progress`) and, with trackers, loss and
    learning rate. Every process calls it at the same steps (the sum is a collective)."""
    if step % args.logging_steps == 0 or step == args.max_steps:
        loss = float(loss)  # the step's one read of its loss, at logging steps only
        progress.log(loss, dropped=dropped_examples(accelerator, collate_fn))
        if args.report_to:
            accelerator.log({"train/loss": loss, "train/lr": scheduler.get_last_lr()[0]}, step=step)


def dropped_examples(accelerator: Accelerator, collate_fn: Callable | None) -> int:
    """The examples `collate_fn` dropped so far on every process (`CalMRLCollator.dropped_examples`, counted in
    the DataLoader workers too); 0 for a collate function that drops none."""
    count = getattr(collate_fn, "dropped_examples", None)
    if not isinstance(count, int):
        return 0
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum").item())


def evaluate_during_training(accelerator: Accelerator, args: CalMRLTrainingArguments, model,
                             eval_loader: DataLoader, step: int) -> dict[str, float]:
    """Evaluate (`evaluate`), log the metrics to the trackers, go back to training mode; returns the metrics."""
    metrics = evaluate(model, eval_loader, accelerator, args.eval_pairs)
    train_mode(model, accelerator, args)
    if args.report_to:
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


def finish(accelerator: Accelerator, args: CalMRLTrainingArguments, model, eval_loader: DataLoader | None,
           step: int, losses: list[float], *, processor=None,
           hub_pusher: CheckpointPusher | None = None) -> dict[str, float]:
    """Evaluate (with an eval set), save model and processor, the run's results, arguments and model card
    (`save_final_model`), push where asked. Returns the evaluation metrics."""
    metrics: dict[str, float] = {}
    if eval_loader is not None:
        metrics = evaluate(model, eval_loader, accelerator, args.eval_pairs)
        if args.report_to:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    accelerator.wait_for_everyone()
    results = {"global_step": step, "final_loss": losses[-1] if losses else None, **metrics}
    save_final_model(accelerator, args, model, processor, results, metrics)
    accelerator.wait_for_everyone()
    if hub_pusher is not None:
        hub_pusher.wait()  # the last checkpoint's upload lands before the final model's
    if args.push_to_hub and accelerator.is_main_process:
        try:
            push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, endpoint=args.hub_endpoint,
                        private=args.hub_private_repo, hub_timeout=args.hub_timeout, hub_retries=args.hub_retries)
        except HubPushError as error:  # the run is saved: a Hub that fails or does not answer costs the push only
            logger.warning("The final push of %s to %s failed: %s. The model is saved locally; push it later with "
                           "calmrl_hf.sharing.push_to_hub.", args.output_dir, args.hub_model_id, error)
    if args.report_to:
        accelerator.end_training()
    return metrics


def save_final_model(accelerator: Accelerator, args: CalMRLTrainingArguments, model, processor,
                     results: dict[str, Any], metrics: dict[str, float]) -> None:
    """`save_pretrained` of model and processor to output_dir, with train_results.json, training_args.json and the
    model card. Every process calls it: the full state is gathered under sharding."""
    unwrapped = accelerator.unwrap_model(model)
    if is_peft_model(unwrapped):
        save_peft_model(accelerator, args, unwrapped)
    else:
        state_dict = accelerator.get_state_dict(model)
        with as_its_own_class(unwrapped):  # not FSDP2's FSDPCalMRLModel: its code and auto_map are the model's
            unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                      state_dict=state_dict, save_function=accelerator.save)
    if not accelerator.is_main_process:
        return
    if processor is not None:
        processor.save_pretrained(args.output_dir)
    Path(args.output_dir, "train_results.json").write_text(json.dumps(results, indent=2))
    recorded_args = recorded_arguments(args)
    Path(args.output_dir, "training_args.json").write_text(json.dumps(recorded_args, indent=2, default=str))
    write_model_card(args.output_dir, repo_id=args.hub_model_id, metrics=metrics, training_args=recorded_args)


def is_peft_model(model) -> bool:
    """A peft `PeftModel` wrapping the CalMRL model (`get_peft_model(model, LoraConfig(...))`)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_peft_model(accelerator: Accelerator, args: CalMRLTrainingArguments, peft_model) -> None:
    """A peft-wrapped model's output_dir: the trained model whole, its adapters merged into a copy (config,
    weights, the imputer's fit: `AutoModel.from_pretrained(output_dir)`), and the adapter as peft saves it in
    `output_dir/adapter` (`PeftModel.from_pretrained(base, output_dir + "/adapter")`). Apart: transformers loads an
    adapter it finds next to a model on top of it, which would apply the merged adapters twice."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError("Saving a peft-wrapped model trained under FSDP or DeepSpeed is not supported: train it "
                         "with DDP, or use CalMRLConfig(lora=...) (the package's own adapters).")
    peft_model.save_pretrained(str(Path(args.output_dir) / "adapter"), is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        merged = copy.deepcopy(peft_model).merge_and_unload()  # the trained weights, adapters folded in
        merged.save_pretrained(args.output_dir)


__all__ = ["TrainOutput", "TrainPosition", "dropped_examples", "end_epoch", "epoch_batches", "evaluate_during_training",
           "finish", "log_step", "is_peft_model", "run_epochs", "save_final_model", "save_peft_model", "train",
           "train_mode", "train_step"]
