import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from fake_hub import FakeHub  # noqa: E402
from tiny_models import MIXED_MASK, tiny_batch, tiny_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.hub import push_to_hub  # noqa: E402


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

    from calmrl_hf.hub import write_model_card

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
