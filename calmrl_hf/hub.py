"""Sharing trained models on the Hugging Face Hub (or any endpoint speaking its API)."""

from __future__ import annotations

import logging
from pathlib import Path


logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Training-state folders and files that belong to a run, not to the shared model.
EXCLUDED_PATTERNS = ["checkpoints/**", "runs/**", "logs/**", "*.pkl", "optimizer*", "scheduler*", "random_states*"]


def push_to_hub(output_dir: str | Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                private: bool = False, commit_message: str = "Upload CalMRL model",
                revision: str | None = None) -> str:
    """Upload a saved model folder (weights, config, custom code, processor, card) in ONE commit.

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


__all__ = ["push_to_hub"]
