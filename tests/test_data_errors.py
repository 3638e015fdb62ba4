"""Data, retrieval, loading and CLI errors: media paths stay inside their media root, a truncated WAV is refused,
retrieval refuses non-finite vectors / ragged or non-embedding columns / k < 1, a folder that is not a saved model
is refused, and the command line reports bad options as one line."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media_fixtures import write_video, write_wav

from calmrl_hf.data import (
    MediaDecodingError,
    MediaPathError,
    decode_audio,
    load_annotations,
    load_audiocaps,
    load_msrvtt,
    load_vast,
    with_media_decoding,
)
from calmrl_hf.evaluation.retrieval import EmbeddingIndex
from cli_output import one_error_line  # noqa: E402


PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture()
def media(tmp_path):
    """A media root with one tone and one video, a secret file next to it, and a symlink inside pointing at it."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    write_wav(root / "ok.wav")
    write_video(root / "ok.mp4", num_frames=2)
    secret = tmp_path / "secret.wav"
    write_wav(secret)
    (root / "evil.wav").symlink_to(secret)
    (root / "evil.mp4").symlink_to(secret)
    (root / "fine.wav").symlink_to(root / "ok.wav")  # a symlink inside the root, to a file inside it: fine
    return {"root": root, "secret": secret, "tmp": tmp_path}


def inside(path, root) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


# ------------------------------------------------------------------------------------------------ confinement
@pytest.mark.parametrize("name", ["../../../../etc/passwd", "../secret.wav", "sub/../../secret.wav", "/etc/passwd",
                                  "evil.wav", "sub/../evil.wav"])
def test_load_annotations_refuses_media_paths_leaving_the_root(media, name):
    annotations = media["tmp"] / "a.json"
    annotations.write_text(json.dumps([{"id": "good", "audio": "ok.wav", "text": "x"},
                                       {"id": "bad", "audio": name, "text": "y"}]))
    with pytest.raises(MediaPathError, match=r"row 1 \(id 'bad'\), audio: the media path " + re.escape(repr(name))) \
            as raised:
        load_annotations(annotations, media_roots={"audio": media["root"]})
    assert isinstance(raised.value, ValueError)  # a loader's input error
    streamed = load_annotations(annotations, media_roots={"audio": media["root"]}, streaming=True)
    with pytest.raises(MediaPathError, match=r"id 'bad'"):
        list(streamed)


def test_load_annotations_keeps_paths_that_stay_inside(media):
    annotations = media["tmp"] / "a.json"
    annotations.write_text(json.dumps([{"id": i, "audio": name} for i, name in
                                       enumerate(["ok.wav", "sub/../ok.wav", "fine.wav", "./ok.wav"])]))
    ds = load_annotations(annotations, media_roots={"audio": media["root"]})
    assert len(ds) == 4 and all(inside(path, media["root"]) for path in ds["audio"])
    decoded = with_media_decoding(ds, media_roots={"audio": media["root"]})
    assert all(decoded[i]["audio"].size for i in range(4))


def test_load_annotations_without_a_root_confines_to_the_annotation_folder(media):
    folder = media["tmp"] / "annotations"
    folder.mkdir()
    annotations = folder / "a.json"
    annotations.write_text(json.dumps([{"id": "x", "audio": "../secret.wav"}]))
    with pytest.raises(MediaPathError, match=r"id 'x'.*'\.\./secret\.wav'.*outside the media root"):
        load_annotations(annotations)
    annotations.write_text(json.dumps([{"id": "x", "audio": str(media["secret"])}]))  # absolute, no root: kept
    assert load_annotations(annotations)["audio"] == [str(media["secret"])]
    annotations.write_text(json.dumps([{"id": "x", "audio": str(media["secret"])}]))  # absolute under a root: refused
    with pytest.raises(MediaPathError, match=r"id 'x'.*is absolute"):
        load_annotations(annotations, media_roots={"audio": media["root"]})


