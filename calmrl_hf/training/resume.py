"""Resuming a run: what the run is (`run_manifest`), its checkpoints (`RunCheckpoints`: saved at the loop's position,
loaded into the prepared objects), which one to resume (`checkpoint_to_resume`, `latest_checkpoint`), and what a
resume checks and allows to change (`check_resumed_run`, `apply_changed_hyperparameters`).

Checkpoints are the package's own (`checkpoints`: safetensors and JSON, atomic, verified, with the run's manifest),
not accelerate's `save_state`, whose pickled custom states `load_state` would unpickle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save
from torch.optim.lr_scheduler import LambdaLR

from ..configuration_calmrl import CalMRLConfig
from ..modeling_calmrl import CalMRLModel
from ..sharing.hub import CheckpointPusher
from .arguments import CalMRLTrainingArguments, recorded_arguments
from .checkpoints import (
    INCOMPLETE_SUFFIX, MANIFEST_FORMAT, MANIFEST_NAME, CheckpointError, capture_rng_state, checkpoint_file, commit_checkpoint,
    find_checkpoints, json_safe, load_state_file, manifest_differences, new_run_id, prune_checkpoints, read_manifest,
    restore_rng_state, set_aside_checkpoints, start_checkpoint, state_file_bytes, write_checkpoint_files,
)
from .fsdp import full_optimizer_state, load_full_model_state, load_full_optimizer_state
from .imputer_step import ImputerUpdater
from .launch import run_on_main_process
from .teacher import TEACHER_FILE

if TYPE_CHECKING:
    from .calibration import Calibration
    from .loop import TrainPosition


logger = get_logger(__name__)

# Arguments that do not change what a resumed run computes: they may differ from the checkpoint's run.
ARGUMENTS_OUTSIDE_THE_TRAJECTORY = frozenset({
    "output_dir", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint",
    "allow_resume_changes", "report_to", "dataloader_num_workers", "use_cpu", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "per_device_eval_batch_size", "eval_pairs",
    "push_to_hub", "hub_strategy", "hub_model_id", "hub_endpoint", "hub_token", "hub_private_repo", "hub_timeout",
    "hub_retries", "logging_dir", "eval_strategy", "save_strategy", "disable_tqdm",
    # the run's length is its max_steps (recorded, counted from the epochs), its warm-up its warmup_steps
    "num_train_epochs", "warmup_ratio",
    # compiled and eager steps compute the same function (equal within rounding: tests/test_compile.py)
    "torch_compile", "torch_compile_backend", "torch_compile_mode",
})


def run_manifest(model: CalMRLModel, args: CalMRLTrainingArguments, dataset,
                 accelerator: Accelerator) -> dict[str, Any]:
    """What a run is, as far as resuming goes: the model config, the training arguments that shape the trajectory,
    the train dataset (datasets' fingerprint where it has one, its length where known), the process count and,
    under FSDP, the optimizer state's layout (by parameter name, DDP's by position)."""
    config = model.config
    model_fields = {name: getattr(config, name) for name in vars(CalMRLConfig).get("__annotations__", {})}
    training = {name: value for name, value in asdict(args).items() if name not in ARGUMENTS_OUTSIDE_THE_TRAJECTORY}
    try:
        length = len(dataset)
    except TypeError:
        length = None
    manifest = {"model": model_fields, "training": training,
                "dataset": {"fingerprint": getattr(dataset, "_fingerprint", None), "length": length},
                "world_size": accelerator.num_processes}
    if accelerator.distributed_type == DistributedType.FSDP:
        manifest["optimizer_state_layout"] = "by parameter name (FSDP)"
    return manifest


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


def checkpoint_to_resume(args: CalMRLTrainingArguments) -> str | None:
    """The checkpoint `resume_from_checkpoint` names ("latest": the newest complete one in output_dir/checkpoints,
    None when there is none), or None."""
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(args.output_dir)
        if resume is None:
            logger.info("No complete checkpoint in %s/checkpoints: starting from scratch.", args.output_dir)
    return resume


def extends_the_run(checkpoint_manifest: dict[str, Any], args: CalMRLTrainingArguments) -> bool:
    """Whether this run continues the checkpoint's with a larger `max_steps` (allowed without
    `allow_resume_changes`, as transformers' Trainer allows it: the schedule is rebuilt for the new length)."""
    saved = checkpoint_manifest["run"]["training"].get("max_steps")
    return isinstance(saved, int) and args.max_steps > saved


