"""The run folder: abandoned checkpoints set aside, manifests and model folders that only name their own files,
stale saves found before training, one run at a time in an output_dir, and runs extended with a larger max_steps."""

import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from training_fixtures import resumable_run, training_config

from calmrl_hf import CalMRLModel
from calmrl_hf.training import latest_checkpoint
from calmrl_hf.training.checkpoints import (
    LOCK_NAME, MANIFEST_FORMAT, MANIFEST_NAME, REQUIRED_FILES, CheckpointError, OutputDirLocked, RunFolderLock,
    file_sha256, prune_checkpoints, read_manifest,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, one_thread):
    """A finished 6-step run keeping all its checkpoints (step_2, step_4, step_6)."""
    folder = tmp_path_factory.mktemp("finished")
    resumable_run(folder, save_total_limit=None)
    return folder


def copy_run(finished_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", target / "checkpoints")
    return target


def digests(folder: Path) -> dict[str, str]:
    return {path.name: file_sha256(path) for path in sorted(folder.iterdir())}


def fail_if_training_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("calmrl_hf.training.loop.run_epochs", refuse)


# ---------------------------------------------------------------------------------------------------- 1. pruning
def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    root = run / "checkpoints"
    before = {name: digests(root / name) for name in ("step_4", "step_6")}
    with caplog.at_level(logging.INFO, logger="calmrl_hf.training"):
        assert resumable_run(run, resume=str(root / "step_2"), stop_after=4, learning_rate=5e-4,
                             allow_resume_changes=["learning_rate"], save_total_limit=1) is None
    # the resumed run's step_4 is kept and is what `latest` resumes
    assert latest_checkpoint(str(run)) == str(root / "step_4")
    new = read_manifest(root / "step_4")
    assert new["run"]["training"]["learning_rate"] == 5e-4 and new["position"]["global_step"] == 4
    # the abandoned run's later checkpoints: set aside byte for byte, named in a log line
    aside = list((root / "abandoned").iterdir())
    assert len(aside) == 1 and {name: digests(aside[0] / name) for name in ("step_4", "step_6")} == before
    assert "['step_4', 'step_6']" in caplog.text and "abandoned" in caplog.text
    # pruning (save_total_limit=1) removed step_2, of this run's line, and nothing else
    assert sorted(p.name for p in root.iterdir()) == ["abandoned", "step_4"]


def test_pruning_counts_only_the_saving_runs_line(tmp_path):
    root = tmp_path / "checkpoints"
    owners = {"step_2": "A", "step_4": "A", "step_6": "other", "step_8": "B", "step_10": None}
    for name, run_id in owners.items():
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps({} if run_id is None else {"run_id": run_id}))
    line = [{"run_id": "A", "until_step": 2}, {"run_id": "B", "until_step": None}]
    deleted = prune_checkpoints(tmp_path, keep=1, line=line)
    # A's step_4 is past where B resumed (not B's line); another run's and an unmarked one are never touched
    assert [p.name for p in deleted] == ["step_2"]
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_4", "step_6", "step_8"]


# ---------------------------------------------------------------------------------------------------- 2. manifests
def rewrite_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


@pytest.mark.parametrize("name", ["../../outside.txt", "/etc/hostname", "..", "sub/model.safetensors"])
def test_manifest_names_outside_the_folder_are_refused_unopened(finished_run, tmp_path, monkeypatch, name):
    folder = copy_run(finished_run, tmp_path) / "checkpoints" / "step_2"
    rewrite_manifest(folder, lambda m: {**m, "files": {**m["files"], name: "0" * 64}})
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(CheckpointError, match="not a plain file name"):
        read_manifest(folder)
    assert not any("outside" in path or path == "/etc/hostname" for path in opened)


def test_a_symlinked_file_leading_out_of_the_checkpoint_is_refused(finished_run, tmp_path):
    folder = copy_run(finished_run, tmp_path) / "checkpoints" / "step_2"
    outside = tmp_path / "scheduler.safetensors"
    (folder / "scheduler.safetensors").rename(outside)
    (folder / "scheduler.safetensors").symlink_to(outside)  # same bytes, same checksum
    with pytest.raises(CheckpointError, match="symlink .* outside the checkpoint folder"):
        read_manifest(folder)


