"""How the processes of a run were launched, checked before anything trains, and the Accelerator they get.

`torchrun`, `accelerate launch --multi_gpu` and an `accelerate config` with `distributed_type: MULTI_GPU` start N
processes and say so in `WORLD_SIZE`; on a machine without GPUs a plain `Accelerator()` then sees one process in
each of them (N separate runs writing one output_dir), so `wants_cpu_processes` turns them into one N-process run
over gloo. `accelerate launch --num_processes N` without `--multi_gpu` (and `--cpu`, or `distributed_type:
MULTI_CPU`) starts ONE process on such a machine (multi-CPU needs mpirun); `requested_processes` reads the launch
command of the parent process (Linux' /proc) so that this is refused with the command to run instead.

`build_accelerator` makes the Accelerator of one training run. On a machine without GPUs accelerate drops the
engine a launch asked for and runs plain DDP over gloo: DeepSpeed and FSDP2 are kept there, on CPU processes
(DeepSpeed through its CPU accelerator, FSDP2 through torch's `fully_shard`, which runs over gloo). FSDP1 is
refused everywhere (`FSDP1_REFUSAL`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (
    DistributedType, FullyShardedDataParallelPlugin, GradientAccumulationPlugin, ProjectConfiguration,
)

from .arguments import CalMRLTrainingArguments
from .checkpoints import RunFolderLock, check_checkpoints_root, remove_stale_staging


logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The processes that started are not the ones the launch asked for; the message says what to run instead."""


def launched_processes() -> int:
    """Processes the launcher started (`WORLD_SIZE`, set by torchrun and by `accelerate launch --multi_gpu`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_cpu_processes() -> bool:
    """Several processes on a machine with no accelerator device: they can only be CPU processes (gloo)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA alone before
    device_available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return launched_processes() > 1 and not device_available


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _config_processes(config_file: str | None) -> int:
    """`num_processes` of an `accelerate config` file (the given one, or accelerate's default), 1 without one."""
    if config_file is None:
        from accelerate.commands.config import default_config_file

        config_file = default_config_file
    path = Path(config_file)
    if not path.is_file():
        return 1
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else None
    except yaml.YAMLError:
        return 1
    return int((values or {}).get("num_processes") or 1)


def requested_processes(parent_argv: list[str] | None = None) -> int:
    """Processes an `accelerate launch` parent asked for (`--num_processes`, else its config file's), or
    `launched_processes()` when this process was not started by `accelerate launch`."""
    if parent_argv is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return launched_processes()
        parent_argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    is_accelerate_launch = any(Path(a).name == "accelerate" for a in parent_argv[:2]) and "launch" in parent_argv
    if not is_accelerate_launch:
        return launched_processes()
    flag = _flag_value(parent_argv, "--num_processes")
    return int(flag) if flag is not None else _config_processes(_flag_value(parent_argv, "--config_file"))


def check_launch(num_processes: int, parent_argv: list[str] | None = None) -> None:
    """Refuse a run whose Accelerator sees `num_processes` while the launch started or asked for another number."""
    started, asked = launched_processes(), requested_processes(parent_argv)
    wanted = max(started, asked)
    if wanted == num_processes:
        return
    instead = (f"torchrun --nproc_per_node {wanted} SCRIPT ... (or accelerate launch --multi_gpu --num_processes "
               f"{wanted} SCRIPT ...; on a machine without GPUs both give {wanted} CPU processes over gloo)")
    if started != num_processes:
        raise LaunchError(f"The launcher started {started} processes (WORLD_SIZE={started}) but the Accelerator sees "
                          f"{num_processes}: every process would train on its own and write the same output_dir. "
                          f"Run {instead}, or pass use_cpu=True / --cpu for CPU processes.")
    raise LaunchError(f"accelerate launch asked for {asked} processes but started {started} (without --multi_gpu, "
                      f"or with --cpu / distributed_type MULTI_CPU, it starts one process unless mpirun is set up). "
                      f"Run {instead}.")


FSDP1_REFUSAL = (
    "FSDP1 (accelerate's default FSDP version) is not supported: train() builds its optimizer before prepare, and "
    "accelerate points an optimizer at the sharded parameters for FSDP2 only; torch also runs FSDP1 on accelerator "
    "devices only. Launch with --fsdp_version 2 (fsdp_version: 2 in the accelerate config; "
    "--fsdp_reshard_after_forward false for SHARD_GRAD_OP), e.g. --config_file recipes/configs/accelerate/fsdp2.yaml."
)