def test_corpus_loaders_refuse_symlinks_out_of_their_media_folder(media):
    vast = media["tmp"] / "vast.json"
    vast.write_text(json.dumps([{"clip_id": "ok", "vast_cap": "a"}, {"clip_id": "evil", "vast_cap": "b"}]))
    with pytest.raises(MediaPathError, match=r"row 1 \(id 'evil'\).*'evil\.mp4'.*symlink"):
        load_vast(vast, video_dir=media["root"])
    with pytest.raises(MediaPathError, match=r"row 1 \(id 'evil'\).*'evil\.wav'.*symlink"):
        load_vast(vast, audio_dir=media["root"])
    msrvtt = media["tmp"] / "msrvtt.json"
    msrvtt.write_text(json.dumps({"sentences": [{"video_id": "ok", "caption": "a"},
                                                {"video_id": "evil", "caption": "b"}]}))
    with pytest.raises(MediaPathError, match=r"row 1 \(id 'evil'\)"):
        load_msrvtt(msrvtt, media["root"])
    with pytest.raises(MediaPathError, match=r"row 1 \(id 'evil'\)"):
        load_msrvtt(msrvtt, media["root"], audio_dir=media["root"], require_video=False)
    official = media["tmp"] / "audiocaps.csv"
    official.write_text("audiocap_id,youtube_id,start_time,caption\n1,ok,,fine\n2,evil,,bad\n")
    with pytest.raises(MediaPathError, match=r"row 1 \(id '2'\).*evil\.wav"):
        load_audiocaps(official, media["root"])
    vast_json = media["tmp"] / "audiocaps.json"
    vast_json.write_text(json.dumps([{"video_id": "evil", "caption": "x"}]))
    with pytest.raises(MediaPathError, match=r"row 0 \(id 'evil'\)"):
        load_audiocaps(vast_json, media["root"])
    # a symlink to a file inside the folder loads
    vast.write_text(json.dumps([{"clip_id": "fine", "vast_cap": "a"}]))
    assert load_vast(vast, audio_dir=media["root"])["audio"] == [str(media["root"] / "fine.wav")]


def test_skipping_bad_paths_marks_the_modality_missing_and_names_it(media, caplog):
    vast = media["tmp"] / "vast.json"
    vast.write_text(json.dumps([{"clip_id": "ok", "vast_cap": "a"}, {"clip_id": "evil", "vast_cap": "b"}]))
    ds = load_vast(vast, media["root"], media["root"], on_bad_path="skip")
    assert ds["vision"] == [str(media["root"] / "ok.mp4"), None]
    assert ds["audio"] == [str(media["root"] / "ok.wav"), None]
    assert ds["modality_mask"][1] == [False, False, True, False]
    assert "id 'evil'" in caplog.text and "outside the media root" in caplog.text
    msrvtt = media["tmp"] / "msrvtt.json"
    msrvtt.write_text(json.dumps([{"video_id": "ok", "caption": "a"}, {"video_id": "evil", "caption": "b"}]))
    assert load_msrvtt(msrvtt, media["root"], on_bad_path="skip")["id"] == ["ok"]  # no video: dropped, counted
    official = media["tmp"] / "audiocaps.csv"
    official.write_text("audiocap_id,youtube_id,start_time,caption\n1,ok,,fine\n2,evil,,bad\n")
    assert load_audiocaps(official, media["root"], on_bad_path="skip")["id"] == ["1"]
    annotations = media["tmp"] / "a.json"
    annotations.write_text(json.dumps([{"id": "a", "audio": "../secret.wav", "text": "x"},
                                       {"id": "b", "audio": "/etc/passwd", "text": "y"}]))
    for streaming in (False, True):
        rows = list(load_annotations(annotations, media_roots={"audio": media["root"]}, on_bad_path="skip",
                                     streaming=streaming))
        assert [r["audio"] for r in rows] == [None, None] and [r["text"] for r in rows] == ["x", "y"]
    with pytest.raises(ValueError, match="on_bad_path must be 'raise' or 'skip'"):
        load_vast(vast, media["root"], on_bad_path="ignore")


