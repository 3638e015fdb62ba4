"""A small tensor-valued CalMRL dataset and collator for the training-loop tests (no media decoding).

Each instance has a class c; every modality's input is a fixed random pattern of c plus noise, so the towers
can learn to align modalities. Used both in-process and by the torchrun worker script.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from tiny_models import AUDIO_FRAMES, IMAGE_SIZE, MEL_BINS, NUM_FRAMES, VOCAB_SIZE, tiny_ast, tiny_bert, tiny_vit

from calmrl_hf import CalMRLConfig

MODALITIES = ("vision", "audio", "text", "subtitle")


def set_dropout(config, probability: float):
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        setattr(config, name, probability)
    return config


def training_config(dropout: bool = False, **overrides) -> CalMRLConfig:
    """The tiny tri-tower config of the training tests; dropout-free unless `dropout` (then 0.2 in every tower)."""
    towers = {"vision": tiny_vit(), "audio": tiny_ast(), "text": tiny_bert()}
    kwargs = dict(
        encoder_configs={name: set_dropout(tower, 0.2 if dropout else 0.0) for name, tower in towers.items()},
        projection_dim=16,
        imputer_latent_dim=4,
    )
    kwargs.update(overrides)
    return CalMRLConfig(**kwargs)


def make_dataset(num_rows: int, patterns: list[tuple[bool, bool, bool, bool]], seed: int = 0,
                 num_classes: int = 8) -> Dataset:
    """Rows cycle through `patterns` (observed flags in MODALITIES order); missing modalities are None."""
    generator = torch.Generator().manual_seed(1234)  # class prototypes shared by every split
    prototypes = {
        "vision": torch.randn(num_classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "audio": torch.randn(num_classes, AUDIO_FRAMES, MEL_BINS, generator=generator),
        "text": torch.randint(1, VOCAB_SIZE, (num_classes, 6), generator=generator),
    }
    generator = torch.Generator().manual_seed(seed)
    rows = {name: [] for name in MODALITIES}
    rows["label"] = []
    for i in range(num_rows):
        label = int(torch.randint(num_classes, (1,), generator=generator))
        observed = patterns[i % len(patterns)]
        frames = prototypes["vision"][label] + 0.5 * torch.randn(NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE,
                                                                  generator=generator)
        audio = prototypes["audio"][label] + 0.5 * torch.randn(AUDIO_FRAMES, MEL_BINS, generator=generator)
        ids = prototypes["text"][label].clone()
        ids[int(torch.randint(6, (1,), generator=generator))] = int(torch.randint(1, VOCAB_SIZE, (1,),
                                                                                   generator=generator))
        values = {"vision": frames.tolist(), "audio": audio.tolist(), "text": ids.tolist(),
                  "subtitle": ids.flip(0).tolist()}
        for flag, name in zip(observed, MODALITIES):
            rows[name].append(values[name] if flag else None)
        rows["label"].append(label)
    return Dataset.from_dict(rows)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Observed rows only, in batch order, plus the [B, k] modality mask (the processor's contract)."""
    mask = torch.tensor([[example[name] is not None for name in MODALITIES] for example in examples])
    batch: dict[str, torch.Tensor] = {"modality_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}
    present = {name: [e[name] for e in examples if e[name] is not None] for name in MODALITIES}
    if present["vision"]:
        batch["vision_pixel_values"] = torch.tensor(present["vision"])
    if present["audio"]:
        batch["audio_input_values"] = torch.tensor(present["audio"])
    for name in ("text", "subtitle"):
        if present[name]:
            ids = torch.tensor(present[name])
            batch[f"{name}_input_ids"] = ids
            batch[f"{name}_attention_mask"] = torch.ones_like(ids)
    return batch


FULL = (True, True, True, True)
VISION_TEXT = (True, False, True, False)
AUDIO_TEXT = (False, True, True, False)
MIXED_PATTERNS = [FULL, VISION_TEXT, AUDIO_TEXT, (True, True, False, True)]


def resumable_run(output_dir, resume=None, stop_after=None, model_overrides=None, dataset_seed=0, **overrides):
    """A short run with dropout on and checkpoints every 2 steps (6 steps over two epochs), as the resume and
    fault-injection tests use it; `overrides` change training arguments. Returns the trained model, or None when
    `stop_after` ended it after a checkpoint (as a kill right after that save would)."""
    from calmrl_hf.training import CalMRLTrainingArguments

    values = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1, imputer_min_rows=8, seed=3, save_steps=2, save_total_limit=2,
                  resume_from_checkpoint=resume)
    values.update(overrides)
    return run_until(make_dataset(32, MIXED_PATTERNS, seed=dataset_seed), CalMRLTrainingArguments(**values),
                     stop_after, model_overrides)


def run_until(data, arguments, stop_after: int | None = None, model_overrides=None):
    """Train a fresh seeded model (dropout on) with `arguments` (a `CalMRLTrainingArguments`); with `stop_after`, the
    run is killed right after its first checkpoint at or past that step (returns None), else returns the trained
    model."""
    from calmrl_hf import CalMRLModel
    from calmrl_hf.training import train

    torch.manual_seed(0)
    model = CalMRLModel(training_config(dropout=True, **(model_overrides or {})))

    def stop(step):
        if stop_after is not None and step >= stop_after:
            raise KeyboardInterrupt

    try:
        train(model, data, arguments, collate_fn=collate, on_checkpoint=stop)
    except KeyboardInterrupt:
        return None
    return model


def tiny_recipe_argv(tmp_path) -> list[str]:
    """The default recipe on a tiny generated corpus (under tmp_path/data), 2 steps of 8 rows a stage, written to
    tmp_path/run."""
    sizes = {"stage1": 32, "video_text": 32, "audio_text": 32, "test": 16}
    argv = ["--output_dir", str(tmp_path / "run"), "--set", f"data.generate_mini_vast.root={tmp_path / 'data'}"]
    for key, value in sizes.items():
        argv += ["--set", f"data.generate_mini_vast.{key}={value}"]
    for stage in ("stage1", "stage2"):
        argv += ["--set", f"{stage}.max_steps=2", "--set", f"{stage}.per_device_train_batch_size=8"]
    return argv