def refuse_unsupported_engine_settings(args: CalMRLTrainingArguments, accelerator: Accelerator) -> None:
    """Settings an engine cannot run, refused before training instead of failing (or hanging) mid-run."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(FSDP1_REFUSAL)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and (args.saves_checkpoints
                                                                  or args.resume_from_checkpoint):
        raise ValueError("Checkpoints (save_steps / save_strategy / resume_from_checkpoint) are not supported under "
                         "DeepSpeed: its ZeRO optimizer state is partitioned across processes and holds objects the "
                         "checkpoint format refuses. Set save_steps=None and save_strategy='no' (the final model is "
                         "still saved), or train with DDP "
                         "or FSDP to checkpoint.")


def _missing_on(accelerator: Accelerator, seen: bool) -> int:
    """On how many processes `seen` is False (a collective: every process calls it)."""
    missing = accelerator.reduce(torch.tensor([0.0 if seen else 1.0], device=accelerator.device), reduction="sum")
    return int(missing.item())


def check_shared_output_dir(accelerator: Accelerator, output_dir: str) -> None:
    """Checkpoints need `output_dir` to be one folder for every process (every process writes its random states
    into the main process's checkpoint folder, and `resume_from_checkpoint="latest"` reads the newest one there):
    on several machines, a filesystem they share. The main process leaves a token there that every process must
    read back; all fail together, before training, when one cannot."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    marker = Path(output_dir) / ".calmrl_shared_check"
    token = [os.urandom(8).hex() if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        marker.write_text(token[0])
    broadcast_object_list(token)  # also orders the write before every read
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    missing = _missing_on(accelerator, seen)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if missing:
        raise LaunchError(f"On {missing} of {accelerator.num_processes} processes, output_dir {output_dir} is not the "
                          f"main process's folder: checkpoints (save_steps, resume_from_checkpoint='latest') need it "
                          f"on a filesystem every machine shares. Give every machine the same shared output_dir, or "
                          f"set save_steps=None and resume from a checkpoint folder every machine sees.")


def run_on_main_process(accelerator: Accelerator, work: Callable[[], object]):
    """`work()` on the main process, its error raised on every process: every process enters the same one
    collective (a broadcast of the error, if any) whatever happens, so none is left waiting in another. Returns
    what `work` returned on the main process, None on the others."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as caught:  # every process raises below
            error = caught
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    broadcast_object_list(message)
    if error is not None:
        raise error
    if message[0] is not None:
        raise LaunchError(f"The main process stopped the run before training: {message[0]}")
    return result


def lock_output_dir(accelerator: Accelerator, output_dir: str) -> RunFolderLock | None:
    """The main process takes output_dir's lock (`RunFolderLock`: a second run on the folder fails, naming the
    holder; a dead run's lock is taken over with a warning); every process fails together when it cannot. Returns
    the lock on the main process (release it at the end, also on error), None on the others."""
    return run_on_main_process(accelerator, lambda: RunFolderLock.acquire(output_dir))


def check_checkpoint_folders(accelerator: Accelerator, args: CalMRLTrainingArguments) -> None:
    """Before training: the folders the run's checkpoints are written to or resumed from are seen by every
    process (`check_shared_output_dir`; a checkpoint given by path must be there on every process), output_dir/
    checkpoints is a folder, and stale `step_N.incomplete` entries of a dead run (the caller holds the folder's
    lock) are removed by the main process with a log line, a symlink as the link itself."""
    resume = args.resume_from_checkpoint
    if args.saves_checkpoints or resume == "latest":
        check_shared_output_dir(accelerator, args.output_dir)

        def check_folder():
            check_checkpoints_root(args.output_dir)
            removed = remove_stale_staging(args.output_dir)
            if removed:
                logger.warning("Removed %s in %s/checkpoints: unfinished saves of a run that died (a symlink as the "
                               "link itself).", [path.name for path in removed], args.output_dir)

        run_on_main_process(accelerator, check_folder)
    if resume and resume != "latest" and accelerator.num_processes > 1:
        missing = _missing_on(accelerator, (Path(resume) / "manifest.json").is_file())
        if missing:
            raise LaunchError(f"The checkpoint {resume} (resume_from_checkpoint) is not found on {missing} of "
                              f"{accelerator.num_processes} processes: put it on a filesystem every machine sees.")


def build_accelerator(args: CalMRLTrainingArguments) -> Accelerator:
    """The Accelerator of one training run (the recipe builds one per stage), with the run's own settings.

    `mixed_precision` / `gradient_accumulation_steps` left None take the launcher's (`accelerate launch
    --mixed_precision`, `accelerate config`, DeepSpeed's config); set, they win over it. Several launched processes
    on a machine without GPUs become CPU processes over gloo (`wants_cpu_processes`), keeping the DeepSpeed or FSDP2
    engine the launch asked for, and a launch whose processes the Accelerator does not see is refused
    (`check_launch`). Settings of an earlier Accelerator of this process (an earlier stage) are dropped first; its
    process group stays.
    """
    AcceleratorState._reset_state()  # accelerate refuses a second Accelerator with other settings otherwise
    if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:  # set by `_shard_cpu_processes`
        PartialState().distributed_type = DistributedType.MULTI_CPU  # for an earlier stage: what accelerate had made
    accumulation = (GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps)
                    if args.gradient_accumulation_steps is not None else None)  # a plugin wins over the launcher's env
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]  # towers of modalities absent from
    # a batch get no gradient: DDP must not wait for them
    cpu = args.use_cpu or wants_cpu_processes()
    if _env_flag("ACCELERATE_USE_FSDP") and int(os.environ.get("FSDP_VERSION", "1")) != 2:
        raise LaunchError(FSDP1_REFUSAL)
    fsdp_on_cpu = cpu and not args.use_cpu and _env_flag("ACCELERATE_USE_FSDP")
    if cpu and not args.use_cpu and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        # DeepSpeed on CPU processes: accelerate drops DeepSpeed when cpu=True (a plain DDP run over gloo instead),
        # and without a device it finds no backend (one process each); DeepSpeed's CPU accelerator runs over gloo
        cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_plugin=accumulation,
        log_with=args.report_to,
        # trackers write to logging_dir (None: output_dir)
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir),
        kwargs_handlers=handlers,
        # batches hold the observed rows of each modality only (ragged), so they are never split or dispatched
        # across processes: each process collates its own examples
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                  dispatch_batches=False),
    )
    check_launch(accelerator.num_processes)
    if fsdp_on_cpu:
        _shard_cpu_processes(accelerator)
    if accelerator.is_fsdp2:
        _load_fully_on_every_process(accelerator)
    return accelerator


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _load_fully_on_every_process(accelerator: Accelerator) -> None:
    """Turn off FSDP2's `cpu_ram_efficient_loading` (on by default in `accelerate launch --use_fsdp`).

    With it, `prepare` moves the model to the meta device and re-creates every entry of its state dict from rank 0
    as a sharded parameter, which fails on a persistent buffer (the imputer's statistics: "'Tensor' object has no
    attribute 'device_mesh'"). Without it every process builds the whole model, pretrained towers loaded in full
    (transformers reads the same environment variable), and `prepare` shards it.
    """
    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading and accelerator.is_main_process:
        logger.warning("FSDP2's cpu_ram_efficient_loading is turned off: accelerate's loading cannot recreate a "
                       "model with persistent buffers (the imputer's); every process loads the whole model instead.")
    plugin.cpu_ram_efficient_loading = False
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def _shard_cpu_processes(accelerator: Accelerator) -> None:
    """FSDP2 for an `accelerate launch --use_fsdp --fsdp_version 2` run on CPU processes.

    accelerate makes a run FSDP only on device processes (MULTI_GPU and the like), so here it built a MULTI_CPU
    (DDP over gloo) one; the run becomes what the launch asked for: the FSDP plugin of the launch's settings
    (read from the environment as accelerate reads it) and the FSDP distributed type, in both of accelerate's
    shared states (an AcceleratorState built later copies the PartialState's). `prepare` then shards with
    `fully_shard`, `get_state_dict` gathers the full state, as on GPUs.
    """
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def resolve_launch_settings(args: CalMRLTrainingArguments, accelerator: Accelerator) -> CalMRLTrainingArguments:
    """`args` with the mixed precision and accumulation the run uses (the launcher's where `args` left them None);
    an explicit value that the given `accelerator` does not use is an error."""
    used = {"mixed_precision": str(accelerator.mixed_precision),
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps}
    for name, value in used.items():
        given = getattr(args, name)
        if given is not None and given != value:
            raise ValueError(f"Training argument {name}={given!r} but the Accelerator passed to train uses {value!r}: "
                             f"build it with calmrl_hf.training.build_accelerator(args), or leave {name} None to "
                             f"take the Accelerator's.")
    return replace(args, **used)


__all__ = ["LaunchError", "build_accelerator", "check_checkpoint_folders", "check_launch", "check_shared_output_dir",
           "launched_processes", "lock_output_dir", "refuse_unsupported_engine_settings", "run_on_main_process",
           "requested_processes", "resolve_launch_settings", "wants_cpu_processes"]
