"""Pushes that cannot leak: no symbolic link is followed out of a folder, the Hub token is written nowhere, and no
Hub call waits forever (a timeout per request, bounded retries, a failed checkpoint push never stops training)."""

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from fake_hub import FakeHub  # noqa: E402
from tiny_models import tiny_config  # noqa: E402

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.sharing import push_model, push_to_hub  # noqa: E402
from calmrl_hf.sharing.hub import CheckpointPusher, HubPushError, UnsafeFileError, regular_files  # noqa: E402

SECRET = b"AWS_SECRET_ACCESS_KEY=do-not-share"
TOKEN = "hf_TrainingTokenThatMustNeverBeWritten0123"


def saved_model(folder: Path) -> CalMRLModel:
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config())
    model.save_pretrained(folder)
    return model


def uploaded_bytes(hub: FakeHub) -> list[bytes]:
    return [content for commit in hub.commits for content in commit["files"].values()]


# ------------------------------------------------------------------------------------------------ 1. symlinks
def test_push_refuses_a_symlink_and_never_reads_it(tmp_path):
    folder = tmp_path / "model"
    saved_model(folder)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (folder / "notes.txt").symlink_to("../secret.txt")  # ln -s ../secret.txt model/notes.txt
    with FakeHub() as hub:
        with pytest.raises(UnsafeFileError, match=r"notes\.txt -> \.\./secret\.txt"):
            push_to_hub(folder, "team/x", token="hf_fake", endpoint=hub.endpoint)
        # staging a model loaded from that folder copies its files: refused the same way, before any request
        with pytest.raises(UnsafeFileError, match=r"notes\.txt"):
            push_model(CalMRLModel.from_pretrained(folder), "team/x", token="hf_fake", endpoint=hub.endpoint)
    assert hub.commits == [] and hub.requests == []


def test_a_linked_folder_or_a_link_inside_the_folder_is_refused_too(tmp_path):
    folder = tmp_path / "model"
    saved_model(folder)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.txt").write_bytes(SECRET)
    (folder / "extra").symlink_to(tmp_path / "private", target_is_directory=True)
    (folder / "copy.json").symlink_to("config.json")  # even pointing inside: refused, not followed
    with pytest.raises(UnsafeFileError) as error:
        regular_files(folder)
    assert "extra -> " in str(error.value) and "copy.json -> config.json" in str(error.value)
    os.mkfifo(folder / "pipe")  # reading a FIFO would block the push: refused as not a regular file
    (folder / "extra").unlink()
    (folder / "copy.json").unlink()
    with pytest.raises(UnsafeFileError, match=r"pipe \(not a regular file\)"):
        regular_files(folder)
    (folder / "pipe").unlink()
    # the folder itself may be a link (an output_dir on another disk): its regular files are listed
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    assert "config.json" in regular_files(tmp_path / "alias")


