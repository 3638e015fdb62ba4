"""`torch.compile` for a CalMRL model: the parts that benefit, compiled in place (`compile_model`).

Compiled: each tower's `forward` (most of a step's work) and the alignment objective's loss given its mask. Not
compiled: the model's `forward` around them, whose checks read tensors on the host (a mask's row counts, NaN
checks: one sync per batch) and index the observed rows of each modality, which would break the graph there, and
the imputer (a few small matrix products per batch).

In place, without a wrapper module: a tower's `forward` becomes a compiled function bound to that tower, so the
state dict keys (no `_orig_mod.`), `save_pretrained`, checkpoints and `accelerator.prepare` see the model as it
was; a deep copy (a teacher) binds the copy's own tower. The objective becomes the model's `objective_loss_fn`,
which `CalMRLModel._alignment_loss` calls instead of `OBJECTIVES[config.alignment_objective].loss`.

Shapes: a tower sees each modality's observed rows only, so its row count changes from batch to batch. With
`dynamic=True` the row dimension (dim 0 of every tensor input) is dynamic from the first call, so a new count
compiles nothing, except where a kernel chooses by size: then torch recompiles once per size range (the main job's
ResNet convolutions: 4 graphs for the vision tower, 3 for the audio tower over every split of a batch; the tiny
ViT / AST / BERT towers of the tests: 1). torch specialises sizes 0 and 1: a modality observed in one row of a
batch gets a graph of its own. Another dimension that changes (a text length) becomes dynamic on its first change
(torch's automatic dynamic shapes). `dynamic=False`: one graph per shape seen. The objective's inputs are [B, k, D]:
one graph with a mask and one without (every column aligned). Training and no-grad evaluation (and a teacher's
frozen copy) compile graphs of their own. `compiled_graphs(model)` counts them; past torch's recompile limit (8
per function) a function runs eagerly.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..alignment import OBJECTIVES


def objective_loss(embeddings: torch.Tensor, mask: torch.Tensor | None, config, temperature) -> torch.Tensor:
    """The configured objective, `OBJECTIVES[config.alignment_objective].loss`: read at every call, so a model
    whose objective changes (a recipe's stages) compiles the new one (dynamo guards on the name)."""
    return OBJECTIVES[config.alignment_objective].loss(embeddings, mask, config, temperature)


# each compiled tower's `_rows_dynamic` hook, removed when the tower is compiled again
_ROW_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mark_rows(*values) -> None:
    """Dim 0 (the observed rows) of every tensor among `values` dynamic for the compiled function they enter."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(value, 0)


def _rows_dynamic(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """A tower's forward pre-hook: it runs outside the compiled forward, so dynamo sees the marks."""
    _mark_rows(*args, *kwargs.values())


def _own_code(function: Callable) -> Callable:
    """`function` with a code object of its own. dynamo keeps a code object's graphs together, under one recompile
    limit (8), and transformers' towers all enter through the same decorator's wrapper: compiled as they are, every
    tower's graphs (training, no-grad evaluation, a teacher's) would share those 8 and the rest run eagerly."""
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    own.__kwdefaults__, own.__qualname__ = function.__kwdefaults__, function.__qualname__
    own.__dict__.update(function.__dict__)  # functools.wraps' __wrapped__, which signature() follows
    return own


class CompiledObjective:
    """A model's `objective_loss_fn`: `objective_loss` compiled (a code object of its own: the model's graphs
    only), the row dimension of its inputs marked dynamic outside the compiled region."""

    def __init__(self, options: dict, dynamic: bool):
        self.function = torch.compile(_own_code(objective_loss), **options)
        self.dynamic = dynamic

    def __call__(self, embeddings: torch.Tensor, mask: torch.Tensor | None, config, temperature) -> torch.Tensor:
        if self.dynamic:
            _mark_rows(embeddings, mask)
        return self.function(embeddings, mask, config, temperature)


def compile_model(model: nn.Module, dynamic: bool = True, *, backend: str | Callable | None = None,
                  mode: str | None = None) -> nn.Module:
    """Compile `model`'s towers and objective in place with `torch.compile` (`backend`: None is "inductor";
    `mode`: torch.compile's, e.g. "max-autotune"); returns the model. `dynamic`: the row dimension of the towers'
    and the objective's inputs is dynamic from the first call (see the module's docstring). Calling it again
    recompiles with the new settings.

    Numerics: the compiled functions compute what eager does, fused differently: losses and gradients agree to
    float32 rounding (`tests/test_compile.py` checks 1e-5 relative on a PPCA model with mixed masks).
    """
    model = getattr(model, "get_base_model", lambda: model)()  # a peft-wrapped model: its CalMRL model
    options = {"backend": backend or "inductor", "mode": mode, "dynamic": None if dynamic else False}
    for tower in model.encoders.values():
        if tower in _ROW_HOOKS:  # compiled before: its hook goes with the old settings
            _ROW_HOOKS.pop(tower).remove()
        # the class's forward compiled, bound to this tower: an instance attribute, so a deep copy rebinds it
        tower.forward = types.MethodType(torch.compile(_own_code(type(tower).forward), **options), tower)
        if dynamic:
            _ROW_HOOKS[tower] = tower.register_forward_pre_hook(_rows_dynamic, with_kwargs=True)
    model.objective_loss_fn = CompiledObjective(options, dynamic)
    return model


def _graphs(compiled: Callable) -> int:
    """How many times dynamo compiled `compiled`'s function: its cache entries, one per set of guards."""
    code = compiled._torchdynamo_orig_callable.__code__
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code))


def compiled_graphs(model: nn.Module) -> dict[str, int]:
    """The graphs each compiled function of `model` holds so far, {tower (its key in `model.encoders`): n,
    "objective": n}: one per compilation, so n - 1 recompilations (a graph break inside a function adds graphs of
    its own, not counted here). Empty for a model `compile_model` did not compile."""
    model = getattr(model, "get_base_model", lambda: model)()
    counts = {name: _graphs(tower.forward.__func__) for name, tower in model.encoders.items()
              if hasattr(getattr(tower.forward, "__func__", None), "_torchdynamo_orig_callable")}
    if isinstance(model.objective_loss_fn, CompiledObjective):
        counts["objective"] = _graphs(model.objective_loss_fn.function)
    return counts


__all__ = ["CompiledObjective", "compile_model", "compiled_graphs", "objective_loss"]
