"""Checkpoints: no pickle, atomic saves, exact resume with dropout, damage and drift refused, kills survived."""

import json
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training_fixtures import resumable_run

from calmrl_hf.training.checkpoints import (
    CheckpointError, decode_state, encode_state, file_sha256, find_checkpoints, manifest_differences,
    prune_checkpoints, restore_rng_state,
)
from calmrl_hf.training import latest_checkpoint


HERE = Path(__file__).parent
WRITES_PER_SAVE = 6  # one process: its RNG states, model, optimizer, scheduler, imputer statistics, the manifest


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    return {k: v.clone() for k, v in resumable_run(tmp_path_factory.mktemp("reference")).state_dict().items()}


def assert_same_weights(model, reference):
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_state_codec_round_trips_what_checkpoints_hold():
    state = {"step": torch.tensor(3.0), 0: {"betas": (0.9, 0.999), "params": [0, 1], "none": None},
             "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.5), "nested": [{"lr": 1e-3}]}
    structure, tensors = encode_state(state)
    back = decode_state(json.loads(json.dumps(structure)), tensors)
    assert back[0] == state[0] and back["nested"] == state["nested"] and torch.equal(back["step"], state["step"])
    assert back["numpy"][1].dtype == np.uint32 and (back["numpy"][1] == state["numpy"][1]).all()
    assert isinstance(back["numpy"], tuple) and back["numpy"][2:] == state["numpy"][2:]
    with pytest.raises(TypeError, match=r"state\.bad is a object"):
        encode_state({"bad": object()})


def test_resume_with_dropout_ends_bit_equal(tmp_path, uninterrupted):
    for stop_after in (2, 4):  # within the first epoch (4 batches), then in the second
        folder = tmp_path / f"stopped_at_{stop_after}"
        assert resumable_run(folder, stop_after=stop_after) is None
        assert_same_weights(resumable_run(folder, resume="latest"), uninterrupted)


def test_checkpoints_hold_no_pickle_and_resuming_unpickles_nothing(tmp_path, uninterrupted, monkeypatch):
    resumable_run(tmp_path, stop_after=4)
    folder = tmp_path / "checkpoints" / "step_4"
    assert sorted(p.suffix for p in folder.iterdir()) == [".json"] + [".safetensors"] * 5
    marker = tmp_path / "the planted pickle ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = pickle.dumps(Payload())
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):  # where accelerate's save_state puts pickles
        (folder / name).write_bytes(planted)

    def refuse(*args, **kwargs):
        raise AssertionError("resuming unpickled something")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    assert_same_weights(resumable_run(tmp_path, resume="latest"), uninterrupted)
    assert not marker.exists()


def test_a_pickle_in_place_of_a_state_file_is_refused_unread(tmp_path):
    resumable_run(tmp_path, stop_after=2)
    folder = tmp_path / "checkpoints" / "step_2"
    marker = tmp_path / "the planted pickle ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "optimizer.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is damaged: its SHA-256 differs"):
        resumable_run(tmp_path, resume="latest")
    manifest = json.loads((folder / "manifest.json").read_text())  # even with a forged checksum: not unpickled
    manifest["files"]["optimizer.safetensors"] = file_sha256(folder / "optimizer.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is damaged or not a CalMRL state file"):
        resumable_run(tmp_path, resume="latest")
    assert not marker.exists()


def test_damaged_or_old_checkpoints_are_named(tmp_path):
    resumable_run(tmp_path, stop_after=2)
    folder = tmp_path / "checkpoints" / "step_2"
    rng_file = folder / "rng_state_0.safetensors"
    rng_file.write_bytes(rng_file.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"rng_state_0\.safetensors is damaged"):
        resumable_run(tmp_path, resume="latest")
    with pytest.raises(CheckpointError, match="random states in state.bin are damaged"):
        restore_rng_state({"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.zeros(7, dtype=torch.uint8)}, "state.bin")
    old = tmp_path / "old_checkpoint"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match=r"pickle files \['custom_checkpoint_0.pkl'\].*never unpickles"):
        resumable_run(tmp_path, resume=str(old))


def test_latest_skips_incomplete_checkpoints_and_says_so(tmp_path, uninterrupted, caplog):
    resumable_run(tmp_path, stop_after=4)
    root = tmp_path / "checkpoints"
    interrupted = root / "step_6.incomplete"
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"half a file")
    copied_in_part = root / "step_8"
    copied_in_part.mkdir()  # no manifest
    with caplog.at_level(logging.WARNING, logger="calmrl_hf.training"):
        assert latest_checkpoint(str(tmp_path)) == str(root / "step_4")
    assert "['step_6.incomplete', 'step_8']" in caplog.text and "resuming from step_4" in caplog.text
    assert_same_weights(resumable_run(tmp_path, resume="latest"), uninterrupted)
    assert not interrupted.exists()  # the next save cleared the interrupted one