def test_checkpoint_push_never_uploads_a_linked_file_of_the_checkpoint(tmp_path, caplog):
    model = saved_model(tmp_path / "model")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    checkpoint = tmp_path / "checkpoints" / "step_1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.safetensors").write_bytes(b"state")
    (checkpoint / "random_states_0.pkl").symlink_to(tmp_path / "secret.txt")
    with FakeHub() as hub, caplog.at_level(logging.WARNING, logger="calmrl_hf.sharing.hub"):
        pusher = CheckpointPusher("team/run", "checkpoint", token="hf_fake", endpoint=hub.endpoint)
        assert pusher.push(model, checkpoint, step=1) is not None
        pusher.wait()  # the refusal is reported, not raised into the training loop
    assert hub.commits == [] and SECRET not in b"".join(uploaded_bytes(hub))
    assert pusher.failures and pusher.failures[0][0] == 1 and "random_states_0.pkl" in pusher.failures[0][1]
    assert any("checkpoint 1" in r.getMessage() and "random_states_0.pkl" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ 2. the token
def test_training_arguments_never_show_the_token():
    from calmrl_hf.training import CalMRLTrainingArguments
    from calmrl_hf.training.arguments import recorded_arguments

    args = CalMRLTrainingArguments(hub_token=TOKEN, hub_endpoint=f"https://user:{TOKEN}@hub.example")
    assert TOKEN not in repr(args) and TOKEN not in str(recorded_arguments(args))
    assert "hub_token" not in recorded_arguments(args)
    with pytest.raises(ValueError, match="hub_timeout must be a number of seconds > 0"):
        CalMRLTrainingArguments(hub_timeout=0)
    with pytest.raises(ValueError, match="hub_retries must be an integer >= 0"):
        CalMRLTrainingArguments(hub_retries=-1)
    assert CalMRLTrainingArguments.from_dict({"hub_timeout": "5"}).hub_timeout == 5.0


def test_a_training_run_writes_its_token_nowhere(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config

    from calmrl_hf.training import CalMRLTrainingArguments, train

    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    output = tmp_path / "run"
    with FakeHub() as hub, caplog.at_level(logging.DEBUG):
        args = CalMRLTrainingArguments(output_dir=str(output), max_steps=2, save_steps=1, save_total_limit=None,
                                       per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                                       imputer_min_rows=8, seed=3, report_to="tensorboard", push_to_hub=True,
                                       hub_model_id="team/run", hub_strategy="checkpoint", hub_token=TOKEN,
                                       hub_endpoint=hub.endpoint)
        train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate)
    files = [p for p in output.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files) and any(p.name == "hparams.yml" for p in files)
    assert any(p.name == "manifest.json" for p in files) and (output / "training_args.json").is_file()
    for path in files:  # every file, binary ones too (the event file)
        assert TOKEN.encode() not in path.read_bytes(), path
    summaries = [c["summary"] for c in hub.commits]
    assert "Training in progress, step 1" in summaries and summaries[-1] == "Upload CalMRL model"
    assert any(name.startswith("last-checkpoint/") for c in hub.commits for name in c["files"])
    for content in uploaded_bytes(hub):
        assert TOKEN.encode() not in content
    assert caplog.records and not any(TOKEN in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text


# ------------------------------------------------------------------------------------------------ 3. timeouts
@contextmanager
def silent_endpoint():
    """An HTTP endpoint that accepts every connection and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.05)
    stop, connections = threading.Event(), []

    def accept():
        while not stop.is_set():
            try:
                connections.append(server.accept()[0])
            except (socket.timeout, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    finally:
        stop.set()
        thread.join()
        for connection in connections:
            connection.close()
        server.close()


def test_push_to_a_silent_endpoint_fails_within_its_timeout(tmp_path, caplog):
    folder = tmp_path / "model"
    saved_model(folder)
    with silent_endpoint() as (endpoint, connections), caplog.at_level(logging.WARNING):
        start = time.monotonic()
        with pytest.raises(HubPushError) as error:
            push_to_hub(folder, "team/x", token=TOKEN, endpoint=endpoint, hub_timeout=1, hub_retries=1)
        elapsed = time.monotonic() - start
    # 2 attempts of 1 s and a 1 s pause: seconds, not forever
    assert 2.0 <= elapsed < 10.0, elapsed
    message = str(error.value)
    assert "Creating the repository team/x" in message and endpoint in message and "after 2 attempt(s)" in message
    assert "hub_timeout 1 s" in message and TOKEN not in message
    assert len(connections) >= 2  # it did reach the endpoint, twice
    assert any("retrying" in r.getMessage() for r in caplog.records) and TOKEN not in caplog.text
    with pytest.raises(ValueError, match="hub_timeout must be a number of seconds > 0"):
        push_to_hub(folder, "team/x", endpoint=endpoint, hub_timeout=0)


def test_checkpoint_pusher_against_a_silent_endpoint_never_blocks(tmp_path, caplog):
    model = saved_model(tmp_path / "model")
    checkpoint = tmp_path / "checkpoints" / "step_4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.safetensors").write_bytes(b"state")
    with silent_endpoint() as (endpoint, _), caplog.at_level(logging.WARNING):
        start = time.monotonic()
        pusher = CheckpointPusher("team/run", "checkpoint", token=TOKEN, endpoint=endpoint, hub_timeout=1,
                                  hub_retries=0)  # the repository's creation times out: a warning, not an error
        future = pusher.push(model, checkpoint, step=4)
        assert future is not None and time.monotonic() - start < 5.0  # the push itself returns at once
        pusher.wait()  # returns: the upload failed within its timeout
        elapsed = time.monotonic() - start
    assert elapsed < 8.0, elapsed
    assert future.result() is None and [step for step, _ in pusher.failures] == [4]
    assert any("checkpoint 4" in r.getMessage() and "hub_timeout 1 s" in r.getMessage() for r in caplog.records)
    assert (checkpoint / "optimizer.safetensors").read_bytes() == b"state"  # the local checkpoint is untouched
    assert TOKEN not in caplog.text


def test_training_against_a_silent_endpoint_finishes_with_its_checkpoints(tmp_path, caplog):
    from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config

    from calmrl_hf.training import CalMRLTrainingArguments, train

    torch.manual_seed(0)
    model = CalMRLModel(training_config())
    output = tmp_path / "run"
    with silent_endpoint() as (endpoint, _), caplog.at_level(logging.WARNING):
        args = CalMRLTrainingArguments(output_dir=str(output), max_steps=4, save_steps=2, save_total_limit=None,
                                       per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                                       imputer_min_rows=8, seed=3, push_to_hub=True, hub_model_id="team/run",
                                       hub_strategy="every_save", hub_token=TOKEN, hub_endpoint=endpoint,
                                       hub_timeout=1, hub_retries=0)
        start = time.monotonic()
        result = train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate)  # the run finishes
        elapsed = time.monotonic() - start
    assert result.global_step == 4 and elapsed < 30.0, elapsed
    # the run finished: every local checkpoint and the final model are there
    saved = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert saved == ["step_2", "step_4"], saved
    assert (output / "model.safetensors").is_file() and (output / "training_args.json").is_file()
    assert CalMRLModel.from_pretrained(output).config.modalities == model.config.modalities
    warnings = [r.getMessage() for r in caplog.records]
    assert any("checkpoint 2" in w and "failed" in w for w in warnings), warnings
    assert any("The final push of" in w and "saved locally" in w for w in warnings), warnings
    assert TOKEN not in caplog.text
