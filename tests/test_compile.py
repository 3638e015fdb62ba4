"""`compile_model` / `torch_compile`: compiled towers and objective compute what eager does, compile once whatever
the observed-row counts, and leave state dicts, checkpoints and deep copies (teachers) as they are.

Slow: inductor compiles a tiny model's three towers and objective, forward and backward, in tens of seconds on
CPU; the training tests use the "eager" backend (dynamo's capture and guards, no code generation)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from tiny_models import tiny_batch
from training_fixtures import MIXED_PATTERNS, make_dataset, run_until, training_config

from calmrl_hf import CalMRLModel
from calmrl_hf.training import CalMRLTrainingArguments
from calmrl_hf.training.compiling import compile_model, compiled_graphs


# vision, audio, text, subtitle; every modality in >= 2 rows of each batch (torch specialises sizes 0 and 1)
MASKS = [
    [[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 1, 1]],
    [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1]],
    [[1, 1, 1, 1]] * 7,  # every column observed (or imputed): the objective runs without a mask
    [[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1]],
    [[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1]],
]


def ppca_model() -> CalMRLModel:
    """A dropout-free tiny model whose PPCA imputer is fitted on vision, audio and text (subtitle never observed:
    its missing slots stay missing, so the objective sees a mask wherever a row lacks a subtitle)."""
    torch.manual_seed(0)
    model = CalMRLModel(training_config(imputer_method="ppca"))
    fit_mask = torch.tensor([[True, True, True, False]]).expand(64, 4)
    with warnings.catch_warnings():  # "subtitle has no observed rows": as intended
        warnings.simplefilter("ignore")
        model.imputer.fit(F.normalize(torch.randn(64, 4, 16), dim=-1), fit_mask, max_iter=5)
    return model


def loss_and_gradients(model: CalMRLModel, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, return_loss=True).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_model_equals_eager_and_compiles_once_whatever_the_row_counts():
    """Loss within 1e-5 relative and every gradient within 1e-5 of the largest (inductor fuses and reorders float32
    sums); over five batches whose row counts per modality all differ, no recompilation: one graph per tower and
    one per objective form (masked / unmasked), no graph break; state dict keys unchanged."""
    eager = ppca_model()
    compiled = copy.deepcopy(eager)
    graphs = CompileCounterWithBackend("inductor")
    compile_model(compiled, backend=graphs)
    counts = []
    for seed, rows in enumerate(MASKS):
        batch = tiny_batch(torch.tensor(rows, dtype=torch.bool), seed=seed)
        counts.append(tuple(batch["modality_mask"].sum(dim=0).tolist()))
        loss, gradients = loss_and_gradients(eager, batch)
        compiled_loss, compiled_gradients = loss_and_gradients(compiled, batch)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
        scale = max(g.abs().max() for g in gradients.values())
        for name, gradient in gradients.items():
            torch.testing.assert_close(compiled_gradients[name], gradient, rtol=0, atol=1e-5 * scale, msg=name)
        # outputs the model does not use (the towers' poolers): eager leaves no gradient, the compiled backward zeros
        assert all(not compiled_gradients[name].any() for name in set(compiled_gradients) - set(gradients))
    assert len(set(counts)) == len(MASKS)  # the row counts differ from batch to batch
    expected = {**{name: 1 for name in compiled.encoders}, "objective": 2}  # the objective: with and without a mask
    assert compiled_graphs(compiled) == expected
    assert graphs.frame_count == sum(expected.values())  # no graph break inside them
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` prefixes


@pytest.mark.slow
def test_a_deep_copy_of_a_compiled_model_runs_its_own_weights():
    """A teacher is a deep copy: its compiled towers are bound to its own weights, not to the model's."""
    model = ppca_model()
    compile_model(model, backend="eager")
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in teacher.encoders.parameters():
            parameter.mul_(0.5)
    reference = ppca_model()  # eager, with the teacher's weights
    reference.load_state_dict(teacher.state_dict())
    batch = tiny_batch(torch.tensor(MASKS[0], dtype=torch.bool))
    with torch.no_grad():
        taught, _ = teacher.embed_modalities(**batch)
        torch.testing.assert_close(taught, reference.embed_modalities(**batch)[0])
        assert not torch.allclose(taught, model.embed_modalities(**batch)[0])


@pytest.mark.slow
def test_a_compiled_run_checkpoints_and_resumes_in_eager(tmp_path):
    """`torch_compile=True` (the "eager" backend: dynamo's capture and guards, the same kernels): the checkpoint's
    model keys are the model's, and an eager run resumed from it ends with the uninterrupted compiled run's weights,
    bit for bit."""
    data = make_dataset(32, MIXED_PATTERNS)

    def arguments(name, **overrides):
        return CalMRLTrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=8,
                                       learning_rate=1e-3, imputer_min_rows=8, seed=3, save_steps=2,
                                       save_total_limit=None, **overrides)

    compiled = run_until(data, arguments("a", torch_compile=True, torch_compile_backend="eager"))
    assert compiled.objective_loss_fn is not None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "checkpoints" / "step_2" / "model.safetensors"), "pt") as checkpoint:
        assert set(checkpoint.keys()) == set(CalMRLModel(training_config()).state_dict())
    assert run_until(data, arguments("b", torch_compile=True, torch_compile_backend="eager"), stop_after=2) is None
    resumed = run_until(data, arguments("b", resume_from_checkpoint="latest"))  # eager: torch_compile may change
    assert resumed.objective_loss_fn is None
    for key, value in compiled.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
