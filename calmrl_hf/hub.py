"""Sharing trained models on the Hugging Face Hub (or any endpoint speaking its API)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .loading import PICKLE_SUFFIXES


logger = logging.getLogger(__name__)

# Training-state folders and files that belong to a run, not to the shared model.
EXCLUDED_PATTERNS = ["checkpoints/**", "runs/**", "logs/**", "*.pkl", "optimizer*", "scheduler*", "random_states*"]


TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"  # the repo's model_card.md


def _eval_results(metrics: dict[str, float], dataset_name: str, dataset_type: str):
    from huggingface_hub import EvalResult

    results = []
    for key, value in sorted(metrics.items()):
        if not (key.endswith("/R@1") or key.endswith("/class_R@1") or key == "mean_R@1"):
            continue
        results.append(EvalResult(task_type="retrieval", task_name=f"{key.split('/')[0]} retrieval",
                                  dataset_type=dataset_type, dataset_name=dataset_name,
                                  metric_type="recall", metric_name=key, metric_value=round(float(value), 4)))
    return results


def write_model_card(output_dir: str | Path, *, repo_id: str | None = None, metrics: dict[str, float] | None = None,
                     dataset_name: str = "evaluation set", dataset_type: str = "custom",
                     training_args: dict | None = None, template_path: str | Path | None = None,
                     datasets: list[str] | None = None):
    """Fill the model card template from the saved config and the run's own evaluation numbers; writes README.md.

    `metrics` are the run's retrieval metrics (keys like `"text->vision/R@1"`); their Recall@1 values become
    `model-index` results and the card's evaluation table; `datasets` are the training sets' Hub ids or names.
    Returns the `ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(output_dir)
    config = json.loads((folder / "config.json").read_text())
    modalities = config["modalities"]
    shared = config.get("shared_encoders", {})
    rows = []
    for name in modalities:
        owner = shared.get(name, name)
        tower = config["encoder_configs"][owner].get("model_type", "?")
        rows.append(f"| {name} | {tower}{f' (shared with {owner})' if owner != name else ''} | "
                    f"{config.get('pooling', {}).get(name, '')} |")
    metrics = metrics or {}
    eval_rows = [f"| {key} | {value:.2f} |" for key, value in sorted(metrics.items())
                 if key.endswith("R@1") or key == "mean_R@1"]
    eval_table = ("| metric | value (%) |\n|---|---:|\n" + "\n".join(eval_rows)) if eval_rows else \
        "No evaluation was run."
    summary = "\n".join(f"- `{k}`: {v}" for k, v in sorted((training_args or {}).items())
                        if isinstance(v, (int, float, str, bool)) and k not in ("hub_token",))
    card_data = ModelCardData(library_name="calmrl_hf", license="apache-2.0", model_name=repo_id or folder.name,
                              datasets=list(datasets) if datasets else None,
                              tags=["calmrl", "multimodal", "missing-modalities", "representation-learning",
                                    "retrieval"],
                              eval_results=_eval_results(metrics, dataset_name, dataset_type) or None)
    card = ModelCard.from_template(
        card_data, template_path=str(template_path or TEMPLATE), model_name=repo_id or folder.name,
        repo_id=repo_id or str(folder), modalities=", ".join(modalities), num_modalities=len(modalities),
        projection_dim=config.get("projection_dim"), latent_dim=config.get("imputer_latent_dim"),
        objective=config.get("alignment_objective"), imputer_method=config.get("imputer_method"),
        towers_table="\n".join(rows), eval_table=eval_table, training_summary=summary or "Not recorded.")
    card.save(folder / "README.md")
    return card


def push_to_hub(output_dir: str | Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                private: bool = False, commit_message: str = "Upload CalMRL model",
                revision: str | None = None) -> str:
    """Upload a saved model folder (weights, config, custom code, processor, card, training args) in ONE commit.

    Refuses folders without `config.json` or with pickle files (`.bin`, `.pt`, ...): checkpoints are shared as
    safetensors only. Training-state subfolders (`checkpoints/`, optimizer / RNG states) are left out. Returns
    the commit URL.
    """
    from huggingface_hub import HfApi

    folder = Path(output_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: save the model with save_pretrained first.")
    pickles = [str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.suffix in PICKLE_SUFFIXES and not p.relative_to(folder).parts[0] == "checkpoints"]
    if pickles:
        raise ValueError(f"Refusing to upload pickle files {pickles[:5]} from {folder}: share safetensors only "
                         f"(remove them or save with safe_serialization).")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                               revision=revision, ignore_patterns=EXCLUDED_PATTERNS)
    logger.info("Pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return commit.commit_url


__all__ = ["push_to_hub", "write_model_card"]
