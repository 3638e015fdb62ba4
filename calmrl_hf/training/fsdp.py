"""What sharded training (FSDP) needs from a run: its shard groups, and its states in full.

Shard groups: with accelerate's TRANSFORMER_BASED_WRAP, FSDP2 makes each module of a class in the model's
`_no_split_modules` a group, then the input embeddings one of their own; the towers list their embeddings classes
there too (BERT's `BertEmbeddings`), which would put the token embeddings in two groups (torch refuses). The
groups are the listed classes that do not hold the input embeddings (`shard_group_classes`).

States, in full (unsharded) whatever the engine: what checkpoints hold.
Under DDP (or one process) every process holds the whole model and optimizer, and their `state_dict` is the state.
Under FSDP each process holds a shard: torch's `torch.distributed.checkpoint.state_dict` functions gather the full
state (a collective: every process calls them, rank 0 gets the state) and give each process its shard of a full
state back, the optimizer's keyed by parameter names instead of positions. DeepSpeed keeps its own partitioned
optimizer (checkpoints under it are refused before training: `launch.refuse_unsupported_engine_settings`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def is_sharded(model) -> bool:
    """Whether `model` is sharded in place by FSDP2's `fully_shard` (accelerate's FSDP2 does not wrap the model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


@contextmanager
def as_its_own_class(model) -> Iterator[None]:
    """The model as an instance of its own class while inside, e.g. to `save_pretrained` it.

    FSDP2's `fully_shard` turns a model's class into `FSDP<Class>` (bases: torch's FSDPModule, the class), defined
    in torch's module: `save_pretrained` would then copy torch's FSDP files as the model's remote code and name
    `FSDPCalMRLModel` in config.json's auto_map. A model not sharded is left as it is.
    """
    sharded_class = type(model)
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    model.__class__ = next(base for base in sharded_class.__bases__ if not issubclass(base, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = sharded_class


def shard_group_classes(model) -> list[str]:
    """The class names of `model._no_split_modules` to shard as FSDP groups: those not holding the input
    embeddings (FSDP2 makes those a group of their own)."""
    embeddings = model.get_input_embeddings()
    holding = {type(module).__name__ for module in model.modules()
               if any(child is embeddings for child in module.modules())}
    return sorted(set(model._no_split_modules or []) - holding)


def set_shard_groups(accelerator: Accelerator, model) -> None:
    """Under FSDP2 with the transformer-layer wrap policy and no class list given
    (`--fsdp_transformer_layer_cls_to_wrap`), shard the groups `shard_group_classes` names; a model sharded
    already (the recipe's stage 2) is kept as it is."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if not accelerator.is_fsdp2:
        return
    plugin = accelerator.state.fsdp_plugin
    if is_sharded(model):  # an earlier stage sharded it: prepare keeps it as it is, and must not look its layer
        plugin.auto_wrap_policy = None  # classes up (fully_shard renamed them FSDP<class>: not found)
        return
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = shard_group_classes(model)


def _fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def full_optimizer_state(accelerator: Accelerator, model, optimizer) -> dict[str, Any]:
    """The optimizer's whole state on the main process (under FSDP every process must call: it gathers)."""
    if not _fsdp(accelerator):
        return optimizer.state_dict() if accelerator.is_main_process else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, on the CPU
    return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=options)


def load_full_model_state(accelerator: Accelerator, model, state: dict[str, torch.Tensor]) -> None:
    """Load a full model state (every process passes the same) into the prepared model: under FSDP each process
    keeps its shard of it."""
    if not _fsdp(accelerator):
        accelerator.unwrap_model(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(accelerator: Accelerator, model, optimizer, state: dict[str, Any]) -> None:
    """Load what `full_optimizer_state` gave (every process passes the same) into the prepared optimizer."""
    if not _fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient (logit_scale under PMRL) has no saved state; the run's
    # manifest already refused a checkpoint of another model or setting
    torch_optimizer = _torch_optimizer(optimizer)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, torch_optimizer, state, options=options)
    # the loader initialises every state with a zero-gradient step first: drop it where the checkpoint had none,
    # so that such a parameter starts Adam afresh (step 0) as it would have in the uninterrupted run
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for parameter in list(torch_optimizer.state):
        if names.get(id(parameter)) not in state.get("state", {}):
            del torch_optimizer.state[parameter]


__all__ = ["as_its_own_class", "full_optimizer_state", "is_sharded", "load_full_model_state", "load_full_optimizer_state",
           "set_shard_groups", "shard_group_classes"]