def test_the_command_line_counts_a_symlink_out_as_bad_media_with_skip_bad_media(media, capsys):
    import calmrl_hf.cli as cli

    vast = media["tmp"] / "vast.json"
    vast.write_text(json.dumps([{"clip_id": "ok", "vast_cap": "a"}, {"clip_id": "evil", "vast_cap": "b"}]))
    command = ["evaluate", "model", "--annotations", str(vast), "--audio_dir", str(media["root"])]
    with pytest.raises(MediaPathError, match=r"id 'evil'"):
        cli._load_dataset(cli.parse_arguments(command), FakeProcessor())
    assert "pass --skip_bad_media" in cli.error_message(MediaPathError("x"), "evaluate")
    dataset = cli._load_dataset(cli.parse_arguments(command + ["--skip_bad_media"]), FakeProcessor())
    assert dataset[1]["audio"] is None and dataset[0]["audio"].size


def test_corpus_loader_ids_never_become_paths(media):
    vast = media["tmp"] / "vast.json"
    ids = ["../secret", "../../../../etc/passwd", "/etc/passwd", "sub/../ok", "..", "."]
    vast.write_text(json.dumps([{"clip_id": clip, "vast_cap": "x"} for clip in ids]))
    ds = load_vast(vast, media["root"], media["root"])
    assert ds["vision"] == [None] * len(ids) and ds["audio"] == [None] * len(ids)


def test_media_decoding_confines_paths_to_the_media_roots(media):
    outside = str(media["secret"])
    ds = Dataset.from_dict({"id": ["a", "b", "c"], "audio": [str(media["root"] / "ok.wav"), outside,
                                                             str(media["root"] / "evil.wav")],
                            "text": ["x", "y", "z"], "modality_mask": [[True, True]] * 3})
    decoded = with_media_decoding(ds, media_roots={"audio": media["root"]})
    assert decoded[0]["audio"].size
    for row, example in ((1, "b"), (2, "c")):
        with pytest.raises(MediaPathError, match=rf"example '{example}'.*outside the media root"):
            decoded[row]
    skipping = with_media_decoding(ds, media_roots={"audio": media["root"]}, on_error="skip")
    rows = [skipping[i] for i in range(3)]
    assert [r["audio"] is None for r in rows] == [False, True, True]
    assert [r["modality_mask"] for r in rows] == [[True, True], [False, True], [False, True]]
    assert skipping.media_decoder.failures.counts == {"audio": 2, "text": 0}
    with pytest.raises(ValueError, match=r"media_roots names \['vision'\]"):
        with_media_decoding(ds, media_roots={"vision": media["root"]})


def test_a_file_swapped_for_a_symlink_after_loading_is_refused_when_decoded(media):
    vast = media["tmp"] / "vast.json"
    vast.write_text(json.dumps([{"clip_id": "late", "vast_cap": "a"}]))
    write_wav(media["root"] / "late.wav")
    ds = load_vast(vast, audio_dir=media["root"])
    (media["root"] / "late.wav").unlink()
    (media["root"] / "late.wav").symlink_to(media["secret"])
    with pytest.raises(MediaPathError, match=r"example 'late'.*symlink"):
        with_media_decoding(ds, media_roots={"audio": media["root"]})[0]


path_names = st.one_of(
    st.sampled_from(["ok.wav", "fine.wav", "evil.wav", "../secret.wav", "../../../../etc/passwd", "/etc/passwd",
                     "sub/../ok.wav", "sub/../../secret.wav", "", " ", "..", ".", "sub", "./ok.wav", "ok.wav/..",
                     "é/../ok.wav", "日本.wav", "a\\..\\b.wav"]),
    st.lists(st.sampled_from(["..", ".", "sub", "ok.wav", "é", "/", ""]), min_size=1, max_size=5).map("/".join),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)
rows = st.lists(st.fixed_dictionaries({"id": st.one_of(st.none(), st.text(max_size=6)), "audio": path_names,
                                       "text": st.one_of(st.none(), st.text(max_size=8))}), min_size=1, max_size=5)


@PROPERTY
@given(rows=rows, with_root=st.booleans())
def test_property_load_annotations_paths_stay_inside_or_the_row_is_named(media, rows, with_root):
    annotations = media["tmp"] / "property.json"
    annotations.write_text(json.dumps(rows))
    root = media["root"] if with_root else media["tmp"]
    try:
        ds = load_annotations(annotations, media_roots={"audio": media["root"]} if with_root else None)
    except MediaPathError as error:
        number = int(str(error).split(", row ")[1].split(" ")[0])
        assert str(annotations) in str(error) and repr(rows[number]["audio"].strip()) in str(error)
        return
    for path in ds["audio"]:
        if path is not None and (with_root or not os.path.isabs(path)):
            assert inside(path, root), path


