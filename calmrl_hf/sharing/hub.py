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
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
# Every Hub request of a push gets this many seconds without progress (connect, each read, each write) before it
# fails, and a failed push is retried this many times (timeouts, network errors, HTTP 408 / 429 / 5xx).
DEFAULT_HUB_TIMEOUT = 60.0
DEFAULT_HUB_RETRIES = 2


class HubPushError(RuntimeError):
    """A Hub call that failed (after its retries): names the call, the endpoint and the cause, never the token."""


class UnsafeFileError(ValueError):
    """A folder to copy or upload holds a symbolic link (or another non-regular file): it is never followed."""


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
                        if isinstance(v, (int, float, str, bool)) and "token" not in k.lower())
    summary = redact(summary)  # a token that found its way into another value
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


def regular_files(folder: str | Path, excluded: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The regular files under `folder` (sorted relative paths), never following a link: a symbolic link (to a file
    or a folder, pointing inside the folder or out of it) or another non-regular file (a FIFO, a device) among
    the files not `excluded` (fnmatch patterns) is an `UnsafeFileError` naming it. `folder` itself may be a link
    (e.g. an output_dir on another disk). Nothing is read."""
    root = Path(folder)
    files, refused = [], []
    for directory, subfolders, names in os.walk(root, followlinks=False):
        for name in sorted([*subfolders, *names]):
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            if any(fnmatch.fnmatch(relative, pattern) for pattern in excluded):
                continue
            if stat.S_ISREG(mode):
                files.append(relative)
            elif stat.S_ISLNK(mode):
                refused.append(f"{relative} -> {os.readlink(path)}")
            else:
                refused.append(f"{relative} (not a regular file)")
    if refused:
        raise UnsafeFileError(
            f"Refusing to copy or upload {root}: it holds {len(refused)} symbolic link(s) or special file(s), which "
            f"are never followed (a link could point at a file outside the folder, e.g. a secret): "
            f"{', '.join(refused[:10])}{' ...' if len(refused) > 10 else ''}. Replace each with the file it should "
            f"share (e.g. `cp --remove-destination \"$(readlink -f PATH)\" PATH` after checking its target) or "
            f"remove it.")
    return sorted(files)


def shareable_files(folder: Path) -> list[str]:
    """The files of a saved model folder that a push uploads (relative paths): all but `EXCLUDED_PATTERNS`;
    a symbolic link among them is refused (`regular_files`), never followed."""
    return regular_files(folder, EXCLUDED_PATTERNS)


def _copy_file(source: Path, target: Path) -> None:
    """Copy a regular file without following a link at its last component (a file swapped for a link after
    `regular_files` listed it is refused, not read)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(source, flags)
    except OSError as error:
        raise UnsafeFileError(f"Refusing to copy {source}: {error} (a symbolic link is never followed).") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(descriptor, "rb") as reader, open(target, "wb") as writer:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise UnsafeFileError(f"Refusing to copy {source}: not a regular file.")
        shutil.copyfileobj(reader, writer)
    shutil.copystat(source, target, follow_symlinks=False)


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


# ---------------------------------------------------------------------------------------- timeouts and retries
_TIMEOUT_LOCK = threading.Lock()
_ACTIVE_TIMEOUTS: list[float] = []  # the timeouts of the Hub calls of this module running now (any thread)
_FACTORY_WRAPPED = False
_TRANSIENT_ERRORS = {"TimeoutException", "NetworkError", "RemoteProtocolError", "ProxyError", "ConnectTimeout",
                     "ReadTimeout", "Timeout", "ConnectionError"}
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


def _apply_hub_timeout(request) -> None:
    """huggingface_hub's HTTP client sets no timeout (its default client waits forever on an endpoint that accepts
    and never answers): while a push of this module runs, its requests without a timeout of their own get the
    push's (connect, each read, each write, pool)."""
    with _TIMEOUT_LOCK:
        seconds = min(_ACTIVE_TIMEOUTS) if _ACTIVE_TIMEOUTS else None
    if seconds is None:
        return
    current = request.extensions.get("timeout") or {}
    if any(value is not None for value in current.values()):
        return
    request.extensions["timeout"] = {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}


def _install_timeout_hook() -> None:
    """Add `_apply_hub_timeout` to huggingface_hub's shared HTTP client, and to every client its factory makes
    from now on (it recreates the client after a connection error) through `set_client_factory`."""
    global _FACTORY_WRAPPED
    from huggingface_hub.utils import _http, get_session, set_client_factory

    with _TIMEOUT_LOCK:
        if not _FACTORY_WRAPPED:
            base = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

            def factory():
                client = base()
                client.event_hooks["request"].append(_apply_hub_timeout)
                return client

            set_client_factory(factory)
            _FACTORY_WRAPPED = True
    hooks = get_session().event_hooks["request"]  # a factory set elsewhere since: its client gets the hook too
    if _apply_hub_timeout not in hooks:
        hooks.append(_apply_hub_timeout)


def _check_limits(timeout: float, retries: int) -> None:
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"hub_timeout must be a number of seconds > 0, got {timeout!r}.")
    if not (isinstance(retries, int) and retries >= 0):
        raise ValueError(f"hub_retries must be an integer >= 0, got {retries!r}.")


