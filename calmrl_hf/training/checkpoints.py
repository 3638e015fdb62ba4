"""Training checkpoints you can trust: no pickle, written atomically, verified, with the run they belong to.

    output_dir/checkpoints/step_N/
        model.safetensors               the model's state dict
        optimizer.safetensors           optimizer (and fp16 GradScaler) state
        scheduler.safetensors           learning-rate schedule position
        imputer_statistics.safetensors  the imputer step's accumulated PPCA statistics
        rng_state_{rank}.safetensors    every process's random states (python, numpy, torch, cuda)
        manifest.json                   written last: loop position, run manifest, SHA-256 of every file above

Every file but the manifest is a safetensors file: tensors as tensors, everything else (ints, floats, strings,
lists, dicts, tuples) as JSON in its metadata (`encode_state` / `decode_state`). Resuming parses safetensors and
JSON only; nothing is ever unpickled.

A save writes into `step_N.incomplete/` and renames it to `step_N/` once the manifest is on disk, so a `step_N/`
folder is complete by construction; `latest` takes the newest one and reports the incomplete folders it skipped.
Loading checks each file's SHA-256 against the manifest (a damaged or truncated file is an error that names it)
and compares the manifest's run (model config, training arguments, dataset fingerprint and length, number of
processes) with the resuming run's (`manifest_differences`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save


MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "calmrl-checkpoint/1"
INCOMPLETE_SUFFIX = ".incomplete"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
_INCOMPLETE_NAME = re.compile(r"^step_(\d+)\.incomplete$")
_STRUCTURE_KEY = "calmrl_structure"
ABANDONED_FOLDER = "abandoned"  # output_dir/checkpoints/abandoned/<run id>/step_N: set aside, never deleted
LOCK_NAME = ".calmrl.lock"
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", "scheduler.safetensors",
                  "imputer_statistics.safetensors")
_POSITION_KEYS = ("global_step", "epoch", "batches_in_epoch")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (damaged, incomplete, of another run); the message says why."""


# ---------------------------------------------------------------------------------------------------- files
def write_file(path: str | os.PathLike, data: bytes) -> None:
    """The one way a checkpoint file is written: every byte, flushed to disk before the next file."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable_directory(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create `path` if needed and prove it writable by writing and removing a file; an error names it."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".calmrl-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"{what} {str(folder)!r} is not writable ({error.strerror or error}); choose another "
                              f"folder before training starts.") from error
    return folder


# ---------------------------------------------------------------------------------------------------- state codec
def encode_state(tree: Any, tensors: dict[str, torch.Tensor] | None = None, path: str = "state"):
    """(JSON-able structure, {key: tensor}) of a state made of tensors, numpy arrays, numbers, strings, None,
    lists, tuples and dicts (str or int keys). Dicts and tuples are tagged so that they come back as they were."""
    tensors = {} if tensors is None else tensors
    if isinstance(tree, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = tree.detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(tree, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(tree).astype(np.int64 if tree.dtype.kind in "ui"
                                                                          else np.float64))
        return {"__ndarray__": key, "dtype": tree.dtype.str}, tensors
    if isinstance(tree, np.generic):
        return tree.item(), tensors
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree, tensors
    if isinstance(tree, (list, tuple)):
        items = [encode_state(value, tensors, f"{path}[{i}]")[0] for i, value in enumerate(tree)]
        return ({"__tuple__": items} if isinstance(tree, tuple) else items), tensors
    if isinstance(tree, dict):
        items = []
        for key, value in tree.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{path} has a key of type {type(key).__name__}; checkpoint state keys are str or int.")
            items.append([key, encode_state(value, tensors, f"{path}.{key}")[0]])
        return {"__dict__": items}, tensors
    raise TypeError(f"{path} is a {type(tree).__name__}; checkpoint state holds tensors, arrays, numbers, strings, "
                    f"lists, tuples and dicts only.")


def decode_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state`."""
    if isinstance(structure, list):
        return [decode_state(value, tensors) for value in structure]
    if not isinstance(structure, dict):
        return structure
    if "__tensor__" in structure:
        return tensors[structure["__tensor__"]]
    if "__ndarray__" in structure:
        return tensors[structure["__ndarray__"]].numpy().astype(np.dtype(structure["dtype"]))
    if "__tuple__" in structure:
        return tuple(decode_state(value, tensors) for value in structure["__tuple__"])
    return {key: decode_state(value, tensors) for key, value in structure["__dict__"]}


def state_file_bytes(tree: Any) -> bytes:
    """A state as the bytes of one safetensors file (its non-tensor part as JSON in the metadata)."""
    structure, tensors = encode_state(tree)
    return save(tensors, metadata={_STRUCTURE_KEY: json.dumps(structure)})


