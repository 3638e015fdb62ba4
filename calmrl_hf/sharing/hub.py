"""Sharing trained models on the Hugging Face Hub (or any endpoint speaking its API).

One upload path, `upload_folder` (the shareable files of a saved model folder, checked, in one commit), and one
repository layout, whichever way a model is pushed: `push_to_hub(folder, repo_id)` (a saved run's output folder),
`push_model(model, repo_id, processor=...)` (a model in memory, staged into a temporary folder first), and the
pushes during training that `CalMRLTrainingArguments.hub_strategy` asks for (`CheckpointPusher`, staging each checkpoint's
model): weights, code, processor, the filled model card, training args and results; never training state (except a
resumable `last-checkpoint/`) or tracker logs.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..loading import PICKLE_SUFFIXES


logger = logging.getLogger(__name__)

# The accelerate tracker project of the training loop: its logs live in output_dir/<TRACKER_PROJECT>/.
TRACKER_PROJECT = "calmrl"
# Training-state folders and files that belong to a run, not to the shared model (nor tracker logs).
EXCLUDED_PATTERNS = ["checkpoints/**", "runs/**", "logs/**", f"{TRACKER_PROJECT}/**", "*events.out.tfevents*",
                     "*.pkl", "optimizer*", "scheduler*", "random_states*"]
# Where `hub_strategy="checkpoint"` puts the latest resumable checkpoint in the repository (as Trainer does).
LAST_CHECKPOINT = "last-checkpoint"
HUB_STRATEGIES = ("end", "every_save", "checkpoint")


TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"  # the template of a pushed README.md


def _eval_results(metrics: dict[str, float], dataset_name: str, dataset_type: str):
    """The card's `model-index` results: the Recall@1 values of `metrics`."""
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


def shareable_files(folder: Path) -> list[str]:
    """The files of a saved model folder that a push uploads (relative paths): all but `EXCLUDED_PATTERNS`."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in EXCLUDED_PATTERNS)]


def _check_shareable(folder: Path) -> list[str]:
    """`shareable_files(folder)`, or a ValueError for a folder without `config.json` or with pickle files."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: save the model with save_pretrained first.")
    files = shareable_files(folder)
    pickles = [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"Refusing to upload pickle files {pickles[:5]} from {folder}: share safetensors only "
                         f"(remove them or save with safe_serialization).")
    return files