def test_every_file_resuming_reads_must_be_listed(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    folder = run / "checkpoints" / "step_2"
    shutil.copyfile(run / "checkpoints" / "step_4" / "model.safetensors", folder / "model.safetensors")
    rewrite_manifest(folder, lambda m: {**m, "files": {}})  # another step's weights, the list emptied
    with pytest.raises(CheckpointError, match=r"does not list \['model.safetensors'"):
        resumable_run(run, resume=str(folder))
    folder = run / "checkpoints" / "step_4"
    rewrite_manifest(folder, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if "rng" not in k}})
    with pytest.raises(CheckpointError, match=r"does not list rng_state_0\.safetensors"):
        resumable_run(run, resume=str(folder))


@pytest.mark.parametrize("change, problem", [
    (lambda m: [m], "JSON list, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, "'files' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "position"}, "'position' is missing"),
    (lambda m: {**m, "position": {**m["position"], "epoch": "1"}}, r"'position\.epoch' is '1'"),
    (lambda m: {**m, "files": ["model.safetensors"]}, "'files' is a list"),
    (lambda m: {**m, "files": {**m["files"], "model.safetensors": 7}}, "not 64 hex digits"),
    (lambda m: {k: v for k, v in m.items() if k != "run"}, "'run'"),
])
def test_malformed_manifests_are_checkpoint_errors_naming_the_problem(finished_run, tmp_path, change, problem):
    folder = copy_run(finished_run, tmp_path) / "checkpoints" / "step_2"
    rewrite_manifest(folder, change)
    with pytest.raises(CheckpointError, match=problem):
        read_manifest(folder)


# ---------------------------------------------------------------------------------------------------- 3. model folders
@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "model"
    torch.manual_seed(0)
    CalMRLModel(training_config()).save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_a_shard_index_leading_out_of_the_model_folder_is_refused(sharded_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sharded_model, folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (folder / shard).rename(tmp_path / "outside.safetensors")
    index["weight_map"] = {k: "../outside.safetensors" if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"maps weights to '\.\./outside\.safetensors', outside the model folder"):
        CalMRLModel.from_pretrained(folder)


def test_a_shard_symlinked_out_of_the_model_folder_is_refused(sharded_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sharded_model, folder)
    shard = folder / sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())
                                ["weight_map"].values()))[0]
    shard.rename(tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match=rf"{shard.name} is a symlink to .*elsewhere.safetensors, outside"):
        CalMRLModel.from_pretrained(folder)


def test_a_hub_cache_snapshot_linking_into_its_blobs_loads(sharded_model, tmp_path):
    """snapshot_download's layout: the snapshot's files are symlinks into the same repo's blobs folder."""
    repo = tmp_path / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in sharded_model.iterdir():
        blob = blobs / file_sha256(path)
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    loaded = CalMRLModel.from_pretrained(snapshot)
    assert torch.equal(loaded.logit_scale, CalMRLModel.from_pretrained(sharded_model).logit_scale)


# ---------------------------------------------------------------------------------------------------- 4. stale saves
def test_stale_incomplete_saves_are_cleared_before_training_never_following_links(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    root = run / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    (root / "step_8.incomplete").write_text("a file")
    (root / "step_10.incomplete").symlink_to(elsewhere, target_is_directory=True)
    (root / "step_12.incomplete").mkdir()
    with caplog.at_level(logging.WARNING, logger="calmrl_hf.training"):
        assert resumable_run(run, resume="latest", max_steps=8) is not None
    assert "['step_10.incomplete', 'step_12.incomplete', 'step_8.incomplete']" in caplog.text
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert not [p for p in root.iterdir() if p.name.endswith(".incomplete") or p.is_symlink()]
    assert latest_checkpoint(str(run)) == str(root / "step_8")


def test_a_checkpoints_file_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    fail_if_training_starts(monkeypatch)
    with pytest.raises(CheckpointError, match=r"checkpoints is a file, not a folder"):
        resumable_run(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------- 5. the lock
def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_run_on_a_held_output_dir_fails_before_training_naming_the_holder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier", "token": "theirs"}
    (run / LOCK_NAME).write_text(json.dumps(holder))
    fail_if_training_starts(monkeypatch)
    with pytest.raises(OutputDirLocked, match=rf"pid {os.getppid()} on host '{socket.gethostname()}'"):
        resumable_run(run)
    assert json.loads((run / LOCK_NAME).read_text()) == holder  # still theirs
    assert not (run / "checkpoints").exists()


def test_a_dead_runs_lock_is_taken_over_and_every_run_releases_its_own(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "token": "dead"}))
    with caplog.at_level(logging.WARNING, logger="calmrl_hf.training"):
        assert resumable_run(run, stop_after=2) is None  # stopped by an exception: the lock goes all the same
    assert "Took over the stale lock" in caplog.text
    assert not (run / LOCK_NAME).exists()
    lock = RunFolderLock.acquire(run)  # held by this live process: a second taker is refused
    with pytest.raises(OutputDirLocked, match=rf"pid {os.getpid()}"):
        RunFolderLock.acquire(run)
    lock.release()
    assert not (run / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------- 6. extending
def test_a_larger_max_steps_extends_the_run_and_a_smaller_one_is_refused(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    root = run / "checkpoints"
    with pytest.raises(CheckpointError, match=r"training\.max_steps: checkpoint 6, now 4"):
        resumable_run(run, resume=str(root / "step_2"), max_steps=4)
    with pytest.raises(CheckpointError, match=r"training\.seed: checkpoint 3, now 4"):  # other drift: refused
        resumable_run(run, resume="latest", max_steps=8, seed=4)
    with caplog.at_level(logging.INFO, logger="calmrl_hf.training"):
        assert resumable_run(run, resume="latest", max_steps=8) is not None
    assert "max_steps 6 -> 8" in caplog.text
    assert latest_checkpoint(str(run)) == str(root / "step_8")
    assert read_manifest(root / "step_8")["run"]["training"]["max_steps"] == 8
    assert load_file(str(root / "step_6" / "model.safetensors")).keys() == \
        load_file(str(root / "step_8" / "model.safetensors")).keys()


# ---------------------------------------------------------------------------- manifests, property-based

_NAMES = st.one_of(st.sampled_from([*REQUIRED_FILES, "rng_state_0.safetensors", "teacher.safetensors", "../../x",
                                    "/etc/hostname", "a/b", "..", ".", "", "x\0y", MANIFEST_NAME]),
                   st.text(min_size=0, max_size=12))
READ_MANIFESTS: list = []  # the manifests the property test accepted (the accepting branch must be reached)
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 6), st.floats(allow_nan=False),
                       st.text(max_size=8))


