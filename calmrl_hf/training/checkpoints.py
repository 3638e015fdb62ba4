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
import os
import random
import re
import shutil
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
        if any(name == a or name.startswith(a + ".") for a in allowed):
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


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete interrupted saves and all but the newest `keep` complete checkpoints (the newest is always kept).
    Returns what was deleted."""
    complete, incomplete = find_checkpoints(output_dir)
    doomed = [path for path in incomplete if _INCOMPLETE_NAME.match(path.name)]
    if keep:
        doomed += [path for _, path in complete[:-max(keep, 1)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def start_checkpoint(folder: Path) -> Path:
    """The temporary folder a checkpoint is written into (main process: emptied first)."""
    staging = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
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


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint, after checking every file it lists against its SHA-256."""
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
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}.")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (its manifest lists it).")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded when it was saved.")
    return manifest


__all__ = ["CheckpointError", "INCOMPLETE_SUFFIX", "MANIFEST_FORMAT", "MANIFEST_NAME", "capture_rng_state",
           "commit_checkpoint", "decode_state", "encode_state", "ensure_writable_directory", "file_sha256",
           "find_checkpoints", "json_safe", "load_state_file", "manifest_differences", "prune_checkpoints",
           "read_manifest", "restore_rng_state", "start_checkpoint", "state_file_bytes", "write_checkpoint_files",
           "write_file"]