def upload_folder(api, folder: str | Path, repo_id: str, *, commit_message: str, private: bool = False,
                  revision: str | None = None, training_state: str | Path | None = None) -> str:
    """The upload every push makes, through `api` (an `HfApi`): the shareable files of a saved model folder
    (`shareable_files`), checked before any request (a `config.json`, no pickle files), and, where given, every file
    of the checkpoint folder `training_state` under `last-checkpoint/` (optimizer and RNG states included: a run
    resumes from it), in ONE commit to `repo_id` (created where it does not exist). Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    uploads = {name: folder / name for name in _check_shareable(folder)}
    if training_state is not None:
        checkpoint = Path(training_state)
        uploads.update({f"{LAST_CHECKPOINT}/{p.relative_to(checkpoint).as_posix()}": p
                        for p in sorted(checkpoint.rglob("*")) if p.is_file()})
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in uploads.items()]
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                               revision=revision)
    logger.info("Pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return commit.commit_url


def push_to_hub(output_dir: str | Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                private: bool = False, commit_message: str = "Upload CalMRL model",
                revision: str | None = None) -> str:
    """Upload a saved model folder (weights, config, custom code, processor, card, training args) in ONE commit
    (`upload_folder`).

    Refuses folders without `config.json` or with pickle files (`.bin`, `.pt`, ...): checkpoints are shared as
    safetensors only. Training-state subfolders (`checkpoints/`, optimizer / RNG states) and tracker logs are left
    out. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    return upload_folder(HfApi(endpoint=endpoint, token=token), output_dir, repo_id, commit_message=commit_message,
                         private=private, revision=revision)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_model(model, folder: Path, repo_id: str, *, processor=None, metrics: dict | None = None,
                training_args: dict | None = None, from_source: bool = True, state_dict: dict | None = None) -> Path:
    """Write into `folder` what a push of `model` uploads: with `from_source`, the shareable files of the folder it
    was loaded from (processor, training args and results); its weights, config and code, the processor, and the
    card filled for `repo_id` from the run's metrics and arguments (given, or recorded in those files).
    `state_dict`: the weights to write (a sharded model's full state, gathered by every process beforehand)."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if from_source and source.is_dir() and (source / "config.json").is_file():
        for name in shareable_files(source):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, folder / name)
    from ..training.fsdp import as_its_own_class

    with as_its_own_class(model):
        model.save_pretrained(folder, state_dict=state_dict)
    if processor is not None:
        processor.save_pretrained(folder)
    if training_args is not None:
        (folder / "training_args.json").write_text(json.dumps(training_args, indent=2, default=str))
    recorded = _read_json(folder / "train_results.json") or {}
    write_model_card(folder, repo_id=repo_id, training_args=training_args or _read_json(folder / "training_args.json"),
                     metrics=metrics if metrics is not None else {k: v for k, v in recorded.items()
                                                                  if isinstance(v, (int, float)) and "R@" in k})
    return folder


def push_model(model, repo_id: str, *, processor=None, metrics: dict | None = None,
               training_args: dict | None = None, token: str | None = None, endpoint: str | None = None,
               private: bool = False, commit_message: str = "Upload CalMRL model", revision: str | None = None) -> str:
    """Push a model with its processor and filled card: the repository `push_to_hub(folder)` makes of the folder
    the model was loaded from, staged in a temporary folder (`stage_model`), in one commit. Returns the commit URL.

    `processor`: the one to upload (default: the one saved in the folder the model was loaded from); `metrics`
    (keys like `"text->vision/R@1"`) and `training_args` fill the card (default: those recorded in that folder).
    """
    with tempfile.TemporaryDirectory() as staging:
        folder = stage_model(model, Path(staging), repo_id, processor=processor, metrics=metrics,
                             training_args=training_args)
        return push_to_hub(folder, repo_id, token=token, endpoint=endpoint, private=private,
                           commit_message=commit_message, revision=revision)


class CheckpointPusher:
    """Pushes during training, as Trainer's `hub_strategy` does: `"every_save"` uploads the model at each
    checkpoint, `"checkpoint"` also the checkpoint itself under `last-checkpoint/` (a run resumes from it on another
    machine). The model is staged at once (its state at that step); the upload (`upload_folder`) runs in a
    background thread, so the training step does not wait. While an upload is in flight, later checkpoints are not
    pushed (Trainer's rule).
    """

    def __init__(self, repo_id: str, strategy: str, *, processor=None, token: str | None = None,
                 endpoint: str | None = None, private: bool = False):
        if strategy not in HUB_STRATEGIES[1:]:
            raise ValueError(f"CheckpointPusher pushes for hub_strategy 'every_save' or 'checkpoint', got "
                             f"{strategy!r}.")
        from huggingface_hub import HfApi

        self.repo_id, self.strategy, self.processor, self.private = repo_id, strategy, processor, private
        self.api = HfApi(endpoint=endpoint, token=token)
        # the repository exists before training starts: a wrong token or repo id stops the run at once
        self.api.create_repo(repo_id, private=private, exist_ok=True)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calmrl-hub")
        self.in_flight: Future | None = None

    def push(self, model, checkpoint_dir: str | Path, step: int, training_args: dict | None = None,
             state_dict: dict | None = None) -> Future | None:
        """Stage the model (its `state_dict` where given: a sharded model's, gathered) and upload it, with the
        checkpoint folder for `"checkpoint"`, in the background; None when an earlier upload is still running (this
        checkpoint is then not pushed)."""
        if self.in_flight is not None and not self.in_flight.done():
            logger.info("Hub upload still in progress: checkpoint %d is not pushed.", step)
            return None
        staging = Path(tempfile.mkdtemp(prefix="calmrl-push-"))
        try:  # mid-run: no evaluation yet, and the folder the model was loaded from (an earlier stage) is not this run
            stage_model(model, staging, self.repo_id, processor=self.processor, metrics={},
                        training_args=training_args, from_source=False, state_dict=state_dict)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        training_state = checkpoint_dir if self.strategy == "checkpoint" else None
        self.in_flight = self.executor.submit(self._upload, staging, f"Training in progress, step {step}",
                                              training_state)
        return self.in_flight

    def _upload(self, staging: Path, message: str, training_state: str | Path | None) -> str:
        try:
            return upload_folder(self.api, staging, self.repo_id, commit_message=message, private=self.private,
                                 training_state=training_state)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; raises its error."""
        if self.in_flight is not None:
            self.in_flight.result()


__all__ = ["CheckpointPusher", "EXCLUDED_PATTERNS", "HUB_STRATEGIES", "LAST_CHECKPOINT", "TRACKER_PROJECT",
           "push_model", "push_to_hub", "shareable_files", "stage_model", "upload_folder",
           "write_model_card"]