clip_ids = st.one_of(st.sampled_from(["ok", "evil", "fine", "../secret", "../../../../etc/passwd", "/etc/passwd",
                                      "sub/../ok", "..", "", "日本"]),
                     st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8))


@PROPERTY
@given(clips=st.lists(clip_ids, min_size=1, max_size=5), loader=st.sampled_from(["vast", "msrvtt", "audiocaps"]))
def test_property_corpus_loaders_paths_stay_inside_or_the_row_is_named(media, clips, loader):
    annotations = media["tmp"] / f"{loader}.json"
    key = "clip_id" if loader == "vast" else "video_id"
    annotations.write_text(json.dumps([{key: clip, "vast_cap": "c", "caption": "c"} for clip in clips]))
    root = media["root"]
    try:
        if loader == "vast":
            ds = load_vast(annotations, root, root)
        elif loader == "msrvtt":
            ds = load_msrvtt(annotations, root, root, require_video=False)
        else:
            ds = load_audiocaps(annotations, root, require_audio=False)
    except MediaPathError as error:
        number = int(str(error).split(", row ")[1].split(" ")[0])
        assert "evil" in clips[number] and "evil" in str(error) and "outside the media root" in str(error)
        return
    except ValueError as error:  # an empty id
        assert "no clip_id" in str(error) or "no video_id" in str(error) or "neither" in str(error), error
        assert any(not clip.strip() for clip in clips)
        return
    assert "evil" not in [c.strip() for c in clips]  # the symlink out of the folder would have been refused
    for column in ("vision", "audio"):
        assert all(path is None or inside(path, root) for path in ds[column])


# ------------------------------------------------------------------------------------------------ truncated audio
def _write(path: Path, kind: str) -> Path:
    import soundfile

    tone = (0.5 * np.sin(np.arange(4000) / 5)).astype(np.float32)
    if kind == "stereo":
        soundfile.write(str(path), np.stack([tone, tone], axis=1), 16000)
    elif kind == "list_chunk":  # a LIST chunk before the samples
        soundfile.write(str(path), tone, 16000)
        data = path.read_bytes()
        info = b"LIST" + (10).to_bytes(4, "little") + b"INFOabcdef"
        index = data.index(b"data")
        body = data[12:index] + info + data[index:]
        path.write_bytes(b"RIFF" + (len(body) + 4).to_bytes(4, "little") + b"WAVE" + body)
    elif kind == "aiff":
        soundfile.write(str(path), tone, 16000, format="AIFF")
    else:
        soundfile.write(str(path), tone, 16000, subtype=kind)
    return path


@pytest.mark.parametrize("kind", ["PCM_16", "PCM_24", "FLOAT", "stereo", "list_chunk", "aiff"])
@pytest.mark.parametrize("keep", [0.25, 0.9])
def test_a_truncated_wav_is_refused_naming_the_file(tmp_path, kind, keep):
    whole = _write(tmp_path / f"whole_{kind}.wav", kind)
    assert decode_audio(whole, 16000).shape == (4000,)
    data = whole.read_bytes()
    cut = tmp_path / f"cut_{kind}.wav"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MediaDecodingError, match=rf"cut_{kind}\.wav is truncated"):
        decode_audio(cut, 16000)
    cut.write_bytes(data[:30])  # cut inside the header: no sample chunk at all
    with pytest.raises(MediaDecodingError, match=rf"cut_{kind}\.wav is truncated or damaged: no"):
        decode_audio(cut, 16000)


