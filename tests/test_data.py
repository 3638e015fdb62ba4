import csv
import json

import numpy as np
import pytest
import torch
from datasets import interleave_datasets

from media_fixtures import RATE, frame_levels, write_video, write_wav

from calmrl_hf.data import (
    MediaDecodingError,
    concatenate,
    decode_audio,
    decode_video,
    for_process,
    load_annotations,
    load_audiocaps,
    load_msrvtt,
    load_vast,
    with_media_decoding,
)


@pytest.fixture()
def corpus(tmp_path):
    """VAST-, MSR-VTT- and AudioCaps-format files over a few tiny clips."""
    videos, audios = tmp_path / "videos", tmp_path / "audios"
    videos.mkdir()
    audios.mkdir()
    for i in range(4):
        write_video(videos / f"clip{i}.mp4", offset=i)
        if i != 2:  # clip2 has no audio file: its audio must be marked missing
            write_wav(audios / f"clip{i}.wav", frequency=300 + 100 * i)
    vast = tmp_path / "vast.json"
    vast.write_text(json.dumps([{"clip_id": f"clip{i}", "vast_cap": [f"caption {i}", "other"],
                                 "subtitle": f"sub {i}" if i != 1 else ""} for i in range(4)]))
    msrvtt = tmp_path / "msrvtt.json"
    msrvtt.write_text(json.dumps([{"video_id": "clip0", "caption": ["a", "b"]}, {"video_id": "clip3", "caption": "c"}]))
    audiocaps = tmp_path / "audiocaps.csv"
    with audiocaps.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        writer.writerow([7, "clip1", 0, "a tone"])
        writer.writerow([8, "missing_clip", 0, "never downloaded"])
        writer.writerow([9, "clip3", 0, "another tone"])
    return {"root": tmp_path, "videos": videos, "audios": audios, "vast": vast, "msrvtt": msrvtt,
            "audiocaps": audiocaps}


def test_vast_loader_marks_missing_modalities(corpus):
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    assert ds.column_names == ["id", "vision", "audio", "text", "subtitle", "modality_mask"]
    assert ds["modality_mask"] == [[True, True, True, True], [True, True, True, False],
                                   [True, False, True, True], [True, True, True, True]]
    assert ds[0]["text"] == "caption 0" and ds[1]["subtitle"] is None and ds[2]["audio"] is None
    assert ds[0]["vision"].endswith("clip0.mp4")


def test_msrvtt_and_audiocaps_loaders(corpus):
    msrvtt = load_msrvtt(corpus["msrvtt"], corpus["videos"])
    assert msrvtt["id"] == ["clip0#0", "clip0#1", "clip3"] and msrvtt["text"] == ["a", "b", "c"]
    assert all(mask == [True, False, True, False] for mask in msrvtt["modality_mask"])
    with_audio = load_msrvtt(corpus["msrvtt"], corpus["videos"], corpus["audios"])
    assert with_audio["modality_mask"][0] == [True, True, True, False]
    audiocaps = load_audiocaps(corpus["audiocaps"], corpus["audios"])
    assert audiocaps["id"] == ["7", "9"]  # the clip without audio is dropped, not shifted
    assert audiocaps["text"] == ["a tone", "another tone"] and audiocaps[1]["audio"].endswith("clip3.wav")
    assert all(mask == [False, True, True, False] for mask in audiocaps["modality_mask"])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_generic_loader_reads_every_format(corpus, fmt):
    rows = [{"uid": "a", "video": "clip0.mp4", "caption": "first", "label": 3},
            {"uid": "b", "video": "", "caption": "second", "label": 4},
            {"uid": "c", "video": "clip1.mp4", "caption": "", "label": 5}]
    path = corpus["root"] / f"annotations.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_annotations(path, media_roots={"vision": corpus["videos"]}, modalities=["vision", "text"],
                          column_map={"vision": "video", "text": "caption"}, id_column="uid")
    assert ds["id"] == ["a", "b", "c"] and ds["label"] == [3, 4, 5]
    assert ds["modality_mask"] == [[True, True], [False, True], [True, False]]
    assert ds[0]["vision"] == str(corpus["videos"] / "clip0.mp4")


def test_decoding_is_lazy_and_samples_frames_evenly(corpus):
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    decoded = with_media_decoding(ds, num_frames=4, sampling_rate=8000)
    example = decoded[3]
    assert example["vision"].shape == (4, 32, 32, 3)
    assert frame_levels(example["vision"]) == [3 + 1, 3 + 3, 3 + 5, 3 + 7]  # centres of 4 segments of 8 frames
    assert example["audio"].dtype == np.float32 and example["audio"].shape == (2000,)  # 0.25 s resampled to 8 kHz
    assert example["text"] == "caption 3"
    assert isinstance(ds[3]["vision"], str)  # the source dataset is untouched


def test_audio_decoding_is_exact_at_its_own_rate(corpus):
    import soundfile

    path = corpus["audios"] / "clip0.wav"
    expected, _ = soundfile.read(str(path), dtype="float32")
    np.testing.assert_array_equal(decode_audio(path, RATE), expected)