def arguments_added_since(saved_run: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The training arguments a checkpoint's manifest lacks (it was written before they existed) whose value in
    this run is their default: the checkpoint's run had that default too, so they are no difference."""
    defaults = {f.name: f.default for f in fields(CalMRLTrainingArguments) if f.default is not MISSING}
    saved = saved_run.get("training", {})
    return [f"training.{name}" for name, value in run["training"].items()
            if name not in saved and name in defaults and json_safe(value) == json_safe(defaults[name])]


def check_resumed_run(checkpoint_manifest: dict[str, Any], manifest: dict[str, Any], args: CalMRLTrainingArguments,
                      folder: str) -> None:
    """Refuse to continue a different run (`manifest`, this run's, against the checkpoint's): the differing manifest
    fields are named, unless `allow_resume_changes` lists them; a finished run (nothing left to train) only warns.
    A larger `max_steps` extends the run: allowed, with a log line naming the schedule change."""
    layouts = [m.get("optimizer_state_layout", "by position (DDP)") for m in (checkpoint_manifest["run"], manifest)]
    if layouts[0] != layouts[1]:  # not a setting that allow_resume_changes can let through: the states differ
        raise CheckpointError(f"{folder} holds its optimizer state {layouts[0]}, and this run needs it "
                              f"{layouts[1]}: resume a DDP checkpoint with DDP and an FSDP one with FSDP.")
    allowed = [*args.allow_resume_changes, "optimizer_state_layout",
               *arguments_added_since(checkpoint_manifest["run"], manifest)]
    if extends_the_run(checkpoint_manifest, args):
        allowed.append("training.max_steps")
        saved = checkpoint_manifest["run"]["training"]["max_steps"]
        logger.info("Extending the run of %s: max_steps %d -> %d; its %s learning-rate schedule now runs to step %d "
                    "(warm-up and decay recomputed for the new length from step %d on).", folder, saved,
                    args.max_steps, args.lr_scheduler_type, args.max_steps,
                    checkpoint_manifest["position"]["global_step"])
    differences = manifest_differences(checkpoint_manifest["run"], manifest, allowed)
    if not differences:
        return
    listed = "; ".join(differences)
    if checkpoint_manifest["position"]["global_step"] >= args.max_steps:
        logger.warning("Resuming the finished run of %s (nothing left to train) with other settings: %s.", folder,
                       listed)
        return
    names = sorted({difference.split(":")[0] for difference in differences})
    raise CheckpointError(f"{folder} was saved by a different run: {listed}. Resume with the same settings, or pass "
                          f"allow_resume_changes={names} to continue with the new ones.")


def apply_changed_hyperparameters(args: CalMRLTrainingArguments, optimizer, scheduler, saved: dict[str, Any],
                                  step: int) -> None:
    """A learning rate or weight decay that differs from the checkpoint's training arguments `saved` (allowed by
    `allow_resume_changes`) takes effect from the resumed `step` on: the loaded optimizer and schedule would
    otherwise keep the old ones."""
    if saved.get("weight_decay") != args.weight_decay:
        for group in optimizer.param_groups:
            group["weight_decay"] = args.weight_decay
    if saved.get("learning_rate") == args.learning_rate and saved.get("max_steps") == args.max_steps:
        return  # else: a new base rate, or the factors of a schedule rebuilt for a new max_steps
    schedule = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
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
    logger.info("Learning rate on resume: base %s -> %s, max_steps %s -> %s (now %s at step %d).",
                saved.get("learning_rate"), args.learning_rate, saved.get("max_steps"), args.max_steps, rates[0], step)


class RunCheckpoints:
    """The checkpoints of one run, in output_dir/checkpoints/step_N: `save` writes the prepared model, optimizer,
    schedule and imputer statistics at the loop's position, `load` restores them (and the position) from a
    checkpoint of the same run. Every process calls both: sharded states are gathered and scattered collectively.
    """

    def __init__(self, accelerator: Accelerator, args: CalMRLTrainingArguments, manifest: dict[str, Any], model,
                 optimizer, scheduler, imputer_step: ImputerUpdater, *, calibration: Calibration | None = None,
                 hub_pusher: CheckpointPusher | None = None, on_checkpoint: Callable[[int], None] | None = None):
        self.accelerator = accelerator
        self.args = args
        self.manifest = manifest  # what the run is (`run_manifest`): recorded in checkpoints, compared on resume
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.imputer_step = imputer_step
        self.calibration = calibration  # its teacher is saved and restored with the run
        self.hub_pusher = hub_pusher  # pushes at each checkpoint (hub_strategy every_save / checkpoint)
        self.on_checkpoint = on_checkpoint
        # the line of checkpoints this run continues ([{run_id, until_step}], this run's own last, until_step
        # None): pruning deletes only these (`checkpoints.in_line`)
        self.run_id = new_run_id()
        self.line: list[dict[str, Any]] = [{"run_id": self.run_id, "until_step": None}]

    def claim_folder(self, resumed_step: int) -> None:
        """Before the first step (every process calls it): when this run saves checkpoints, the checkpoints of
        output_dir/checkpoints past `resumed_step` (0 for a fresh run) belong to an abandoned line; the main
        process moves them into checkpoints/abandoned/<run id>/ (never deleted, never taken by `latest`), with a
        log line naming them."""
        if not self.args.saves_checkpoints:
            return

        def set_aside():
            moved = set_aside_checkpoints(self.args.output_dir, resumed_step, self.run_id)
            if moved:
                logger.warning("This run continues from step %d: the later checkpoints %s of an abandoned run are "
                               "moved to %s (kept, not resumed by 'latest').", resumed_step,
                               [source.name for source, _ in moved], moved[0][1].parent)

        run_on_main_process(self.accelerator, set_aside)

    def save(self, position: TrainPosition) -> None:
        """Checkpoint to output_dir/checkpoints/step_N (`checkpoints`: safetensors and JSON, no pickle; written as
        step_N.incomplete and renamed when complete): model, optimizer, schedule, imputer statistics, every
        process's RNG states, and the manifest (loop position, run, checksums). Keeps the newest
        `save_total_limit`, pushes it where `hub_strategy` asks, then calls `on_checkpoint(step)`."""
        accelerator, args, step = self.accelerator, self.args, position.global_step
        folder = Path(args.output_dir) / "checkpoints" / f"step_{step}"
        staging = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
        if accelerator.is_main_process:
            start_checkpoint(folder)
        accelerator.wait_for_everyone()
        # every process: collectives under sharded training (the main process gets the full states)
        model_state = accelerator.get_state_dict(self.model)
        write_checkpoint_files(staging, self._files(model_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            commit_checkpoint(staging, {"format": MANIFEST_FORMAT, "position": position.state_dict(),
                                        "run": self.manifest, "run_id": self.run_id, "line": self.line})
            prune_checkpoints(args.output_dir, args.save_total_limit, line=self.line)
            if self.hub_pusher is not None:  # staged now, uploaded in the background
                self.hub_pusher.push(accelerator.unwrap_model(self.model), folder, step, recorded_arguments(args),
                                     state_dict=model_state)
        accelerator.wait_for_everyone()
        if self.on_checkpoint is not None:
            self.on_checkpoint(step)

    def _files(self, model_state: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
        """This process's checkpoint files, each as the function that gives its bytes: its RNG states, and on the
        main process the model, optimizer (gathered on every process), schedule and imputer statistics."""
        accelerator = self.accelerator
        optimizer_state = full_optimizer_state(accelerator, self.model, self.optimizer)
        files = {f"rng_state_{accelerator.process_index}.safetensors": lambda: state_file_bytes(capture_rng_state())}
        if accelerator.is_main_process:
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            files.update({
                "model.safetensors": lambda: save(model_state, metadata={"format": "pt"}),
                "optimizer.safetensors": lambda: state_file_bytes({"optimizer": optimizer_state, "scaler": scaler}),
                "scheduler.safetensors": lambda: state_file_bytes(self.scheduler.state_dict()),
                "imputer_statistics.safetensors": lambda: state_file_bytes(self.imputer_step.state_dict()),
            })
            if self.calibration is not None and self.calibration.teacher is not None:
                files[TEACHER_FILE] = self.calibration.state_bytes
        return files

    def load(self, folder: str, position: TrainPosition) -> None:
        """Restore a checkpoint written by `save` (checksums verified, run compared: `check_resumed_run`) into the
        prepared objects and `position`."""
        accelerator = self.accelerator
        manifest = read_manifest(folder)
        check_resumed_run(manifest, self.manifest, self.args, folder)
        root = Path(folder)

        def verified(name: str) -> Path:
            return checkpoint_file(root, manifest, name)

        load_full_model_state(accelerator, self.model, load_file(str(verified("model.safetensors"))))
        optimizer_state = load_state_file(verified("optimizer.safetensors"))
        load_full_optimizer_state(accelerator, self.model, self.optimizer, optimizer_state["optimizer"])
        if accelerator.scaler is not None and optimizer_state["scaler"] is not None:
            accelerator.scaler.load_state_dict(optimizer_state["scaler"])
        self.scheduler.load_state_dict(load_state_file(verified("scheduler.safetensors")))
        self.imputer_step.load_state_dict(load_state_file(verified("imputer_statistics.safetensors")))
        self._load_teacher(root, manifest)
        position.load_state_dict(manifest["position"])
        apply_changed_hyperparameters(self.args, self.optimizer, self.scheduler, manifest["run"]["training"],
                                      position.global_step)
        rng_name = f"rng_state_{accelerator.process_index}.safetensors"
        if rng_name in manifest["files"]:
            restore_rng_state(load_state_file(verified(rng_name)), str(root / rng_name))
        elif isinstance(manifest["run"].get("world_size"), int) and accelerator.process_index < manifest["run"]["world_size"]:
            raise CheckpointError(f"{root / MANIFEST_NAME} does not list {rng_name}, the random states of process "
                                  f"{accelerator.process_index} of the {manifest['run']['world_size']} that saved it.")
        else:  # only reachable when the number of processes changed and that was allowed
            logger.warning("%s has no random states for process %d: its dropout continues from the seed.", folder,
                           accelerator.process_index, main_process_only=False)
        # this run continues the checkpoint's line up to the resumed step
        inherited = [{"run_id": entry["run_id"], "until_step": position.global_step
                      if entry["until_step"] is None else entry["until_step"]} for entry in manifest.get("line", [])]
        if manifest.get("run_id") and not any(entry["run_id"] == manifest["run_id"] for entry in inherited):
            inherited.append({"run_id": manifest["run_id"], "until_step": position.global_step})
        self.line = [*inherited, {"run_id": self.run_id, "until_step": None}]
        logger.info("Resumed from %s at step %d.", folder, position.global_step)

    def _load_teacher(self, root: Path, manifest: dict[str, Any]) -> None:
        """The run's teacher as saved (every process reads the same file: identical teachers). A checkpoint saved
        without one (the teacher was allowed to change) leaves the teacher built from the resumed model."""
        if self.calibration is None or self.calibration.teacher is None:
            return
        if TEACHER_FILE not in manifest["files"]:
            logger.warning("%s has no teacher: the teacher starts from the resumed model.", root)
            return
        self.calibration.load_bytes(checkpoint_file(root, manifest, TEACHER_FILE).read_bytes())


__all__ = ["ARGUMENTS_OUTSIDE_THE_TRAJECTORY", "RunCheckpoints", "apply_changed_hyperparameters",
           "check_resumed_run", "checkpoint_to_resume", "latest_checkpoint", "run_manifest"]
