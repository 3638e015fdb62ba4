import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from fake_hub import FakeHub  # noqa: E402
from tiny_models import MIXED_MASK, tiny_batch, tiny_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.sharing import push_model, push_to_hub  # noqa: E402


def saved_model(folder):
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config())
    model.save_pretrained(folder)
    (folder / "checkpoints" / "step_1").mkdir(parents=True)
    (folder / "checkpoints" / "step_1" / "optimizer.bin").write_bytes(b"training state")
    return model


def test_push_uploads_the_model_in_one_commit(tmp_path):
    folder = tmp_path / "model"
    model = saved_model(folder)
    with FakeHub() as hub:
        url = push_to_hub(folder, "team/calmrl-tiny", token="hf_fake", endpoint=hub.endpoint,
                          commit_message="first model")
    assert len(hub.commits) == 1 and url.startswith(hub.endpoint)
    commit = hub.commits[0]
    assert commit["repo"] == "team/calmrl-tiny" and commit["summary"] == "first model"
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                and "checkpoints" not in p.parts}
    assert set(commit["files"]) == expected
    assert {"model.safetensors", "config.json", "modeling_calmrl.py", "imputer.py"} <= expected
    for path, content in commit["files"].items():
        assert content == (folder / path).read_bytes(), path
    # what was uploaded loads back to the same model
    download = tmp_path / "download"
    for path, content in commit["files"].items():
        (download / path).parent.mkdir(parents=True, exist_ok=True)
        (download / path).write_bytes(content)
    loaded = CalMRLModel.from_pretrained(download).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny_batch(MIXED_MASK), return_loss=True).loss,
                                   model.eval()(**tiny_batch(MIXED_MASK), return_loss=True).loss)


def test_push_refuses_pickles_and_folders_without_config(tmp_path):
    folder = tmp_path / "model"
    saved_model(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with FakeHub() as hub:
        with pytest.raises(ValueError, match=r"Refusing to upload pickle files \['pytorch_model.bin'\]"):
            push_to_hub(folder, "team/x", token="hf_fake", endpoint=hub.endpoint)
        with pytest.raises(ValueError, match="no config.json"):
            push_to_hub(tmp_path, "team/x", token="hf_fake", endpoint=hub.endpoint)
    assert hub.commits == [] and hub.requests == []


def test_model_card_carries_the_runs_numbers(tmp_path):
    from huggingface_hub import ModelCard

    from calmrl_hf.sharing.hub import write_model_card

    folder = tmp_path / "model"
    saved_model(folder)
    metrics = {"text->vision/R@1": 61.1, "vision->text/R@1": 59.2, "mean_R@1": 60.15, "text->vision/R@5": 85.0}
    write_model_card(folder, repo_id="team/calmrl-tiny", metrics=metrics, dataset_name="msrvtt",
                     training_args={"learning_rate": 1e-4, "hub_token": "secret"}, datasets=["msrvtt", "audiocaps"])
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "calmrl_hf" and "missing-modalities" in card.data.tags
    assert card.data.datasets == ["msrvtt", "audiocaps"]
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {"text->vision/R@1": 61.1, "vision->text/R@1": 59.2, "mean_R@1": 60.15}
    text = (folder / "README.md").read_text()
    assert "| text->vision/R@1 | 61.10 |" in text and "| subtitle | bert (shared with text) | mean |" in text
    assert "team/calmrl-tiny" in text and "secret" not in text


# ------------------------------------------------------------------------------ one repository, whichever push
def run_folder(folder, repo_id):
    """What a training run leaves in output_dir: model, processor, filled card, args, results, checkpoints and
    tracker logs."""
    from transformers import BertTokenizer, ViTImageProcessor

    from calmrl_hf import CalMRLProcessor
    from calmrl_hf.sharing.hub import write_model_card

    model = saved_model(folder)
    processor = CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "a", "dog"])}),
                                ViTImageProcessor(size={"height": 16, "width": 16}), num_frames=2)
    processor.save_pretrained(folder)
    args, metrics = {"learning_rate": 0.001, "max_steps": 6}, {"text->vision/R@1": 50.0, "mean_R@1": 40.0}
    (folder / "training_args.json").write_text(json.dumps(args, indent=2))  # as the training loop writes it
    (folder / "train_results.json").write_text(json.dumps({"global_step": 6, "final_loss": 1.5, **metrics}))
    write_model_card(folder, repo_id=repo_id, metrics=metrics, training_args=args)
    (folder / "calmrl").mkdir()
    (folder / "calmrl" / "events.out.tfevents.1.host").write_bytes(b"tensorboard")
    return model, processor


