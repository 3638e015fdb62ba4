"""`benchmarks.bench_step` times `train()` against a bare accelerate loop; the comparison is fair only if both do
the same work, so from the same seed they must end bit-identical: every parameter and the imputer's fit (its
buffers, which the M-steps write). A bare loop that skips part of the work (clipping) or does it otherwise (the
imputer's decay) must be caught."""

import dataclasses

import pytest
import torch

from benchmarks import bench_step
from calmrl_hf import CalMRLModel


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Both loops reduce floats in the same order."""


def run(loop, imputer_method: str, args, dataset) -> CalMRLModel:
    torch.manual_seed(0)
    model = CalMRLModel.from_encoders(**bench_step.tiny_model_kwargs(imputer_method))
    return loop(model, dataset, bench_step.collate_rows, args)


def arguments(tmp_path, **changes):
    """The benchmark's arguments (stage 2 of the main job) at 5 steps of 8 rows: two epochs of 24 rows."""
    args = bench_step.main_job_arguments(str(tmp_path), max_steps=5, batch_size=8)
    return dataclasses.replace(args, **changes)


@pytest.fixture(scope="module")
def dataset():
    return bench_step.StageTwoRows(24, bench_step.InputSizes(text_length=16, vocab_size=128))


def differing(first: CalMRLModel, second: CalMRLModel) -> list[str]:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.parametrize("imputer_method, freeze", [("none", ["text"]), ("ppca", ["text"]), ("ppca", [])],
                         ids=["imputer-off", "ppca", "ppca-text-tower-trained-with-dropout"])
def test_the_bare_loop_ends_bit_identical_to_train(tmp_path, dataset, imputer_method, freeze):
    args = arguments(tmp_path, freeze_modalities=freeze)
    bare = run(bench_step.bare_loop, imputer_method, args, dataset)
    package = run(bench_step.package_loop, imputer_method, args, dataset)
    assert differing(bare, package) == []
    initial = run(bench_step.bare_loop, imputer_method, dataclasses.replace(args, max_steps=1), dataset)
    assert differing(bare, initial)  # the runs trained: equality is not that of two untouched models
    if imputer_method == "ppca":  # the imputer state compared is a fit: M-steps ran on vision, audio, text
        assert bare.imputer.fitted_modalities.tolist() == [True, True, True, False]
    if not freeze:
        assert bare.encoders["text"].config.hidden_dropout_prob > 0  # dropout draws had to follow the same RNG


def test_a_bare_loop_doing_other_work_is_caught(tmp_path, dataset):
    args = arguments(tmp_path)
    package = run(bench_step.package_loop, "ppca", args, dataset)
    unclipped = run(bench_step.bare_loop, "ppca", dataclasses.replace(args, max_grad_norm=None), dataset)
    assert any(not name.startswith("imputer.") for name in differing(unclipped, package))
    other_decay = run(bench_step.bare_loop, "ppca", dataclasses.replace(args, imputer_ema_decay=0.5), dataset)
    changed = differing(other_decay, package)
    # the objective sees the observed columns only: the imputer's decay changes its fit and nothing else
    assert changed and all(name.startswith("imputer.") for name in changed)


def test_step_clock_gives_the_median_step_after_warmup_on_cpu():
    clock = bench_step.StepClock(warmup=2, steps=5, device=torch.device("cpu"))
    clock.times = [0.0, 9.0, 11.0, 14.0, 30.0]  # stamps after steps 1 to 5: steps 3 to 5 took 2, 3 and 16 s
    assert clock.seconds_per_step() == 3.0
    clock.times = clock.times[:4]  # a run that stopped early is not timed as if complete
    with pytest.raises(ValueError, match="4 optimizer steps timed, 5 expected"):
        clock.seconds_per_step()


@pytest.mark.slow
def test_the_quick_benchmark_prints_both_cases(capsys):
    results = bench_step.main(["--quick"])
    out = capsys.readouterr().out
    assert "| imputer off |" in out and "| PPCA imputer on |" in out
    for result in results.values():
        assert len(result["seconds"]["bare"]) == len(result["seconds"]["train"]) == 2
        assert result["ratio"] == pytest.approx(min(result["seconds"]["train"]) / min(result["seconds"]["bare"]))
