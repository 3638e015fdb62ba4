"""Worker for test_deepspeed: started by `accelerate launch` (2 processes); `dist_deepspeed_worker.py OUT_DIR MODE
[KEY=VALUE ...]` (training arguments, YAML values).

Trains the tiny model (float32, no dropout) for 3 steps through `calmrl_hf.training.train` on the mixed-pattern
dataset (rows without some modalities on both processes) and writes, from every process, OUT_DIR/MODE_rank_R.pt:
the loss curve, where the learning-rate schedule ended, the imputer's buffers, the distributed type and (rank 0)
the initial and the final full state (`accelerator.get_state_dict`); `train` saves the model with `save_pretrained`
to OUT_DIR/run_MODE.
"""

import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.training import loop, setup  # noqa: E402
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train  # noqa: E402

SCHEDULES, PREPARED, CAST = [], [], []


def recording_build_optimizer(*args, **kwargs):
    """`build_optimizer` as `train` calls it, keeping the scheduler (where the schedule ended: accelerate steps it
    once per process per step, DeepSpeed's engine does not step a LambdaLR)."""
    optimizer, scheduler = BUILD_OPTIMIZER(*args, **kwargs)
    SCHEDULES.append(scheduler)
    return optimizer, scheduler


def recording_prepare_training(accelerator, *args, **kwargs):
    """`prepare_training` as `train` calls it, keeping the prepared model (the DeepSpeed engine) and noting the
    imputer buffers' dtypes after `keep_imputer_float32`."""
    prepared = PREPARE_TRAINING(accelerator, *args, **kwargs)
    PREPARED.append(prepared[0])
    CAST.append(sorted({str(buffer.dtype) for buffer in accelerator.unwrap_model(prepared[0]).imputer.buffers()}))
    return prepared


def recording_keep_imputer_float32(model, saved):
    """`keep_imputer_float32` as `prepare_training` calls it, noting the imputer buffers' dtypes the engine left
    (before the fix-up)."""
    CAST.append(sorted({str(buffer.dtype) for buffer in model.imputer.buffers()}))
    KEEP_IMPUTER_FLOAT32(model, saved)


BUILD_OPTIMIZER, loop.build_optimizer = loop.build_optimizer, recording_build_optimizer
PREPARE_TRAINING, loop.prepare_training = loop.prepare_training, recording_prepare_training
KEEP_IMPUTER_FLOAT32, setup.keep_imputer_float32 = setup.keep_imputer_float32, recording_keep_imputer_float32


def main(out_dir: str, mode: str, *settings: str) -> None:
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in settings)}
    eval_rows = values.pop("eval_rows", None)  # an eval set of that many rows (evaluated at the end)
    torch.manual_seed(0)  # the same weights on every process and in every mode
    model = CalMRLModel(training_config(dropout=False))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = CalMRLTrainingArguments(
        output_dir=str(Path(out_dir) / f"run_{mode}"), max_steps=3, per_device_train_batch_size=8,
        learning_rate=1e-3, warmup_steps=1, logging_steps=1, imputer_min_rows=8, seed=7, **values,
    )
    accelerator = build_accelerator(args)
    result = train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate, accelerator=accelerator,
                   eval_dataset=make_dataset(eval_rows, MIXED_PATTERNS, seed=1) if eval_rows else None)
    imputer = accelerator.unwrap_model(model).imputer
    record = {"losses": result.losses, "metrics": result.metrics, "processes": accelerator.num_processes,
              "distributed_type": str(accelerator.distributed_type),
              "final_lr": SCHEDULES[-1].get_last_lr()[0], "scheduler_steps": SCHEDULES[-1].last_epoch,
              "buffer_dtypes_after_prepare": CAST[0], "buffer_dtypes_after_the_fix": CAST[1],
              "buffers": {k: v.detach().clone() for k, v in imputer.state_dict().items()}}
    state = accelerator.get_state_dict(PREPARED[-1])  # every process (ZeRO-3 gathers: rank 0 gets the state)
    if accelerator.is_main_process:
        record.update(initial=initial, state={k: v.detach().clone() for k, v in state.items()})
    torch.save(record, Path(out_dir) / f"{mode}_rank_{accelerator.process_index}.pt")
    if torch.distributed.is_initialized():  # a gloo group left open can abort at exit
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