_COUNTS = st.integers(0, 10 ** 6)
_VALID_POSITION = st.fixed_dictionaries({"global_step": _COUNTS, "epoch": _COUNTS, "batches_in_epoch": _COUNTS})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(required=st.booleans(), names=st.lists(_NAMES, max_size=6, unique=True), position=st.one_of(
           _VALID_POSITION, _VALID_POSITION,
           st.fixed_dictionaries({"global_step": _JSON_LEAF, "epoch": _JSON_LEAF, "batches_in_epoch": _JSON_LEAF}),
           _JSON_LEAF, st.lists(_JSON_LEAF, max_size=3)),
       damaged=st.booleans(), run=st.one_of(st.just({"training": {}}), st.just({"training": {}}), _JSON_LEAF),
       drop=st.sampled_from([None, None, None, "format", "files", "position", "run"]))
def test_a_manifest_resumes_only_when_it_is_whole_plain_and_verified(tmp_path_factory, required, names, position,
                                                                        damaged, run, drop):
    """Whatever a manifest holds, `read_manifest` either returns one whose files are plain names of the folder, the
    required ones among them, each matching its SHA-256, with a position of non-negative integers; or raises a
    CheckpointError. It never opens a path outside the folder, and never raises anything else."""
    folder = tmp_path_factory.mktemp("checkpoint")
    files = {}
    names = [*REQUIRED_FILES, *(n for n in names if n not in REQUIRED_FILES)] if required else names
    for name in names:
        plain = name and name not in (".", "..", MANIFEST_NAME) and "/" not in name and "\0" not in name
        if plain:
            (folder / name).write_bytes(name.encode("utf-8", "replace"))
            files[name] = file_sha256(folder / name)
        else:
            files[name] = "0" * 64
    if damaged and files:
        files[next(iter(files))] = "f" * 64
    manifest = {"format": MANIFEST_FORMAT, "files": files, "position": position, "run": run}
    if drop is not None:
        manifest.pop(drop)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    try:
        read = read_manifest(folder)
    except CheckpointError:
        return
    READ_MANIFESTS.append(read)
    assert set(REQUIRED_FILES) <= set(read["files"])
    for name, digest in read["files"].items():
        assert os.path.dirname(name) == "" and (folder / name).is_file() and file_sha256(folder / name) == digest
    assert all(isinstance(read["position"][key], int) and not isinstance(read["position"][key], bool)
               and read["position"][key] >= 0 for key in ("global_step", "epoch", "batches_in_epoch"))


def test_the_manifest_property_reaches_both_outcomes(tmp_path_factory):
    """The property test above accepts some of the manifests it draws (whole, plain, verified), not none."""
    READ_MANIFESTS.clear()
    test_a_manifest_resumes_only_when_it_is_whole_plain_and_verified(tmp_path_factory)
    assert READ_MANIFESTS
