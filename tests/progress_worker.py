"""A user's training script, for test_progress: `progress_worker.py OUT_DIR MAX_STEPS LOGGING_STEPS [--wait]`.

It configures no logging and trains a tiny vision-text model with `CalMRLCollator` on 16 examples, 2 of which
observe no modality (the collator drops them), 4 to a batch. With --wait it waits for a line on stdin after
training before it exits: the test reads the progress first, so it knows the progress came while the run lived.
`tiny_run` is the same run in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout's calmrl_hf, installed or not

from datasets import Dataset  # noqa: E402
from transformers import BertTokenizer, ViTImageProcessorPil  # noqa: E402

from calmrl_hf import CalMRLConfig, CalMRLModel, CalMRLProcessor  # noqa: E402
from calmrl_hf.data import CalMRLCollator  # noqa: E402
from calmrl_hf.training import CalMRLTrainingArguments, train  # noqa: E402
from tiny_models import IMAGE_SIZE, NUM_FRAMES, tiny_bert, tiny_vit  # noqa: E402


EXAMPLES, BATCH_SIZE = 16, 4
EMPTY = (3, 11)  # the examples observing no modality: 2 dropped in every epoch


def tiny_run(output_dir: str, max_steps: int, logging_steps: int, **overrides):
    """Train the tiny model for `max_steps` (every epoch: 4 batches, 2 examples dropped); returns `train`'s output."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(str, range(10))]
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(words)}),
                                ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                modalities=["vision", "text"], num_frames=NUM_FRAMES, max_length=8)
    model = CalMRLModel(CalMRLConfig(encoder_configs={"vision": tiny_vit(), "text": tiny_bert()},
                                     modalities=["vision", "text"], projection_dim=16, imputer_latent_dim=4))
    rng = np.random.default_rng(0)
    rows = {"id": [], "vision": [], "text": []}
    for i in range(EXAMPLES):
        rows["id"].append(f"clip{i}")
        frames = rng.integers(0, 255, (NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        rows["vision"].append(None if i in EMPTY else frames)
        rows["text"].append(None if i in EMPTY else f"{i % 10} {i % 7}")
    args = CalMRLTrainingArguments(output_dir=output_dir, max_steps=max_steps, logging_steps=logging_steps,
                                   per_device_train_batch_size=BATCH_SIZE, use_cpu=True, seed=0, **overrides)
    return train(model, Dataset.from_dict(rows).with_format("numpy"), args, collate_fn=CalMRLCollator(processor))


if __name__ == "__main__":
    out, max_steps, logging_steps, *wait = sys.argv[1:]
    tiny_run(str(Path(out) / "run"), int(max_steps), int(logging_steps))
    if wait == ["--wait"]:
        sys.stdin.readline()
