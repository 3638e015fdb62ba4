"""Worker for test_launch: started by torchrun or `accelerate launch`; `dist_launch_worker.py OUT_DIR [KEY=VALUE]`.

Builds the Accelerator as training does (`build_accelerator`) from training arguments given as KEY=VALUE (YAML
values), all-reduces a one, and writes what the process sees to OUT_DIR/rank_R.json; with check_output_dir=true,
also how `check_shared_output_dir` treats one folder and a folder per process.
"""

import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from calmrl_hf.training.launch import LaunchError, check_shared_output_dir  # noqa: E402
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, resolve_launch_settings  # noqa: E402


def output_dir_checks(accelerator, out_dir: str) -> dict[str, str]:
    """`check_shared_output_dir` with one folder for every process, then with a folder per process."""
    outcomes = {}
    for name, folder in (("one_output_dir", Path(out_dir) / "shared"),
                         ("an_output_dir_per_process", Path(out_dir) / f"own_{accelerator.process_index}")):
        folder.mkdir(exist_ok=True)
        try:
            check_shared_output_dir(accelerator, str(folder))
            outcomes[name] = "accepted"
        except LaunchError as error:
            outcomes[name] = f"refused: {error}"
    return outcomes


def main(out_dir: str, *settings: str) -> None:
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in settings)}
    check_output_dir = values.pop("check_output_dir", False)
    args = CalMRLTrainingArguments(output_dir=str(Path(out_dir) / "run"), **values)
    accelerator = build_accelerator(args)
    args = resolve_launch_settings(args, accelerator)
    total = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")
    record = {"num_processes": accelerator.num_processes, "all_reduced": total.item(),
              "distributed_type": str(accelerator.distributed_type), "mixed_precision": args.mixed_precision,
              "gradient_accumulation_steps": args.gradient_accumulation_steps}
    if check_output_dir:
        record.update(output_dir_checks(accelerator, out_dir))
    Path(out_dir, f"rank_{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():  # a gloo group left open can abort at exit ("terminate called ...")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
