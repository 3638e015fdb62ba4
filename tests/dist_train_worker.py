"""Worker for test_training's multi-process checks: `torchrun --nproc_per_node N dist_train_worker.py OUT BATCH
[MODE]`.

Trains the tiny model for a few steps on CPU processes (gloo), with a checkpoint every 2 steps, and writes the
final imputer buffers and the loss trajectory from the main process to OUT. MODE "full" trains without dropout (comparable across process
counts); "dropout" with dropout, and copies its first checkpoint to OUT's folder / run_resumed (what a run killed
right after it would leave); "resume" (dropout) continues from the latest checkpoint of run_{OUT's stem}.
"""

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train  # noqa: E402


def collate64(examples):
    # float64 end to end: what is compared is the algorithm, not float32 reduction order across processes
    return {k: v.double() if v.is_floating_point() else v for k, v in collate(examples).items()}


def main(out_path: str, per_device_batch: int, mode: str = "full") -> None:
    torch.manual_seed(0)
    model = CalMRLModel(training_config(dropout=mode != "full")).double()
    args = CalMRLTrainingArguments(
        output_dir=str(Path(out_path).parent / f"run_{Path(out_path).stem}"), max_steps=4,
        per_device_train_batch_size=per_device_batch, learning_rate=1e-3, warmup_steps=1, use_cpu=True,
        logging_steps=1, imputer_min_rows=8, seed=7, save_steps=2,
        resume_from_checkpoint="latest" if mode == "resume" else None,
    )
    accelerator = build_accelerator(args)

    def snapshot(step):
        if mode == "dropout" and step == 2 and accelerator.is_main_process:
            source = Path(args.output_dir) / "checkpoints" / "step_2"
            shutil.copytree(source, Path(out_path).parent / "run_resumed" / "checkpoints" / "step_2")

    result = train(model, make_dataset(64, MIXED_PATTERNS), args, collate_fn=collate64, accelerator=accelerator,
                   on_checkpoint=snapshot)
    if accelerator.is_main_process:
        imputer = accelerator.unwrap_model(model).imputer
        torch.save({"buffers": {k: v.clone() for k, v in imputer.state_dict().items()},
                    "losses": result.losses, "processes": accelerator.num_processes}, out_path)
    if torch.distributed.is_initialized():  # a gloo group left open can abort at exit
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