def test_a_truncated_wav_counts_as_bad_media_when_skipping(tmp_path):
    whole = write_wav(tmp_path / "whole.wav", seconds=1.0)
    (tmp_path / "cut.wav").write_bytes(whole.read_bytes()[:8044])
    ds = Dataset.from_dict({"id": ["whole", "cut"], "audio": [str(whole), str(tmp_path / "cut.wav")],
                            "modality_mask": [[True], [True]]})
    with pytest.raises(MediaDecodingError, match=r"cut\.wav is truncated.*example 'cut'"):
        with_media_decoding(ds)[1]
    skipping = with_media_decoding(ds, on_error="skip")
    assert skipping[0]["audio"].size == 16000 and skipping[1]["audio"] is None
    assert skipping.media_decoder.failures.counts == {"audio": 1}


def test_streamed_wav_with_an_unknown_length_still_decodes(tmp_path):
    whole = write_wav(tmp_path / "whole.wav")
    data = bytearray(whole.read_bytes())
    index = data.index(b"data")
    data[index + 4: index + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # a streaming writer's "length unknown"
    (tmp_path / "stream.wav").write_bytes(bytes(data))
    assert decode_audio(tmp_path / "stream.wav", 16000).size > 0


# ------------------------------------------------------------------------------------------------ retrieval
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_embedding_index_refuses_non_finite_vectors(bad):
    gallery = torch.randn(4, 3)
    index = EmbeddingIndex(gallery)
    queries = torch.randn(3, 3)
    queries[2, 1] = bad
    with pytest.raises(ValueError, match=r"queries: 1 of 3 rows hold NaN or inf \(rows \[2\]\)"):
        index.search(queries, k=2)
    gallery[1, 0] = bad
    with pytest.raises(ValueError, match=r"gallery embeddings: 1 of 4 rows hold NaN or inf \(rows \[1\]\)"):
        EmbeddingIndex(gallery)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3"])
def test_retrieval_refuses_a_k_that_is_not_a_positive_int(k):
    with pytest.raises(ValueError, match=r"k \(results per query\) must be a positive int"):
        EmbeddingIndex(torch.randn(4, 3)).search(torch.randn(1, 3), k=k)


@pytest.fixture()
def faiss_gallery():
    pytest.importorskip("faiss", reason="retrieval at scale needs faiss-cpu")
    from calmrl_hf.evaluation.faiss_index import embedding_dataset

    embeddings, mask = torch.randn(5, 2, 4), torch.ones(5, 2, dtype=torch.bool)
    mask[1, 0] = False
    return embedding_dataset([f"c{i}" for i in range(5)], embeddings, mask, ["vision", "text"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_faiss_index_refuses_non_finite_queries_and_rows(faiss_gallery, bad):
    from calmrl_hf.evaluation.faiss_index import FaissIndex

    index = FaissIndex(faiss_gallery, "vision")
    queries = torch.randn(2, 4)
    queries[1, 3] = bad
    with pytest.raises(ValueError, match=r"queries: 1 of 2 rows hold NaN or inf \(rows \[1\]\)"):
        index.search(queries, k=2)
    rows = faiss_gallery.to_dict()
    rows["vision"][3] = [bad, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"'vision' \(gallery\): 1 of 4 rows.*'dataset row 3'"):
        FaissIndex(Dataset.from_dict(rows), "vision")


@pytest.mark.parametrize("k", [0, -1, 2.0])
def test_faiss_index_refuses_a_k_that_is_not_a_positive_int(faiss_gallery, k):
    from calmrl_hf.evaluation.faiss_index import FaissIndex

    with pytest.raises(ValueError, match=r"k \(results per query\) must be a positive int"):
        FaissIndex(faiss_gallery, "vision").search(torch.randn(1, 4), k=k)


def test_faiss_index_refuses_ragged_and_non_embedding_columns(faiss_gallery):
    from calmrl_hf.evaluation.faiss_index import FaissIndex

    rows = faiss_gallery.to_dict()
    rows["vision"][4] = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"'vision' is ragged: dataset row 4 has 3 values, row 0 has 4"):
        FaissIndex(Dataset.from_dict(rows), "vision")
    rows["vision"][4] = [1.0, None, 3.0, 4.0]
    with pytest.raises(ValueError, match=r"None inside an embedding"):
        FaissIndex(Dataset.from_dict(rows), "vision")
    with pytest.raises(ValueError, match=r"The column 'id' is not an embedding column: it holds string"):
        FaissIndex(faiss_gallery, "id")
    with pytest.raises(ValueError, match=r"The column 'modality_mask' is not an embedding column: it holds list<"
                                         r"item: bool>"):
        FaissIndex(faiss_gallery, "modality_mask")
    labelled = faiss_gallery.add_column("label", list(range(5)))
    with pytest.raises(ValueError, match=r"The column 'label' is not an embedding column: it holds int64"):
        FaissIndex(labelled, "label")


# ------------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from tiny_models import tiny_config

    from calmrl_hf import CalMRLModel

    folder = tmp_path_factory.mktemp("model")
    CalMRLModel(tiny_config()).save_pretrained(folder)
    return folder


def _copy(folder: Path, target: Path, skip=()) -> Path:
    import shutil

    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*skip))
    return target


