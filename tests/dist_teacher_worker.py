"""Worker for test_teacher's two-process check: `torchrun --nproc_per_node 2 dist_teacher_worker.py OUT_DIR`.

Trains the tiny model 4 steps on CPU processes (gloo) with an EMA teacher that also gives the imputations and a
distillation term (negatives gathered across processes), its imputer warm-started on full rows. Each process
writes OUT_DIR/process_{rank}.json: the SHA-256 of its teacher's state (as the run started and at the end) and of
its model's, and how many slots the teacher imputed. Each process builds its model with another seed: the teacher
must be copied from the model as DDP synchronised it.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from training_fixtures import FULL, MIXED_PATTERNS, collate, make_dataset, training_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.training import CalMRLTrainingArguments, build_accelerator, train  # noqa: E402
from calmrl_hf.training.calibration import Calibration  # noqa: E402


def state_hash(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: str) -> None:
    out = Path(out_dir)
    started, imputed = [], [0]
    start, prepare = Calibration.start, Calibration.prepare

    def recording_start(self, model):
        start(self, model)
        started.append((self, state_hash(self.teacher.model)))

    def recording_prepare(self, model, batch):
        inputs, extra, view = prepare(self, model, batch)
        imputed[0] += int((~inputs["modality_mask"]).sum())
        return inputs, extra, view

    Calibration.start, Calibration.prepare = recording_start, recording_prepare
    torch.manual_seed(int(os.environ["RANK"]))  # other weights on each process: DDP starts them all from rank 0's
    model = CalMRLModel(training_config())
    args = CalMRLTrainingArguments(
        output_dir=str(out / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True,
        logging_steps=1, imputer_min_rows=8, seed=7, teacher="ema", teacher_ema_decay=0.5,
        teacher_form="distillation", imputation_source="teacher", imputer_warm_start=True,
    )
    accelerator = build_accelerator(args)
    train(model, make_dataset(64, MIXED_PATTERNS), args, collate_fn=collate, accelerator=accelerator,
          warm_start_dataset=make_dataset(32, [FULL], seed=2))
    (calibration, at_start), = started
    report = {"processes": accelerator.num_processes, "teacher": state_hash(calibration.teacher.model),
              "teacher_at_start": at_start, "model": state_hash(accelerator.unwrap_model(model)),
              "imputations": imputed[0]}
    (out / f"process_{accelerator.process_index}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():  # a gloo group left open can abort at exit
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