def test_pruning_keeps_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_4.incomplete", "step_6"):
        (root / name).mkdir(parents=True)
    (root / "step_2" / "manifest.json").write_text("{}")
    prune_checkpoints(tmp_path, keep=1)  # step_6 has no manifest: step_2 is the only complete one
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_6"]
    (root / "step_8").mkdir()
    (root / "step_8" / "manifest.json").write_text("{}")
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_6", "step_8"]


def test_resuming_a_different_run_is_refused_with_the_fields_named(tmp_path):
    resumable_run(tmp_path, stop_after=2)
    for change, message in (
        (dict(seed=4), r"training\.seed: checkpoint 3, now 4"),
        (dict(per_device_train_batch_size=4), r"training\.per_device_train_batch_size: checkpoint 8, now 4"),
        (dict(model_overrides={"imputer_method": "none"}), r"model\.imputer_method: checkpoint 'ppca', now 'none'"),
        (dict(dataset_seed=1), r"dataset\.fingerprint: checkpoint '\w+', now '\w+'"),
        (dict(learning_rate=0.0), r"training\.learning_rate: checkpoint 0\.001, now 0\.0.*allow_resume_changes="
                                  r"\['training\.learning_rate'\]"),
    ):
        with pytest.raises(CheckpointError, match=message):
            resumable_run(tmp_path, resume="latest", **change)
    assert resumable_run(tmp_path, resume="latest", model_overrides={"imputer_method": "none"},
                         allow_resume_changes=["model.imputer_method"]) is not None
    saved = {"world_size": 2, "model": {"a": 1}}
    assert manifest_differences(saved, {"world_size": 1, "model": {"a": 1}}) == ["world_size: checkpoint 2, now 1"]
    assert manifest_differences(saved, {"world_size": 1, "model": {"a": 2}}, allowed=["*"]) == []


def test_an_allowed_learning_rate_change_is_applied(tmp_path, uninterrupted):
    """Resumed with learning rate 0 (allowed), the parameters stay those of the checkpoint: the new rate acts."""
    resumable_run(tmp_path / "run", stop_after=2)
    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "step_2" / "model.safetensors"))
    model = resumable_run(tmp_path / "run", resume="latest", learning_rate=0.0,
                          allow_resume_changes=["training.learning_rate"])
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), checkpoint[name]), name
    # at the old rate they move on
    assert not torch.equal(uninterrupted["projections.text.weight"], checkpoint["projections.text.weight"])


def test_resuming_a_finished_run_with_other_settings_only_warns(tmp_path, caplog):
    resumable_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="calmrl_hf.training"):
        resumable_run(tmp_path, resume="latest", model_overrides={"imputer_method": "none"})
    assert "finished run" in caplog.text and "model.imputer_method" in caplog.text


def test_an_unwritable_output_dir_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match=r"output_dir '.*a_file/run' is not writable"):
        resumable_run(tmp_path / "a_file" / "run")


def _kill_points() -> list[int]:
    """Seeded choice of the writes to die in (3 saves of 6 writes): each save's manifest, the commit point (the
    first one leaves nothing complete), and one other write of each save."""
    rng = random.Random(13)
    manifests = [WRITES_PER_SAVE * save for save in (1, 2, 3)]
    return sorted(manifests + [manifest - rng.randint(1, WRITES_PER_SAVE - 1) for manifest in manifests])


KILL_POINTS = _kill_points()


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """One worker process forks a run per kill point (imports paid once); each dies at its write."""
    root = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(HERE / "checkpoint_fault_worker.py"), str(root),
                             *map(str, KILL_POINTS)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_killed_in_a_checkpoint_write_resumes_from_latest_exactly(killed_runs, kill_at, uninterrupted):
    output_dir = killed_runs / f"kill_{kill_at}"
    saves_done = (kill_at - 1) // WRITES_PER_SAVE
    complete, incomplete = find_checkpoints(output_dir)
    assert [step for step, _ in complete] == [2, 4][:saves_done]
    assert [p.name for p in incomplete] == [f"step_{2 * (saves_done + 1)}.incomplete"]
    assert_same_weights(resumable_run(output_dir, resume="latest"), uninterrupted)
    assert not find_checkpoints(output_dir)[1]