def load_state_file(path: str | os.PathLike) -> Any:
    """Read a file written from `state_file_bytes`: safetensors and JSON only."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        return decode_state(json.loads(metadata[_STRUCTURE_KEY]), tensors)
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise CheckpointError(f"{path} is damaged or not a CalMRL state file ({type(error).__name__}: {error}).") \
            from error


# ---------------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], source: str) -> None:
    """Set the random states saved by `capture_rng_state`; a state that does not fit is an error naming `source`."""
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"The random states in {source} are damaged ({type(error).__name__}: {error}); an "
                              f"exact resume needs them.") from error


# ---------------------------------------------------------------------------------------------------- run manifest
def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat = {}
        for key in sorted(value):
            flat.update(_flatten(value[key], f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def manifest_differences(saved: dict[str, Any], current: dict[str, Any], allowed: Iterable[str] = ()) -> list[str]:
    """'path: checkpoint X, now Y' for every field of two run manifests that differs and is not `allowed`.

    `allowed` names dotted paths or their prefixes (`"training.learning_rate"`, `"model"`, `"dataset"`) or `"*"`.
    """
    allowed = list(allowed)
    if "*" in allowed:
        return []
    flat_saved, flat_current = _flatten(json_safe(saved), "run"), _flatten(json_safe(current), "run")
    differences = []
    for path in sorted(set(flat_saved) | set(flat_current)):
        name = path[len("run."):]
        # a bare training argument name ("learning_rate") stands for its field ("training.learning_rate")
        if any(name == a or name.startswith(a + ".") or name == f"training.{a}" for a in allowed):
            continue
        before, after = flat_saved.get(path, "<absent>"), flat_current.get(path, "<absent>")
        if before != after:
            differences.append(f"{name}: checkpoint {before!r}, now {after!r}")
    return differences


def json_safe(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------------- the folder
def find_checkpoints(output_dir: str | os.PathLike) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(complete checkpoints as (step, folder), oldest first; incomplete folders) in output_dir/checkpoints.

    A `step_N/` without a manifest (copied in part, or written by an older version) counts as incomplete."""
    root = Path(output_dir) / "checkpoints"
    complete, incomplete = [], []
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and (path / MANIFEST_NAME).is_file():
            complete.append((int(match.group(1)), path))
        elif match or _INCOMPLETE_NAME.match(path.name):
            incomplete.append(path)
    return sorted(complete), incomplete


