"""Worker for test_sharding's accelerate runs: started by `accelerate launch` (2 processes);
`dist_fsdp_train_worker.py OUT_DIR MODE [KEY=VALUE ...]` (training arguments, YAML values).

Trains the tiny model with a matching head and dropout (the defaults users run) for 4 steps through
`calmrl_hf.training.train` (float64: what is compared is the algorithm, not float32 reduction order), evaluates on
16 rows and checkpoints at step 2. Writes from rank 0 OUT_DIR/MODE.pt: the loss curve, eval metrics, distributed
type, the final full state (`accelerator.get_state_dict`) and the imputer's buffers of both processes. With
`copy_checkpoint=DIR` the step-2 checkpoint is copied to DIR/checkpoints/step_2 (what a run killed right after it
would leave), to be resumed by another run with `resume_from_checkpoint=latest` and output_dir DIR.
"""

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.training import loop  # noqa: E402
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train  # noqa: E402

PREPARED = []


def recording_prepare_training(*args, **kwargs):
    """`prepare_training` as `train` calls it, keeping the prepared model (for the final state)."""
    prepared = PREPARE_TRAINING(*args, **kwargs)
    PREPARED.append(prepared[0])
    return prepared


PREPARE_TRAINING, loop.prepare_training = loop.prepare_training, recording_prepare_training


def collate64(examples):
    return {k: v.double() if v.is_floating_point() else v for k, v in collate(examples).items()}


def main(out_dir: str, mode: str, *settings: str) -> None:
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in settings)}
    copy_to = values.pop("copy_checkpoint", None)
    values.setdefault("output_dir", str(Path(out_dir) / f"run_{mode}"))
    torch.manual_seed(0)  # the same weights on every process and in every mode
    model = CalMRLModel(training_config(dropout=True, fusion_num_layers=1)).double()
    args = CalMRLTrainingArguments(max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, warmup_steps=1,
                                   logging_steps=1, imputer_min_rows=8, seed=7, save_steps=2, **values)
    accelerator = build_accelerator(args)

    def snapshot(step):
        if copy_to and step == 2 and accelerator.is_main_process:
            shutil.copytree(Path(args.output_dir) / "checkpoints" / "step_2", Path(copy_to) / "checkpoints" / "step_2")

    result = train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate64, accelerator=accelerator,
                   eval_dataset=make_dataset(16, MIXED_PATTERNS, seed=1), on_checkpoint=snapshot)
    imputer = accelerator.unwrap_model(model).imputer
    buffers = [None] * accelerator.num_processes
    dist.all_gather_object(buffers, {k: v.detach().clone() for k, v in imputer.state_dict().items()})
    state = accelerator.get_state_dict(PREPARED[-1])  # every process (FSDP gathers: rank 0 gets the state)
    if accelerator.is_main_process:
        torch.save({"losses": result.losses, "metrics": result.metrics, "processes": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type), "buffers": buffers,
                    "state": {k: v.detach().clone() for k, v in state.items()}}, Path(out_dir) / f"{mode}.pt")
    accelerator.wait_for_everyone()
    dist.destroy_process_group()  # a gloo group left open can abort at exit


if __name__ == "__main__":
    main(*sys.argv[1:])
