"""Worker for test_launch: started by torchrun or `accelerate launch`; `dist_launch_worker.py OUT_DIR [KEY=VALUE]`.

Builds the Accelerator as training does (`build_accelerator`) from training arguments given as KEY=VALUE (YAML
values), all-reduces a one, and writes what the process sees to OUT_DIR/rank_R.json.
"""

import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from calmrl_hf.training import TrainingArguments, build_accelerator, resolve_launch_settings  # noqa: E402


def main(out_dir: str, *settings: str) -> None:
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in settings)}
    args = TrainingArguments(output_dir=str(Path(out_dir) / "run"), **values)
    accelerator = build_accelerator(args)
    args = resolve_launch_settings(args, accelerator)
    total = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")
    record = {"num_processes": accelerator.num_processes, "all_reduced": total.item(),
              "distributed_type": str(accelerator.distributed_type), "mixed_precision": args.mixed_precision,
              "gradient_accumulation_steps": args.gradient_accumulation_steps}
    Path(out_dir, f"rank_{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():  # a gloo group left open can abort at exit ("terminate called ...")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