def test_model_push_to_hub_gives_the_folder_pushs_repository(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _, processor = run_folder(folder, "team/calmrl")
    with FakeHub() as hub:
        push_to_hub(folder, "team/calmrl", token="hf_fake", endpoint=hub.endpoint)
        push_model(CalMRLModel.from_pretrained(folder), "team/calmrl", token="hf_fake", endpoint=hub.endpoint)
        # a model built in memory with its processor: the same files but the run's records
        fresh = CalMRLModel.from_pretrained(folder)
        fresh.name_or_path = ""
        push_model(fresh, "team/fresh", processor=processor, token="hf_fake", endpoint=hub.endpoint,
                   metrics={"text->vision/R@1": 50.0, "mean_R@1": 40.0},
                   training_args={"learning_rate": 0.001, "max_steps": 6})
        # processor.push_to_hub, as after a CLIP-style model push: its files only, never a generic card
        from huggingface_hub import HfApi

        monkeypatch.setattr("transformers.utils.hub._hf_api", HfApi(endpoint=hub.endpoint, token="hf_fake"))
        processor.push_to_hub("team/fresh")
    folder_push, model_push, fresh_push, processor_push = hub.commits
    assert {"model.safetensors", "config.json", "modeling_calmrl.py", "processor_config.json", "processing_calmrl.py",
            "README.md", "training_args.json", "train_results.json"} <= set(folder_push["files"])
    assert not any(f.startswith(("calmrl/", "checkpoints/")) for f in folder_push["files"])  # no logs, no state
    assert model_push["files"] == folder_push["files"]  # byte for byte
    assert "| text->vision/R@1 | 50.00 |" in model_push["files"]["README.md"].decode()
    shared = {f: c for f, c in folder_push["files"].items() if f != "train_results.json" and f != "README.md"}
    assert {f: c for f, c in fresh_push["files"].items() if f != "README.md"} == shared
    assert "README.md" not in processor_push["files"]
    for name, content in processor_push["files"].items():
        assert content == folder_push["files"][name], name


def test_checkpoint_pushes_run_in_the_background_one_at_a_time(tmp_path):
    import threading

    from calmrl_hf.sharing.hub import CheckpointPusher

    model = saved_model(tmp_path / "model")
    gate = threading.Event()
    with FakeHub(gate=gate) as hub:
        pusher = CheckpointPusher("team/run", "every_save", token="hf_fake", endpoint=hub.endpoint)
        first = pusher.push(model, tmp_path / "model" / "checkpoints" / "step_1", step=1)
        assert first is not None and not first.done()  # the caller goes on while the upload waits
        assert pusher.push(model, tmp_path / "model" / "checkpoints" / "step_1", step=2) is None  # skipped
        gate.set()
        pusher.wait()
    assert [c["summary"] for c in hub.commits] == ["Training in progress, step 1"]
    assert "model.safetensors" in hub.commits[0]["files"]
    assert not any(f.startswith("last-checkpoint/") for f in hub.commits[0]["files"])  # every_save: the model only


def test_hub_strategy_checkpoint_resumes_on_another_machine(tmp_path):
    from training_fixtures import MIXED_PATTERNS, make_dataset, run_until

    from calmrl_hf.training import CalMRLTrainingArguments

    data = make_dataset(96, MIXED_PATTERNS)

    def run(output_dir, hub=None, strategy="end", stop_after=None, resume=None):
        args = CalMRLTrainingArguments(output_dir=str(output_dir), max_steps=8, save_steps=3, save_total_limit=None,
                                       per_device_train_batch_size=8, learning_rate=1e-3, imputer_min_rows=8, seed=3,
                                       logging_steps=1, resume_from_checkpoint=resume, hub_strategy=strategy,
                                       push_to_hub=hub is not None, hub_model_id="team/run" if hub else None,
                                       hub_endpoint=hub and hub.endpoint,
                                       hub_token="hf_fake")
        return run_until(data, args, stop_after)  # stop_after: the machine goes away after that checkpoint

    uninterrupted = run(tmp_path / "a")
    with FakeHub() as hub:
        assert run(tmp_path / "b", hub=hub, strategy="checkpoint", stop_after=3) is None
        assert [c["summary"] for c in hub.commits] == ["Training in progress, step 3"]
        pushed = hub.commits[0]["files"]
        assert "model.safetensors" in pushed and "last-checkpoint/optimizer.safetensors" in pushed
        assert "last-checkpoint/manifest.json" in pushed  # a complete checkpoint: resumable as it is
        hub.snapshot("team/run", tmp_path / "downloaded", prefix="last-checkpoint/")
        resumed = run(tmp_path / "elsewhere", hub=hub, strategy="checkpoint", resume=str(tmp_path / "downloaded"))
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # the resumed run pushed its step-6 checkpoint, then the final model (the last commit)
    assert [c["summary"] for c in hub.commits[1:]] == ["Training in progress, step 6", "Upload CalMRL model"]
    final = hub.commits[-1]["files"]
    assert "training_args.json" in final and not any(f.startswith("last-checkpoint/") for f in final)


def test_every_push_goes_through_one_upload(tmp_path, monkeypatch):
    import calmrl_hf.sharing.hub as hub_module

    folder = tmp_path / "run"
    model, processor = run_folder(folder, "team/calmrl")
    uploads, upload = [], hub_module.upload_folder

    def recording_upload(api, staged, repo_id, **kwargs):
        uploads.append((repo_id, kwargs.get("training_state")))
        return upload(api, staged, repo_id, **kwargs)

    monkeypatch.setattr(hub_module, "upload_folder", recording_upload)
    with FakeHub() as hub:
        push_to_hub(folder, "team/folder", token="hf_fake", endpoint=hub.endpoint)
        push_model(model, "team/model", processor=processor, token="hf_fake", endpoint=hub.endpoint)
        pusher = hub_module.CheckpointPusher("team/run", "checkpoint", token="hf_fake", endpoint=hub.endpoint)
        pusher.push(model, folder / "checkpoints" / "step_1", step=1)
        pusher.wait()
    assert uploads == [("team/folder", None), ("team/model", None), ("team/run", folder / "checkpoints" / "step_1")]
    assert [c["repo"] for c in hub.commits] == ["team/folder", "team/model", "team/run"]
    # the checkpoint's training state goes under last-checkpoint/, pickles of the optimizer included
    assert hub.commits[2]["files"]["last-checkpoint/optimizer.bin"] == b"training state"
    assert not any(name.startswith("checkpoints/") for commit in hub.commits for name in commit["files"])
