"""LoRA adapters (peft) on some towers: `CalMRLConfig.lora = {"modalities": [...], "r", "alpha", "dropout",
"target_modules"}`. Those towers' base weights are frozen; only their adapters train, and they are saved and
loaded with the model.

peft is needed only by models with adapters: its import sits behind `is_peft_available()`, which transformers'
remote-code import check skips (this file is copied into checkpoints as remote code).
"""

from __future__ import annotations

from torch import nn
from transformers.utils import is_peft_available


if is_peft_available():
    from peft import LoraConfig, inject_adapter_in_model


def add_lora(encoders: nn.ModuleDict, settings: dict) -> None:
    """Inject LoRA adapters into the towers `settings["modalities"]` and freeze those towers' base weights."""
    if not is_peft_available():
        raise ImportError("This model has LoRA adapters (config.lora): install peft (`pip install peft`).")
    lora_config = LoraConfig(r=settings.get("r", 8), lora_alpha=settings.get("alpha", 16),
                             lora_dropout=settings.get("dropout", 0.0),
                             target_modules=list(settings["target_modules"]))
    for name in settings["modalities"]:
        inject_adapter_in_model(lora_config, encoders[name])
    freeze_lora_towers(encoders, settings)


def freeze_lora_towers(encoders: nn.ModuleDict, settings: dict | None) -> None:
    """Only the adapters of LoRA towers train (also after loading, which re-creates parameters)."""
    for name in (settings or {}).get("modalities", []):
        for parameter_name, parameter in encoders[name].named_parameters():
            parameter.requires_grad = "lora_" in parameter_name


def is_lora_layer(module: nn.Module) -> bool:
    """A peft layer holding LoRA adapters (its `lora_B` matrices start at zero: a fresh adapter is the identity)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "lora_B")


__all__ = ["add_lora", "freeze_lora_towers", "is_lora_layer"]