def redact(text: str, token: str | None = None) -> str:
    """`text` without `token` nor anything shaped like a Hugging Face token (`hf_...`)."""
    import re

    if token:
        text = text.replace(token, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}", "hf_***", text)


def is_transient(error: BaseException) -> bool:
    """A timeout, a network error, or an HTTP 408 / 429 / 5xx answer: worth retrying (a 401 or 404 is not)."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if any(cls.__name__ in _TRANSIENT_ERRORS for cls in type(error).__mro__):
        return True
    return getattr(getattr(error, "response", None), "status_code", None) in _TRANSIENT_STATUS


def call_hub(what: str, call: Callable[[], Any], *, endpoint: str | None = None,
             timeout: float = DEFAULT_HUB_TIMEOUT, retries: int = DEFAULT_HUB_RETRIES, token: str | None = None):
    """`call()` (one or more huggingface_hub requests) with every request limited to `timeout` seconds without
    progress, retried `retries` times on transient errors (`is_transient`) after 1, 2, 4 ... s (at most
    `timeout`, at most 10 s). A transient failure left after the retries is a `HubPushError` naming `what`, the
    endpoint and the cause; other errors (a wrong token, a missing repository) are raised at once, as they are.
    Never waits forever: at most (retries + 1) x (the call's requests x timeout) plus the pauses."""
    _check_limits(timeout, retries)
    _install_timeout_hook()
    where = endpoint or "the Hub"
    attempt = 0
    while True:
        attempt += 1
        with _TIMEOUT_LOCK:
            _ACTIVE_TIMEOUTS.append(float(timeout))
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - sorted below: transient ones are retried
            if not is_transient(error):
                raise
            cause = redact(f"{type(error).__name__}: {error}", token)
            if attempt > retries:
                raise HubPushError(f"{what} at {where} failed after {attempt} attempt(s) (hub_timeout {timeout:g} s "
                                   f"per request, hub_retries {retries}): {cause}") from None
            pause = min(2.0 ** (attempt - 1), float(timeout), 10.0)
            logger.warning("%s at %s failed (attempt %d of %d): %s; retrying in %g s.", what, where, attempt,
                           retries + 1, cause, pause)
        finally:
            with _TIMEOUT_LOCK:
                _ACTIVE_TIMEOUTS.remove(float(timeout))
        time.sleep(pause)


def upload_folder(api, folder: str | Path, repo_id: str, *, commit_message: str, private: bool = False,
                  revision: str | None = None, training_state: str | Path | None = None,
                  timeout: float = DEFAULT_HUB_TIMEOUT, retries: int = DEFAULT_HUB_RETRIES) -> str:
    """The upload every push makes, through `api` (an `HfApi`): the shareable files of a saved model folder
    (`shareable_files`), checked before any request (a `config.json`, no pickle files, no symbolic links), and,
    where given, every file of the checkpoint folder `training_state` under `last-checkpoint/` (optimizer and RNG
    states included: a run resumes from it; a link there is refused too), in ONE commit to `repo_id` (created where
    it does not exist). Every request has `timeout` seconds, each step `retries` retries (`call_hub`). Returns the
    commit URL."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    uploads = {name: folder / name for name in _check_shareable(folder)}
    if training_state is not None:
        checkpoint = Path(training_state)
        uploads.update({f"{LAST_CHECKPOINT}/{name}": checkpoint / name for name in regular_files(checkpoint)})
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in uploads.items()]
    limits = {"endpoint": getattr(api, "endpoint", None), "timeout": timeout, "retries": retries,
              "token": getattr(api, "token", None) if isinstance(getattr(api, "token", None), str) else None}
    call_hub(f"Creating the repository {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True),
             **limits)
    commit = call_hub(f"Uploading {len(operations)} files to {repo_id} ({commit_message!r})",
                      lambda: api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                                revision=revision), **limits)
    logger.info("Pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return commit.commit_url


def push_to_hub(output_dir: str | Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                private: bool = False, commit_message: str = "Upload CalMRL model",
                revision: str | None = None, hub_timeout: float = DEFAULT_HUB_TIMEOUT,
                hub_retries: int = DEFAULT_HUB_RETRIES) -> str:
    """Upload a saved model folder (weights, config, custom code, processor, card, training args) in ONE commit
    (`upload_folder`).

    Refuses folders without `config.json`, with pickle files (`.bin`, `.pt`, ...: checkpoints are shared as
    safetensors only) or with symbolic links (never followed: `regular_files`). Training-state subfolders
    (`checkpoints/`, optimizer / RNG states) and tracker logs are left out. Every request has `hub_timeout`
    seconds; a timeout or network error is retried `hub_retries` times, then raised as a `HubPushError`. Returns
    the commit URL.
    """
    from huggingface_hub import HfApi

    _check_limits(hub_timeout, hub_retries)
    return upload_folder(HfApi(endpoint=endpoint, token=token), output_dir, repo_id, commit_message=commit_message,
                         private=private, revision=revision, timeout=hub_timeout, retries=hub_retries)


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
        for name in shareable_files(source):  # a symbolic link there is refused, never followed
            _copy_file(source / name, folder / name)
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
               private: bool = False, commit_message: str = "Upload CalMRL model", revision: str | None = None,
               hub_timeout: float = DEFAULT_HUB_TIMEOUT, hub_retries: int = DEFAULT_HUB_RETRIES) -> str:
    """Push a model with its processor and filled card: the repository `push_to_hub(folder)` makes of the folder
    the model was loaded from, staged in a temporary folder (`stage_model`), in one commit. Returns the commit URL.

    `processor`: the one to upload (default: the one saved in the folder the model was loaded from); `metrics`
    (keys like `"text->vision/R@1"`) and `training_args` fill the card (default: those recorded in that folder).
    """
    with tempfile.TemporaryDirectory() as staging:
        folder = stage_model(model, Path(staging), repo_id, processor=processor, metrics=metrics,
                             training_args=training_args)
        return push_to_hub(folder, repo_id, token=token, endpoint=endpoint, private=private,
                           commit_message=commit_message, revision=revision, hub_timeout=hub_timeout,
                           hub_retries=hub_retries)


class CheckpointPusher:
    """Pushes during training, as Trainer's `hub_strategy` does: `"every_save"` uploads the model at each
    checkpoint, `"checkpoint"` also the checkpoint itself under `last-checkpoint/` (a run resumes from it on another
    machine). The model is staged at once (its state at that step); the upload (`upload_folder`) runs in a
    background thread, so the training step does not wait. While an upload is in flight, later checkpoints are not
    pushed (Trainer's rule).

    A push never stops or blocks the run: every request has `hub_timeout` seconds and `hub_retries` retries; a
    failed upload is a warning naming its step and error (the local checkpoint is untouched), and `wait` returns
    once the upload in flight has landed or failed. A wrong token or repository id (an HTTP error that is not
    transient) stops the run at once, when the repository is created before training starts; an endpoint that
    does not answer then is a warning, and the repository is created by the first push.
    """

    def __init__(self, repo_id: str, strategy: str, *, processor=None, token: str | None = None,
                 endpoint: str | None = None, private: bool = False, hub_timeout: float = DEFAULT_HUB_TIMEOUT,
                 hub_retries: int = DEFAULT_HUB_RETRIES):
        if strategy not in HUB_STRATEGIES[1:]:
            raise ValueError(f"CheckpointPusher pushes for hub_strategy 'every_save' or 'checkpoint', got "
                             f"{strategy!r}.")
        _check_limits(hub_timeout, hub_retries)
        from huggingface_hub import HfApi

        self.repo_id, self.strategy, self.processor, self.private = repo_id, strategy, processor, private
        self.timeout, self.retries, self.endpoint = hub_timeout, hub_retries, endpoint
        self.api = HfApi(endpoint=endpoint, token=token)
        self.failures: list[tuple[int, str]] = []  # (step, error) of each checkpoint whose upload failed
        # the repository exists before training starts: a wrong token or repo id stops the run at once
        try:
            call_hub(f"Creating the repository {repo_id}",
                     lambda: self.api.create_repo(repo_id, private=private, exist_ok=True),
                     endpoint=endpoint, timeout=hub_timeout, retries=hub_retries, token=token)
        except HubPushError as error:
            logger.warning("%s; training goes on, and each checkpoint's push tries again.", error)
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
        self.in_flight = self.executor.submit(self._upload, staging, step, training_state)
        return self.in_flight

    def _upload(self, staging: Path, step: int, training_state: str | Path | None) -> str | None:
        """The background upload of checkpoint `step`: its commit URL, or None after a warning naming the step and
        the error (the run goes on; the local checkpoint is kept)."""
        try:
            return upload_folder(self.api, staging, self.repo_id, commit_message=f"Training in progress, step {step}",
                                 private=self.private, training_state=training_state, timeout=self.timeout,
                                 retries=self.retries)
        except Exception as error:  # noqa: BLE001 - reported, never raised into the training loop
            message = redact(f"{type(error).__name__}: {error}", self.api.token if isinstance(self.api.token, str)
                             else None)
            self.failures.append((step, message))
            logger.warning("The Hub push of checkpoint %d to %s failed: %s. The local checkpoint %s is kept; "
                           "training goes on.", step, self.repo_id, message, training_state or "(model only)")
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def wait(self) -> None:
        """Block until the upload in flight (if any) has landed or failed (bounded: every request has
        `hub_timeout` seconds); a failure was reported as a warning, and is in `failures`."""
        if self.in_flight is not None:
            self.in_flight.result()


__all__ = ["CheckpointPusher", "DEFAULT_HUB_RETRIES", "DEFAULT_HUB_TIMEOUT", "EXCLUDED_PATTERNS", "HUB_STRATEGIES",
           "HubPushError", "LAST_CHECKPOINT", "TRACKER_PROJECT", "UnsafeFileError", "call_hub", "is_transient",
           "push_model", "push_to_hub", "redact", "regular_files", "shareable_files", "stage_model",
           "upload_folder", "write_model_card"]
