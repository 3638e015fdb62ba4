"""How CalMRL checkpoints and towers load: safetensors only, and completely or not at all.

transformers only logs missing or unexpected keys (and leaves freshly initialised values in the missing ones); a
CalMRL checkpoint must load completely, imputer buffers included, or it is an error that says what differs.
Pickle files are never unpickled. Imports torch, transformers and safetensors only: this file is copied into
checkpoints as remote code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from .towers import tower_class


logger = logging.getLogger(__name__)

# Files that hold pickled weights: refused when loading a model (`load_strictly`) and when sharing one (`hub`).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")


def _refuse_pickles(location) -> None:
    folder = Path(str(location))
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise ValueError(f"{folder} has no safetensors weights{f' (only {pickles})' if pickles else ''}; "
                         f"CalMRL refuses to unpickle checkpoints. Convert them to safetensors first.")


def load_strictly(from_pretrained: Callable, *args, optional_keys: tuple[str, ...] = (), **kwargs):
    """`(model, loading_info)` from transformers' `from_pretrained(*args, **kwargs)`, refusing pickles, safetensors
    files that do not parse (a truncated file, a damaged header) and any checkpoint that does not match the config
    (missing, unexpected or reshaped tensors). Tensor values are not checksummed: a changed value inside a
    well-formed file loads (training checkpoints are verified, `checkpointing.read_manifest`).

    Tensors of another shape are reported by transformers in `mismatched_keys` (`ignore_mismatched_sizes=True`)
    and refused here with the others, instead of surfacing as transformers' own RuntimeError. `optional_keys` may
    be missing (checkpoints saved before they existed): a warning, and the model's initial values.
    """
    if kwargs.get("use_safetensors") is False:
        raise ValueError("CalMRL checkpoints load from safetensors only (pickle files are never unpickled).")
    kwargs.update(use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True)
    if args:
        _refuse_pickles(args[0])
    try:
        model, info = from_pretrained(*args, **kwargs)
    except SafetensorError as error:
        raise ValueError(f"The safetensors weights of {args[0] if args else 'the checkpoint'} are corrupt or "
                         f"truncated: {error}") from error
    absent_optional = sorted(set(map(str, info.get("missing_keys") or [])) & set(optional_keys))
    if absent_optional:
        logger.warning("The checkpoint predates %s; loading it with their initial values.", absent_optional)
    problems = {key: sorted(map(str, info.get(key) or [])) for key in _LOADING_PROBLEMS}
    problems["missing_keys"] = [key for key in problems["missing_keys"] if key not in absent_optional]
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        details = "; ".join(f"{key}: {value[:8]}{' ...' if len(value) > 8 else ''}" for key, value in problems.items())
        raise ValueError(
            f"The checkpoint does not match the model config ({details}). Check that the config's modalities, "
            f"encoders, projection_dim and imputer_latent_dim are those the checkpoint was saved with."
        )
    return model, info


def load_sub_model(name: str, spec: str, model_class: type) -> PreTrainedModel:
    """The `model_class` part of the composite checkpoint `spec` (e.g. `CLIPVisionModel` of a CLIP checkpoint):
    the other parts' weights are left out; a weight of the part itself missing from the checkpoint is an error."""
    tower, info = model_class.from_pretrained(spec, output_loading_info=True)
    if info.get("missing_keys"):
        raise ValueError(f"The {name} tower {model_class.__name__} is not complete in {spec}: missing "
                         f"{sorted(info['missing_keys'])[:8]}.")
    return tower


def saved_tensor(location, key: str, kwargs: dict) -> torch.Tensor:
    """Tensor `key` as stored in the safetensors weights of a checkpoint (a folder or a Hub repo id, `kwargs` those
    of `from_pretrained`: revision, cache_dir, token, ...), sharded or not."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs}
    index = cached_file(str(location), SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    name = json.loads(Path(index).read_text())["weight_map"][key] if index else SAFE_WEIGHTS_NAME
    with safe_open(cached_file(str(location), name, **hub), framework="pt") as weights:
        return weights.get_tensor(key)


def load_tower(name: str, spec) -> PreTrainedModel | PreTrainedConfig:
    """The tower of modality `name` for `CalMRLModel.from_encoders`: a model or config as given, or a folder /
    Hub repo id loaded with `AutoModel.from_pretrained`; from a composite checkpoint whose config has a
    `{name}_config` (CLIP for `vision` or `text`, CLAP for `audio`), that part's model only (`CLIPVisionModel`), as
    transformers' VisionTextDualEncoder does."""
    if isinstance(spec, (PreTrainedModel, PreTrainedConfig)):
        return spec
    if isinstance(spec, str):
        sub_config = getattr(AutoConfig.from_pretrained(spec), f"{name}_config", None)
        if isinstance(sub_config, PreTrainedConfig) and tower_class(sub_config) is not None:
            return load_sub_model(name, spec, tower_class(sub_config))
        return AutoModel.from_pretrained(spec)
    raise TypeError(
        f"The tower of {name!r} must be a folder or repo id, a PreTrainedModel or a config; got {type(spec).__name__}."
    )


__all__ = ["PICKLE_SUFFIXES", "load_strictly", "load_tower", "saved_tensor"]
