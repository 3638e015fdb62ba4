"""`benchmarks.bench_gpu` on CPU with tiny towers: every code path of a row (vast.yaml's model and stage-2
arguments, the package's training step, the timed imputer step), the table's rows, the refusal without a GPU and
the compiled rows' clear error where `compile_model` is missing. The paper-scale numbers need a GPU."""

import sys

import pytest
import torch

from benchmarks import bench_gpu
from calmrl_hf import CalMRLModel


@pytest.mark.slow
def test_a_tiny_run_prints_every_row(capsys):
    results = bench_gpu.main(["--sizes", "tiny", "--compile", "off", "--warmup", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert [(r["attention"], r["compiled"]) for r in results] == [("sdpa", False), ("eager", False)]
    for row in results:
        result = row["result"]
        assert result["step_ms"] > 0 and result["samples_per_s"] == pytest.approx(8e3 / result["step_ms"])
        assert 0 < result["imputer_ms"] < result["step_ms"]  # the imputer step ran inside the timed steps
        assert f"| {row['attention']} | no | {result['step_ms']:.1f} |" in out


def test_every_combination_is_a_row():
    assert bench_gpu.rows_to_run("both") == [("sdpa", False), ("eager", False), ("sdpa", True), ("eager", True)]
    assert bench_gpu.rows_to_run("on") == [("sdpa", True), ("eager", True)]


def test_a_row_that_would_end_past_the_budget_is_skipped():
    assert not bench_gpu.over_budget(100.0, 285.0, True, {})  # the first compiled row: no estimate yet
    assert bench_gpu.over_budget(100.0, 285.0, True, {True: 200.0, False: 10.0})
    assert not bench_gpu.over_budget(100.0, 285.0, False, {True: 200.0, False: 10.0})


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_attention_asked_reaches_every_tower(attention):
    model = CalMRLModel(bench_gpu.build_config("tiny", attention))
    assert {tower.config._attn_implementation for tower in model.encoders.values()} == {attention}


def test_the_recipe_towers_are_built_at_their_checkpoints_sizes():
    config = bench_gpu.build_config("vast", "sdpa")  # configs only: nothing of that size is built here
    towers = config.encoder_configs
    assert {name: type(tower).__name__ for name, tower in towers.items()} == {
        "vision": "CLIPVisionConfig", "audio": "ASTConfig", "text": "BertConfig"}
    assert {(t.hidden_size, t.num_hidden_layers, t.num_attention_heads) for t in towers.values()} == {(768, 12, 12)}
    assert towers["vision"].patch_size == 16 and towers["audio"].time_stride == towers["audio"].frequency_stride == 10
    assert (config.projection_dim, config.imputer_latent_dim, config.fusion_num_layers) == (512, 64, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_paper_sizes_without_a_gpu_are_refused():
    with pytest.raises(SystemExit, match="found none"):
        bench_gpu.main([])


def test_compiled_rows_without_compile_model_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "calmrl_hf.training.compiling", None)  # importing it raises ImportError
    with pytest.raises(RuntimeError, match="compile_model.*--compile off"):
        bench_gpu.main(["--sizes", "tiny", "--compile", "on"])


def test_an_out_of_memory_row_is_reported_as_such():
    line = bench_gpu.format_row("eager", True, "out of memory")
    header_cells = 8
    assert line.startswith("| eager | yes | out of memory |") and line.count("|") == header_cells + 1