def new_run_id() -> str:
    """A name for one run (time, then random hex): the line its checkpoints belong to, the folder its abandoned
    checkpoints are set aside in."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def in_line(manifest: dict[str, Any], step: int, line: list[dict[str, Any]]) -> bool:
    """Whether the checkpoint of `step` with `manifest` belongs to `line` ([{run_id, until_step}], until_step None
    for the run that writes now): written by one of its runs, at or before the step the next run resumed from."""
    run_id = manifest.get("run_id") if isinstance(manifest, dict) else None
    return run_id is not None and any(
        entry["run_id"] == run_id and (entry["until_step"] is None or step <= entry["until_step"]) for entry in line)


def _peek_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None,
                      line: list[dict[str, Any]] | None = None) -> list[Path]:
    """Delete interrupted saves and all but the newest `keep` complete checkpoints (the newest is always kept).
    With `line` (the saving run's, `in_line`), only checkpoints of that line are counted and deleted: another run's
    checkpoints are never touched. Returns what was deleted."""
    complete, incomplete = find_checkpoints(output_dir)
    doomed = [path for path in incomplete if _INCOMPLETE_NAME.match(path.name) and not path.is_symlink()]
    if line is not None:
        complete = [(step, path) for step, path in complete if in_line(_peek_manifest(path), step, line)]
    if keep:
        doomed += [path for _, path in complete[:-max(keep, 1)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def set_aside_checkpoints(output_dir: str | os.PathLike, after_step: int, run_id: str) -> list[tuple[Path, Path]]:
    """Move every `step_N` (complete or not) with N > `after_step` into output_dir/checkpoints/abandoned/`run_id`/:
    the checkpoints a run resumed from an earlier step (or started afresh, `after_step` 0) would overwrite, prune
    or be mistaken for by `latest`. Nothing is deleted; returns (from, to) of each move."""
    root = Path(output_dir) / "checkpoints"
    later = [path for path in (sorted(root.iterdir()) if root.is_dir() else ())
             if (match := _CHECKPOINT_NAME.match(path.name)) and int(match.group(1)) > after_step]
    moved = []
    if later:
        target = root / ABANDONED_FOLDER / run_id
        target.mkdir(parents=True, exist_ok=True)
        for path in later:
            path.rename(target / path.name)  # a symlink moves as the link itself
            moved.append((path, target / path.name))
    return moved


def remove_stale_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the `step_N.incomplete` entries of output_dir/checkpoints (saves of a dead run: the caller holds the
    folder's lock): a folder with its content, a file or a symlink as itself (a link is never followed)."""
    root = Path(output_dir) / "checkpoints"
    removed = []
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if not _INCOMPLETE_NAME.match(path.name):
            continue
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
        removed.append(path)
    return removed


def check_checkpoints_root(output_dir: str | os.PathLike) -> None:
    """output_dir/checkpoints is a folder (or absent): anything else is an error naming it."""
    root = Path(output_dir) / "checkpoints"
    if (root.exists() or root.is_symlink()) and not root.is_dir():
        what = "a symlink to nothing" if not root.exists() else "a file"
        raise CheckpointError(f"{root} is {what}, not a folder: checkpoints are written there. Move it away or "
                              f"choose another output_dir.")


def start_checkpoint(folder: Path) -> Path:
    """The temporary folder a checkpoint is written into (main process: emptied first)."""
    staging = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
    if staging.is_symlink() or staging.is_file():
        staging.unlink()  # never followed
    else:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_checkpoint_files(staging: Path, files: dict[str, Callable[[], bytes]]) -> None:
    """Write each file from the bytes its function gives (one file in memory at a time)."""
    for name, make_bytes in files.items():
        write_file(staging / name, make_bytes())


def commit_checkpoint(staging: Path, manifest: dict[str, Any]) -> Path:
    """Main process, once every process wrote its files: the manifest (with each file's SHA-256) last, then the
    rename that makes the checkpoint exist."""
    files = {path.name: file_sha256(path) for path in sorted(staging.iterdir()) if path.is_file()}
    write_file(staging / MANIFEST_NAME, json.dumps({**manifest, "files": files}, indent=2, default=str).encode())
    final = staging.with_name(staging.name[: -len(INCOMPLETE_SUFFIX)])
    if final.exists():  # re-saving a step (a resume from an earlier step): replace it
        replaced = final.with_name(final.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
        staging.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        staging.rename(final)
    return final


def plain_file_name(name: Any, source: str) -> str:
    """`name` when it is a plain file name (no separator, not `.` or `..`, not absolute, no NUL); else an error
    naming it and `source`."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name) or (os.altsep and os.altsep in name)):
        raise CheckpointError(f"{source} lists {name!r}, which is not a plain file name in the checkpoint folder: "
                              f"a checkpoint only names its own files.")
    return name


def validate_manifest(manifest: Any, source: str) -> dict[str, Any]:
    """The manifest's structure, checked before anything uses it: an object with the format, `files` (plain file
    names to SHA-256 digests, the required files among them), `position` (three non-negative integers) and `run`
    (an object with `training`). Anything else is a CheckpointError naming the problem."""
    def fail(problem: str):
        raise CheckpointError(f"{source} is malformed: {problem}. Resume from another checkpoint.")

    if not isinstance(manifest, dict):
        fail(f"it holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{source} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}.")
    files = manifest.get("files")
    if not isinstance(files, dict):
        fail("'files' is missing or not an object" if files is None else f"'files' is a {type(files).__name__}")
    for name, digest in files.items():
        plain_file_name(name, source)
        if name == MANIFEST_NAME:
            fail(f"'files' lists {MANIFEST_NAME} itself")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            fail(f"the SHA-256 of {name!r} is {digest!r}, not 64 hex digits")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        fail(f"'files' does not list {missing}; every file resuming reads must be listed with its SHA-256")
    position = manifest.get("position")
    if not isinstance(position, dict):
        fail("'position' is missing or not an object")
    for key in _POSITION_KEYS:
        value = position.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"'position.{key}' is {value!r}, not a non-negative integer")
    run = manifest.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("training"), dict):
        fail("'run' (with 'training') is missing or not an object")
    line = manifest.get("line", [])
    if not (isinstance(line, list) and all(isinstance(e, dict) and isinstance(e.get("run_id"), str)
                                           and (e.get("until_step") is None or isinstance(e.get("until_step"), int))
                                           for e in line)):
        fail("'line' is not a list of {run_id, until_step}")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint (`validate_manifest`), after checking every file it lists against its
    SHA-256; each file must be a file of the folder itself (not a symlink leading out of it)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        pickles = sorted(p.name for p in folder.glob("*.pkl")) if folder.is_dir() else []
        why = (f"it holds pickle files {pickles} (resuming never unpickles: a checkpoint "
               f"holds safetensors and JSON only)" if pickles else "a save was interrupted, or the folder is not a checkpoint")
        raise CheckpointError(f"{folder} has no {MANIFEST_NAME}: {why}. Resume from another checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest_path} is damaged: {error}.") from error
    validate_manifest(manifest, str(manifest_path))
    resolved_folder = folder.resolve()
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (its manifest lists it).")
        if path.resolve().parent != resolved_folder:
            raise CheckpointError(f"{path} is a symlink to {path.resolve()}, outside the checkpoint folder: a "
                                  f"checkpoint only reads its own files.")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded when it was saved.")
    return manifest


def checkpoint_file(folder: str | os.PathLike, manifest: dict[str, Any], name: str) -> Path:
    """The path of `name` in a checkpoint read by `read_manifest`: only a file its manifest lists (and so was
    verified) is ever read."""
    if name not in manifest["files"]:
        raise CheckpointError(f"{Path(folder) / MANIFEST_NAME} does not list {name}: resuming reads only the files a "
                              f"manifest lists and verifies.")
    return Path(folder) / name


# ---------------------------------------------------------------------------------------------------- the lock
class OutputDirLocked(RuntimeError):
    """Another live run holds the output_dir's lock; the message names it."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux: field 22 of /proc/PID/stat), to tell a reused pid; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunFolderLock:
    """output_dir/.calmrl.lock: one run at a time writes an output_dir. `acquire` creates the file atomically
    (O_EXCL) with the holder's pid, host and process start time; a second run fails with the holder named; the lock
    of a dead process on this host (pid gone, or reused by another process) is taken over with a warning. `release`
    removes it when it is still this holder's."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path, self.holder = path, holder

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def describe(holder: dict[str, Any] | None) -> str:
        if holder is None:
            return "an unreadable lock"
        return f"pid {holder.get('pid')} on host {holder.get('host')!r} (since {holder.get('since')})"

    @staticmethod
    def is_stale(holder: dict[str, Any] | None, path: Path) -> bool:
        """Dead for sure: this host's process is gone or its pid now belongs to another process; an unreadable lock
        older than a minute (its holder died between creating and writing it)."""
        if holder is None:
            try:
                return time.time() - path.lstat().st_mtime > 60
            except OSError:
                return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another machine's process: cannot tell
        pid = holder["pid"]
        if not _pid_alive(pid):
            return True
        started = holder.get("started")
        return started is not None and _process_start(pid) not in (None, started)

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike) -> RunFolderLock:
        path = Path(output_dir) / LOCK_NAME
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
        for _ in range(5):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = cls._read(path)
                if not cls.is_stale(current, path):
                    raise OutputDirLocked(
                        f"{Path(output_dir)} is in use by another run: {cls.describe(current)} holds {path}. Two runs "
                        f"writing one output_dir delete each other's checkpoints: wait for it, or choose another "
                        f"output_dir (remove {path} only if that run is dead).") from None
                cls._take_over(path, current)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(holder))
                handle.flush()
                os.fsync(handle.fileno())
            return cls(path, holder)
        raise OutputDirLocked(f"Could not take {path}: other runs keep taking it.")

    @classmethod
    def _take_over(cls, path: Path, stale: dict[str, Any] | None) -> None:
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            path.rename(aside)
        except FileNotFoundError:
            return  # another run took it over first: try again
        moved = cls._read(aside)
        if (moved or {}).get("token") != (stale or {}).get("token"):
            try:  # it was a fresh lock taken in between: put it back
                os.link(aside, path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        logger.warning("Took over the stale lock %s of a dead run (%s).", path, cls.describe(stale))

    def release(self) -> None:
        current = self._read(self.path)
        if current is not None and current.get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)


__all__ = ["ABANDONED_FOLDER", "CheckpointError", "INCOMPLETE_SUFFIX", "LOCK_NAME", "MANIFEST_FORMAT", "MANIFEST_NAME",
           "OutputDirLocked", "REQUIRED_FILES", "RunFolderLock", "capture_rng_state", "check_checkpoints_root",
           "checkpoint_file", "commit_checkpoint", "decode_state", "encode_state", "ensure_writable_directory",
           "file_sha256", "find_checkpoints", "in_line", "json_safe", "load_state_file", "manifest_differences",
           "new_run_id", "plain_file_name", "prune_checkpoints", "read_manifest", "remove_stale_staging",
           "restore_rng_state", "set_aside_checkpoints", "start_checkpoint", "state_file_bytes",
           "validate_manifest", "write_checkpoint_files", "write_file"]