def test_missing_or_corrupt_media_raise_naming_the_file(corpus):
    with pytest.raises(MediaDecodingError, match="nowhere.mp4"):
        decode_video(corpus["root"] / "nowhere.mp4", 2)
    corrupt = corpus["videos"] / "clip1.mp4"
    corrupt.write_bytes(b"not a video at all")
    ds = with_media_decoding(load_vast(corpus["vast"], corpus["videos"], corpus["audios"]), num_frames=2)
    with pytest.raises(MediaDecodingError, match="clip1.mp4"):
        ds[1]


def test_skip_marks_the_modality_missing_and_counts(corpus):
    (corpus["videos"] / "clip1.mp4").write_bytes(b"garbage")
    ds = with_media_decoding(load_vast(corpus["vast"], corpus["videos"], corpus["audios"]), num_frames=2,
                             on_error="skip")
    rows = [ds[i] for i in range(4)]
    assert rows[1]["vision"] is None and rows[1]["modality_mask"] == [False, True, True, False]
    assert rows[1]["text"] == "caption 1"  # the rest of the example keeps its pairing
    assert rows[0]["vision"] is not None and rows[0]["modality_mask"] == [True] * 4
    assert ds.media_decoder.failures.counts["vision"] == 1
    assert "clip1.mp4" in ds.media_decoder.failures.examples[0]


def test_concatenate_and_interleave_keep_masks(corpus):
    full = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    video_text = load_msrvtt(corpus["msrvtt"], corpus["videos"], modalities=["vision", "text"])
    audio_text = load_audiocaps(corpus["audiocaps"], corpus["audios"], modalities=["audio", "text"])
    mixed = concatenate([full, video_text, audio_text])
    assert mixed.column_names == ["id", "vision", "audio", "text", "subtitle", "modality_mask"]
    assert len(mixed) == 4 + 3 + 2
    for row in mixed:
        assert row["modality_mask"] == [row[m] is not None for m in ("vision", "audio", "text", "subtitle")]
    assert mixed[4]["modality_mask"] == [True, False, True, False]
    assert mixed[7]["modality_mask"] == [False, True, True, False]
    interleaved = interleave_datasets([concatenate([full], mixed.column_names[1:5]),
                                       concatenate([audio_text], mixed.column_names[1:5])], seed=0)
    for row in interleaved:
        assert row["modality_mask"] == [row[m] is not None for m in ("vision", "audio", "text", "subtitle")]


def test_streaming_and_per_process_split(corpus):
    streamed = load_vast(corpus["vast"], corpus["videos"], corpus["audios"], streaming=True)
    rows = list(streamed)
    assert [r["id"] for r in rows] == ["clip0", "clip1", "clip2", "clip3"]
    decoded = with_media_decoding(streamed, num_frames=2)
    first = next(iter(decoded))
    assert first["vision"].shape == (2, 32, 32, 3)
    map_style = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    shards = [for_process(map_style, rank, 2) for rank in range(2)]
    assert sorted(list(shards[0]["id"]) + list(shards[1]["id"])) == ["clip0", "clip1", "clip2", "clip3"]
    assert not set(shards[0]["id"]) & set(shards[1]["id"])
    stream_shards = [[r["id"] for r in for_process(streamed, rank, 2)] for rank in range(2)]
    assert sorted(stream_shards[0] + stream_shards[1]) == ["clip0", "clip1", "clip2", "clip3"]
    with pytest.raises(ValueError, match="rank"):
        for_process(map_style, 2, 2)


def test_collator_batches_decoded_examples(corpus):
    from transformers import BertTokenizerFast, ViTImageProcessor, Wav2Vec2FeatureExtractor

    from calmrl_hf import CalMRLProcessor
    from calmrl_hf.data import CalMRLCollator

    vocab = corpus["root"] / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "caption", "sub", "0", "1", "2",
                                "3"]))
    processor = CalMRLProcessor(BertTokenizerFast(vocab_file=str(vocab)),
                                ViTImageProcessor(size={"height": 16, "width": 16}),
                                Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2)
    ds = with_media_decoding(load_vast(corpus["vast"], corpus["videos"], corpus["audios"]), num_frames=2)
    collator = CalMRLCollator(processor)
    batch = collator([ds[i] for i in range(4)])
    assert batch["modality_mask"].tolist() == list(ds["modality_mask"])
    assert batch["vision_pixel_values"].shape == (4, 2, 3, 16, 16)
    assert batch["audio_input_values"].shape[0] == 3  # clip2 has no audio: only observed rows
    assert batch["subtitle_input_ids"].shape[0] == 3
    empty = {"vision": None, "audio": None, "text": None, "subtitle": None, "modality_mask": [False] * 4}
    batch = collator([ds[0], empty])
    assert collator.dropped_examples == 1 and batch["modality_mask"].shape == (1, 4)
    assert torch.equal(batch["modality_mask"], torch.ones(1, 4, dtype=torch.bool))