def test_a_folder_without_config_json_is_not_a_saved_model(saved_model, tmp_path):
    from calmrl_hf import CalMRLModel

    for folder in (_copy(saved_model, tmp_path / "no_config", ["config.json"]), tmp_path):
        with pytest.raises(ValueError, match=rf"no config.json in {folder}: not a saved CalMRL model"):
            CalMRLModel.from_pretrained(folder)


@pytest.mark.parametrize("drop", [["logit_scale"], ["imputer.mean"], ["logit_scale", "imputer.noise_var"]])
@pytest.mark.parametrize("sharded", [False, True])
def test_a_checkpoint_missing_tensors_names_them(saved_model, tmp_path, drop, sharded):
    from safetensors.torch import load_file, save_file

    from calmrl_hf import CalMRLModel

    folder = tmp_path / "model"
    if sharded:
        CalMRLModel.from_pretrained(saved_model).save_pretrained(folder, max_shard_size="20KB")
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        files = {weight_map[key] for key in drop}
    else:
        _copy(saved_model, folder)
        files = {"model.safetensors"}
    for name in files:
        tensors = load_file(str(folder / name))
        save_file({k: v for k, v in tensors.items() if k not in drop}, str(folder / name), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys: " + repr(sorted(drop)).replace("[", r"\[")
                                                                               .replace("]", r"\]")):
        CalMRLModel.from_pretrained(folder)


def test_a_missing_shard_is_named_with_its_tensors(saved_model, tmp_path):
    from calmrl_hf import CalMRLModel

    folder = tmp_path / "model"
    CalMRLModel.from_pretrained(saved_model).save_pretrained(folder, max_shard_size="20KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    (folder / weight_map["logit_scale"]).unlink()
    with pytest.raises(ValueError, match=rf"weight files that are missing: {weight_map['logit_scale']} "
                                         rf"\(tensors \[.*'logit_scale'"):
        CalMRLModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("value", ["0", "-3", "x", "1.5"])
@pytest.mark.parametrize("command", ["evaluate", "embed"])
def test_batch_size_must_be_a_positive_int(capsys, value, command):
    from calmrl_hf.cli import parse_arguments

    extra = ["--output", "e.parquet"] if command == "embed" else []
    with pytest.raises(SystemExit) as exited:
        parse_arguments([command, "model", "--annotations", "a.json", "--batch_size", value, *extra])
    assert exited.value.code == 2
    assert "argument --batch_size:" in capsys.readouterr().err
    assert parse_arguments([command, "model", "--annotations", "a.json", "--batch_size", "1", *extra]).batch_size == 1


@pytest.mark.parametrize("item, parent", [("seed.x=1", "seed"), ("stage1.max_steps.y=2", "stage1.max_steps"),
                                          ("output_dir.z=3", "output_dir"), ("a..b=1", None), (".x=1", None)])
def test_set_into_a_value_that_is_not_a_section_names_the_key(capsys, tmp_path, item, parent):
    from calmrl_hf.cli import main
    from calmrl_hf.recipe.run import DEFAULT_CONFIG, RecipeError, load_recipe

    key = item.partition("=")[0]
    match = rf"'{parent}' is a .*not a section: the key '{key}'" if parent else rf"the key '{key}' has an empty part"
    with pytest.raises(RecipeError, match=match):
        load_recipe(argparse.Namespace(config=DEFAULT_CONFIG, set=["stage1.max_steps=5", item], output_dir=None))
    assert main(["train", "--output_dir", str(tmp_path / "run"), "--set", item]) == 2
    assert key in one_error_line(capsys, "train")


def test_a_model_folder_without_a_processor_is_a_one_line_error(saved_model, tmp_path, capsys):
    from calmrl_hf.cli import main

    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps([{"clip_id": "a", "vast_cap": "x"}]))
    for command, extra in (("evaluate", []), ("embed", ["--output", str(tmp_path / "e.parquet")])):
        assert main([command, str(saved_model), "--annotations", str(annotations), *extra]) == 2
        line = one_error_line(capsys, command)
        assert f"{saved_model} holds no processor" in line and "OSError" not in line


def test_missing_media_folders_are_announced_or_required(capsys):
    from calmrl_hf.cli import CommandError, _media_notices

    def args(fmt, video=None, audio=None):
        return argparse.Namespace(format=fmt, video_dir=video, audio_dir=audio, command="evaluate")

    everything = ["vision", "audio", "text", "subtitle"]
    assert _media_notices(args("vast"), everything) == [
        "no --video_dir: the vision modality is skipped (missing in every example).",
        "no --audio_dir: the audio modality is skipped (missing in every example)."]
    assert _media_notices(args("vast", video="v"), everything) == [
        "no --audio_dir: the audio modality is skipped (missing in every example)."]
    assert _media_notices(args("vast", video="v", audio="a"), everything) == []
    assert _media_notices(args("vast"), ["text", "subtitle"]) == []  # a model without vision / audio: nothing skipped
    assert _media_notices(args("msrvtt", video="v"), everything) == [
        "no --audio_dir: the audio modality is skipped (missing in every example)."]
    with pytest.raises(CommandError, match="--format msrvtt needs --video_dir"):
        _media_notices(args("msrvtt", audio="a"), everything)
    with pytest.raises(CommandError, match="--format audiocaps needs --audio_dir"):
        _media_notices(args("audiocaps", video="v"), everything)
    assert _media_notices(args("audiocaps", audio="a"), everything) == []


class FakeProcessor:
    """What `cli._load_dataset` reads of a processor."""

    modality_names = ["vision", "audio", "text", "subtitle"]
    num_frames = 2

    class feature_extractor:  # noqa: N801
        sampling_rate = 16000


def test_the_notice_is_printed_before_evaluating(monkeypatch, tmp_path, capsys):
    import calmrl_hf.cli as cli

    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps([{"clip_id": "a", "vast_cap": "x"}]))

    args = cli.parse_arguments(["evaluate", "model", "--annotations", str(annotations)])
    dataset = cli._load_dataset(args, FakeProcessor())
    assert len(dataset) == 1
    err = capsys.readouterr().err
    assert "calmrl evaluate: notice: no --video_dir: the vision modality is skipped" in err
    assert "calmrl evaluate: notice: no --audio_dir: the audio modality is skipped" in err


def test_an_uncached_tower_repo_offline_is_named(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "calmrl_hf.cli", "train", "--output_dir", str(tmp_path / "run"),
                             "--set", "model.towers.text=nobody/no-such-tower"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr[result.stderr.index("calmrl train: error: "):]
    assert "nobody/no-such-tower" in line and "Traceback" not in result.stderr and line.count("\n") == 1, line


def test_a_checkpoint_with_nan_weights_is_refused_at_load(tmp_path):
    """A NaN or infinity written into a weight or an imputer buffer is named when the model loads, not found later
    inside a Cholesky factorisation."""
    import torch
    from safetensors.torch import load_file, save_file

    from calmrl_hf import CalMRLModel
    from tiny_models import tiny_config

    model = CalMRLModel(tiny_config())
    for name, value in (("projections.text.weight", float("nan")), ("imputer.mean", float("inf"))):
        folder = tmp_path / name
        model.save_pretrained(folder)
        state = load_file(folder / "model.safetensors")
        state[name].view(-1)[0] = value
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"NaN or infinite values in \['{name}'\]"):
            CalMRLModel.from_pretrained(folder)
    assert torch.isfinite(CalMRLModel.from_pretrained(_saved(model, tmp_path / "clean")).imputer.mean).all()


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder
