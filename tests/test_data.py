"""calmrl_hf.data: loaders mark missing modalities, media decode lazily, datasets mix and split, the collator
batches."""

import csv
import logging
import json

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset, concatenate_datasets, interleave_datasets
from torch.utils.data import DataLoader
from transformers import BertTokenizer, ViTImageProcessor, Wav2Vec2FeatureExtractor

from media_fixtures import RATE, frame_levels, write_image, write_video, write_wav

from calmrl_hf.data import (
    CalMRLCollator,
    DecodingFailures,
    MediaDecoder,
    MediaDecodingError,
    align_modalities,
    concatenate,
    decode_audio,
    decode_video,
    features_for,
    for_process,
    interleave,
    load_annotations,
    load_audiocaps,
    load_msrvtt,
    load_vast,
    resample_audio,
    with_media_decoding,
)
from calmrl_hf.processing_calmrl import CalMRLProcessor


MODALITIES = ("vision", "audio", "text", "subtitle")


def masks_match_values(dataset, modalities=MODALITIES) -> bool:
    return all(row["modality_mask"] == [row[m] is not None for m in modalities] for row in dataset)


@pytest.fixture()
def corpus(tmp_path):
    """VAST-, MSR-VTT- and AudioCaps-format annotations over a few tiny clips (clip i: frames at levels i..i+7)."""
    videos, audios = tmp_path / "videos", tmp_path / "audios"
    videos.mkdir()
    audios.mkdir()
    for i in range(4):
        write_video(videos / f"clip{i}.mp4", offset=i)
        if i != 2:  # clip2 has no audio file: its audio must be marked missing
            write_wav(audios / f"clip{i}.wav", frequency=300 + 100 * i)
    vast = tmp_path / "vast.json"
    vast.write_text(json.dumps([{"clip_id": f"clip{i}", "vast_cap": [f"caption {i}", "other"],
                                 "subtitle": f"sub {i}" if i != 1 else "", "vision_cap": ["ignored"]}
                                for i in range(4)]))
    return {"root": tmp_path, "videos": videos, "audios": audios, "vast": vast}


@pytest.fixture()
def processor():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "caption", "sub", "a", "tone", "0", "1", "2", "3"]
    # transformers 5: a BERT tokenizer takes its vocabulary as a dict (`vocab_file=` is no longer read)
    return CalMRLProcessor(BertTokenizer(vocab={w: i for i, w in enumerate(words)}),
                           ViTImageProcessor(size={"height": 16, "width": 16}),
                           Wav2Vec2FeatureExtractor(return_attention_mask=True), num_frames=2)


# ------------------------------------------------------------------------------------------------ loaders
def test_vast_loader_marks_missing_modalities(corpus):
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    assert isinstance(ds, Dataset)
    assert ds.column_names == ["id", "vision", "audio", "text", "subtitle", "modality_mask", "label"]
    assert ds["id"] == ["clip0", "clip1", "clip2", "clip3"]
    assert ds["modality_mask"] == [[True, True, True, True], [True, True, True, False],
                                   [True, False, True, True], [True, True, True, True]]
    assert ds[0]["text"] == "caption 0" and ds[1]["subtitle"] is None and ds[2]["audio"] is None
    assert ds[0]["vision"] == str(corpus["videos"] / "clip0.mp4") and ds["label"] == [None] * 4
    assert masks_match_values(ds)
    # video_id / desc (the MSR-VTT-style rows of the VAST code base) are read too; only chosen modalities kept
    other = corpus["root"] / "vast_video_id.jsonl"
    other.write_text(json.dumps({"video_id": "clip3", "desc": "d", "label": 7}) + "\n")
    ds = load_vast(other, corpus["videos"], modalities=["vision", "text"])
    assert ds[0] == {"id": "clip3", "vision": str(corpus["videos"] / "clip3.mp4"), "text": "d",
                     "modality_mask": [True, True], "label": 7}
    with pytest.raises(ValueError, match="load_vast fills"):
        load_vast(corpus["vast"], corpus["videos"], modalities={"image": "vision"})
    with pytest.raises(FileNotFoundError, match="audio_dir: media folder not found"):
        load_vast(corpus["vast"], corpus["videos"], corpus["root"] / "nowhere")


def test_msrvtt_formats(corpus):
    root = corpus["root"]
    official = root / "MSRVTT_data.json"  # {"videos": [...], "sentences": [...]}; video7 has no file
    official.write_text(json.dumps({"info": {}, "videos": [{"video_id": "clip0"}],
                                    "sentences": [{"video_id": "clip0", "caption": "a", "sen_id": 0},
                                                  {"video_id": "clip0", "caption": "b", "sen_id": 1},
                                                  {"video_id": "clip3", "caption": "c", "sen_id": 2},
                                                  {"video_id": "video7", "caption": "lost", "sen_id": 3}]}))
    ds = load_msrvtt(official, corpus["videos"])
    assert ds["id"] == ["clip0#0", "clip0#1", "clip3"] and ds["text"] == ["a", "b", "c"]
    assert ds["modality_mask"] == [[True, False, True, False]] * 3
    kept = load_msrvtt(official, corpus["videos"], require_video=False)
    assert kept["id"][-1] == "video7" and kept["modality_mask"][-1] == [False, False, True, False]
    with_audio = load_msrvtt(official, corpus["videos"], corpus["audios"])
    assert with_audio["modality_mask"][0] == [True, True, True, False]

    vast_style = root / "descs_ret_test.json"  # the VAST code base: desc + subtitle
    vast_style.write_text(json.dumps([{"video_id": "clip1", "desc": "d1", "subtitle": " spoken words "},
                                      {"video_id": "clip2", "desc": ["d2", "d2 again"], "subtitle": ""}]))
    ds = load_msrvtt(vast_style, corpus["videos"])
    assert ds["id"] == ["clip1", "clip2#0", "clip2#1"] and ds["subtitle"] == ["spoken words", None, None]
    assert ds["modality_mask"][0] == [True, False, True, True]

    jsfusion = root / "MSRVTT_JSFUSION_test.csv"
    with jsfusion.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        writer.writerow(["ret0", "msr0", "clip0", "a man"])
    assert load_msrvtt(jsfusion, corpus["videos"])[0]["text"] == "a man"


def test_audiocaps_formats(corpus):
    root, audios = corpus["root"], corpus["root"] / "audiocaps"
    audios.mkdir()
    write_wav(audios / "abc_30.000_40.000.wav")  # VAST / GRAM naming
    write_wav(audios / "Ydef.flac")  # AudioSet naming
    write_wav(audios / "103.wav")  # by audiocap_id
    official = root / "train.csv"
    with official.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        writer.writerow([101, "abc", 30, "a tone"])
        writer.writerow([102, "def", 0, "another tone"])
        writer.writerow([103, "ghi", 0, "by id"])
        writer.writerow([104, "never_downloaded", 0, "lost"])
    ds = load_audiocaps(official, audios)
    assert ds["id"] == ["101", "102", "103"]  # the clip without audio is dropped, not shifted
    assert [p.rsplit("/", 1)[1] for p in ds["audio"]] == ["abc_30.000_40.000.wav", "Ydef.flac", "103.wav"]
    assert ds["text"] == ["a tone", "another tone", "by id"]
    assert ds["modality_mask"] == [[False, True, True, False]] * 3
    assert load_audiocaps(official, audios, require_audio=False)["modality_mask"][-1] == [False, False, True, False]

    vast_style = root / "descs_ret_test.json"
    vast_style.write_text(json.dumps([{"video_id": "abc_30.000_40.000", "caption": ["x", "y"]}]))
    ds = load_audiocaps(vast_style, audios, modalities=["audio", "text"])
    assert ds["id"] == ["abc_30.000_40.000#0", "abc_30.000_40.000#1"] and ds["text"] == ["x", "y"]
    assert ds["modality_mask"] == [[True, True]] * 2


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_generic_loader_reads_every_format(corpus, fmt):
    images = corpus["root"] / "images"
    images.mkdir()
    rows = [{"uid": "a", "video": "clip0.mp4", "caption": "first", "label": 3, "photo": "cat.png"},
            {"uid": "b", "video": "", "caption": "second", "label": 4, "photo": None},
            {"uid": "c", "video": "clip1.mp4", "caption": "  ", "label": 5, "photo": str(images / "abs.png")},
            {"uid": "d", "video": None, "caption": None, "label": None, "photo": None}]  # nothing: dropped
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
    ds = load_annotations(path, media_roots={"vision": corpus["videos"]},
                          modalities={"vision": "vision", "photo": "vision", "caption": "text"},
                          column_map={"vision": "video"}, id_column="uid")
    assert ds.column_names == ["id", "vision", "photo", "caption", "modality_mask", "label"]
    assert ds["id"] == ["a", "b", "c"] and ds["label"] == [3, 4, 5]
    assert ds["modality_mask"] == [[True, True, True], [False, False, True], [True, True, False]]
    assert ds[0]["vision"] == str(corpus["videos"] / "clip0.mp4")  # relative: against the modality's root
    assert ds[0]["photo"] == str(corpus["root"] / "cat.png")  # no root: against the annotation file's folder
    assert ds[2]["photo"] == str(images / "abs.png")  # absolute: kept


def test_generic_loader_validates(corpus, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"id": 1, "text": "x", "label": "dog"}]))
    with pytest.raises(ValueError, match=r"label 'dog' is not an integer"):
        load_annotations(path)
    with pytest.raises(ValueError, match=r"media_roots names \['video'\]"):
        load_annotations(path, media_roots={"video": tmp_path})
    with pytest.raises(ValueError, match="no default kind"):
        load_annotations(path, modalities=["image"])
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_annotations(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="unsupported annotation format"):
        (tmp_path / "a.xml").write_text("<a/>")
        load_annotations(tmp_path / "a.xml")


def test_every_loader_writes_the_same_schema(corpus):
    csv_path = corpus["root"] / "ac.csv"
    csv_path.write_text("audiocap_id,youtube_id,start_time,caption\n1,clip1,0,t\n")
    msrvtt = corpus["root"] / "msrvtt.json"  # (a VAST file given to load_msrvtt is refused: wrong format)
    msrvtt.write_text(json.dumps([{"video_id": f"clip{i}", "caption": f"caption {i}"} for i in range(4)]))
    loaded = [load_vast(corpus["vast"], corpus["videos"], corpus["audios"]),
              load_msrvtt(msrvtt, corpus["videos"]),
              load_audiocaps(csv_path, corpus["audios"]),
              load_annotations(corpus["vast"], column_map={"text": "vast_cap", "vision": "clip_id"})]
    assert all(ds.features == features_for(MODALITIES) for ds in loaded)
    mixed = concatenate_datasets(loaded)  # no helper needed for the same modality list
    assert len(mixed) == 4 + 4 + 1 + 4 and masks_match_values(mixed)


# ------------------------------------------------------------------------------------------------ decoding
def test_decoding_is_lazy_and_samples_frames_evenly(corpus):
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    decoded = with_media_decoding(ds, num_frames=4, sampling_rate=8000)
    example = decoded[3]
    assert example["vision"].shape == (4, 32, 32, 3) and example["vision"].dtype == np.uint8
    assert frame_levels(example["vision"]) == [3 + 1, 3 + 3, 3 + 5, 3 + 7]  # centres of 4 segments of 8 frames
    assert example["audio"].dtype == np.float32 and example["audio"].shape == (2000,)  # 0.25 s at 8 kHz
    assert example["text"] == "caption 3" and example["modality_mask"] == [True] * 4
    assert isinstance(ds[3]["vision"], str)  # the source dataset keeps its paths


def test_video_decoding_any_container(tmp_path):
    for suffix in (".mp4", ".mkv", ".webm"):  # mkv / webm announce no frame count: packets are counted
        path = write_video(tmp_path / f"v{suffix}", num_frames=8, offset=1)
        assert frame_levels(decode_video(path, 4)) == [2, 4, 6, 8], suffix
    short = write_video(tmp_path / "short.mp4", num_frames=3)
    assert frame_levels(decode_video(short, 4)) == [0, 1, 1, 2]  # fewer frames than asked: repeated, in order


def test_audio_decoding(tmp_path):
    import soundfile

    path = write_wav(tmp_path / "mono.wav")
    expected, _ = soundfile.read(str(path), dtype="float32")
    np.testing.assert_array_equal(decode_audio(path, RATE), expected)  # at its own rate: bit-exact
    stereo = write_wav(tmp_path / "stereo.wav", rate=44100, channels=2, seconds=0.5)
    wave = decode_audio(stereo, 16000)  # averaged to mono, resampled
    assert wave.shape == (8000,) and abs(np.abs(wave).max() - 0.25) < 0.01
    np.testing.assert_allclose(resample_audio(expected, RATE, 8000)[:100:2], expected[:200:4], atol=0.05)
    in_video = write_video(tmp_path / "with_sound.mp4", audio_seconds=0.5)  # AAC track, through PyAV
    wave = decode_audio(in_video, 16000)
    assert wave.dtype == np.float32 and 7000 < wave.size < 10000 and 0.4 < np.abs(wave).max() < 0.6
    with pytest.raises(MediaDecodingError, match="no audio stream"):
        decode_audio(write_video(tmp_path / "silent.mp4"), 16000)


def test_image_files_decode_as_images(tmp_path):
    write_image(tmp_path / "cat.png", level=100)
    rows = tmp_path / "images.jsonl"
    rows.write_text(json.dumps({"id": "x", "image": "cat.png", "caption": "a cat"}))
    ds = load_annotations(rows, modalities={"image": "vision", "caption": "text"})
    with pytest.raises(ValueError, match="modality_kinds"):
        with_media_decoding(load_annotations(rows, modalities={"image": "vision"}).rename_column("image", "photo"))
    processor = CalMRLProcessor(image_processor=ViTImageProcessor(), modalities={"image": "vision", "caption": "text"})
    example = with_media_decoding(ds, modality_kinds=processor.modality_kinds)[0]
    assert example["image"].shape == (20, 24, 3) and int(example["image"].mean()) == 100


def test_missing_or_corrupt_media_raise_naming_the_file(corpus):
    with pytest.raises(MediaDecodingError, match="nowhere.mp4"):
        decode_video(corpus["root"] / "nowhere.mp4", 2)
    (corpus["videos"] / "clip1.mp4").write_bytes(b"not a video at all")
    (corpus["audios"] / "clip3.wav").write_bytes(b"RIFF garbage")
    ds = with_media_decoding(load_vast(corpus["vast"], corpus["videos"], corpus["audios"]), num_frames=2)
    with pytest.raises(MediaDecodingError, match=r"clip1\.mp4.*modality 'vision' of example 'clip1'"):
        ds[1]
    with pytest.raises(MediaDecodingError, match=r"clip3\.wav") as error:
        ds[3]
    assert error.value.path.endswith("clip3.wav")
    (corpus["audios"] / "clip0.wav").unlink()  # gone after loading
    with pytest.raises(MediaDecodingError, match=r"Audio file not found: .*clip0\.wav"):
        ds[0]


def test_skip_marks_the_modality_missing_and_counts(corpus, processor):
    (corpus["videos"] / "clip1.mp4").write_bytes(b"garbage")
    (corpus["videos"] / "clip2.mp4").write_bytes(b"garbage")
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"], modalities=["vision", "audio"])
    decoded = with_media_decoding(ds, num_frames=2, on_error="skip")
    rows = [decoded[i] for i in range(4)]
    assert rows[1]["vision"] is None and rows[1]["modality_mask"] == [False, True]
    assert isinstance(rows[1]["audio"], np.ndarray)  # the rest of the example keeps its pairing
    assert rows[2]["modality_mask"] == [False, False]  # clip2 has no audio file either: nothing left
    assert rows[0]["modality_mask"] == [True, True] and rows[3]["vision"].shape == (2, 32, 32, 3)
    failures = decoded.media_decoder.failures
    assert failures.counts == {"vision": 2, "audio": 0} and failures.total == 2
    assert "clip1.mp4" in failures.examples[0]
    # the collator drops the example with nothing left, counts it, and keeps the others' pairings
    collator = CalMRLCollator(CalMRLProcessor(image_processor=processor.image_processor,
                                              feature_extractor=processor.feature_extractor,
                                              modalities=["vision", "audio"], num_frames=2))
    batch = collator(rows)
    assert collator.dropped_examples == 1 and batch["ids"] == ["clip0", "clip1", "clip3"]
    assert batch["modality_mask"].tolist() == [[True, True], [False, True], [True, True]]
    assert batch["vision_pixel_values"].shape == (2, 2, 3, 16, 16) and batch["audio_input_values"].shape[0] == 3


def test_nan_samples_in_a_decodable_wav_count_as_corrupt_media(corpus):
    import soundfile

    wave = np.zeros(RATE // 10, dtype=np.float32)
    wave[100:110] = np.nan
    soundfile.write(corpus["audios"] / "clip1.wav", wave, RATE, subtype="FLOAT")
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"], modalities=["vision", "audio"])
    with pytest.raises(MediaDecodingError, match=r"clip1\.wav has 10 non-finite samples.*modality 'audio'"):
        with_media_decoding(ds, num_frames=2)[1]
    skipped = with_media_decoding(ds, num_frames=2, on_error="skip")
    row = skipped[1]
    assert row["audio"] is None and row["modality_mask"] == [True, False]
    assert skipped.media_decoder.failures.counts == {"vision": 0, "audio": 1}


def test_annotation_errors_name_the_file_and_the_wrong_format(corpus, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"clip_id": "a",\n   "vast_cap": "x"\n  ,]')
    with pytest.raises(ValueError, match=r"broken\.json, line 4, column 4: invalid JSON"):
        load_vast(broken, corpus["videos"])
    # a VAST file given to the AudioCaps or MSR-VTT loader (calmrl evaluate --format audiocaps on a VAST file)
    for loader, args in ((load_audiocaps, (corpus["audios"],)), (load_msrvtt, (corpus["videos"],))):
        with pytest.raises(ValueError, match=rf"vast\.json: no row has a caption {loader.__name__} reads.*load it "
                                             r"with load_vast \(calmrl: --format vast\)"):
            loader(corpus["vast"], *args)
    audiocaps = tmp_path / "audiocaps.csv"
    audiocaps.write_text("audiocap_id,youtube_id,start_time,caption\n1,clip0,0,a tone\n")
    with pytest.raises(ValueError, match="load it with load_audiocaps"):
        load_vast(audiocaps, corpus["videos"], corpus["audios"])


def test_counts_survive_dataloader_workers(corpus, processor):
    (corpus["videos"] / "clip1.mp4").write_bytes(b"garbage")
    (corpus["videos"] / "clip2.mp4").write_bytes(b"garbage")
    failures = DecodingFailures(["vision", "audio"])
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"], modalities=["vision", "audio"])
    decoded = with_media_decoding(ds, num_frames=2, on_error="skip", failures=failures)
    collator = CalMRLCollator(CalMRLProcessor(image_processor=processor.image_processor,
                                              feature_extractor=processor.feature_extractor,
                                              modalities=["vision", "audio"], num_frames=2))
    loader = DataLoader(decoded.shuffle(seed=0), batch_size=2, collate_fn=collator, num_workers=2)
    batches = list(loader)  # decoding and collation happen in the worker processes
    assert sum(len(b["ids"]) for b in batches) == 3
    assert failures.counts == {"vision": 2, "audio": 0} and collator.dropped_examples == 1


def test_skipped_files_are_warned_of_a_few_times_then_counted(corpus, caplog):
    """A training bar is not broken by a warning per unreadable file: the first `warned_skips` are warned of (the
    last one saying the rest are only counted), the others go to debug, and every one is counted."""
    for name in ("clip0.mp4", "clip1.mp4", "clip2.mp4"):
        (corpus["videos"] / name).write_bytes(b"garbage")
    ds = load_vast(corpus["vast"], corpus["videos"], corpus["audios"], modalities=["vision", "audio"])
    decoder = MediaDecoder({"vision": "vision", "audio": "audio"}, num_frames=2, on_error="skip")
    decoder.warned_skips = 2
    with caplog.at_level(logging.DEBUG, logger="calmrl_hf.data.media"):
        decoder(ds[:])
    skips = [r for r in caplog.records if r.getMessage().startswith("Skipping vision")]
    assert [r.levelno for r in skips] == [logging.WARNING, logging.WARNING, logging.DEBUG]
    assert "not warned of" in skips[1].getMessage() and "not warned of" not in skips[0].getMessage()
    assert decoder.failures.counts["vision"] == 3


# ------------------------------------------------------------------------------------------------ mixing, splitting
def test_concatenate_and_interleave_keep_masks(corpus):
    full = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    official = corpus["root"] / "msrvtt.json"
    official.write_text(json.dumps([{"video_id": "clip0", "caption": ["a", "b"]}, {"video_id": "clip3",
                                                                                    "caption": "c"}]))
    video_text = load_msrvtt(official, corpus["videos"], modalities=["text", "vision"])  # other order
    captions = corpus["root"] / "audiocaps.json"
    captions.write_text(json.dumps([{"video_id": f"clip{i}", "caption": f"t{i}"} for i in range(3)]))
    audio_text = load_audiocaps(captions, corpus["audios"], modalities=["audio", "text"])  # clip2: no audio
    mixed = concatenate([full, video_text, audio_text])
    assert mixed.column_names == ["id", "vision", "audio", "text", "subtitle", "modality_mask", "label"]
    assert len(mixed) == 4 + 3 + 2 and masks_match_values(mixed)
    assert mixed[4]["modality_mask"] == [True, False, True, False]
    assert mixed[7]["modality_mask"] == [False, True, True, False]
    interleaved = interleave([full, video_text, audio_text], probabilities=[0.4, 0.3, 0.3], seed=0,
                             stopping_strategy="all_exhausted")
    assert masks_match_values(interleaved) and {r["id"] for r in interleaved} >= {"clip0#1", "clip3"}
    aligned = [align_modalities(ds, MODALITIES) for ds in (full, video_text, audio_text)]
    assert masks_match_values(interleave_datasets(aligned, seed=0))  # datasets' own functions work once aligned
    # an aligned copy of a dataset keeps the values and masks of its own columns
    assert align_modalities(video_text, MODALITIES)[0] == {"id": "clip0#0", "vision": video_text[0]["vision"],
                                                           "audio": None, "text": "a", "subtitle": None,
                                                           "modality_mask": [True, False, True, False], "label": None}
    with pytest.raises(ValueError, match=r"modalities \['subtitle'\] that are not in"):
        align_modalities(full, ["vision", "audio", "text"])


def test_streaming_and_per_process_split(corpus):
    streamed = load_vast(corpus["vast"], corpus["videos"], corpus["audios"], streaming=True)
    assert isinstance(streamed, IterableDataset) and streamed.num_shards == 4
    assert [r["id"] for r in streamed] == ["clip0", "clip1", "clip2", "clip3"]
    assert masks_match_values(streamed)
    decoded = with_media_decoding(streamed, num_frames=2, on_error="skip")
    first = next(iter(decoded))
    assert first["vision"].shape == (2, 32, 32, 3) and first["audio"].dtype == np.float32

    map_style = load_vast(corpus["vast"], corpus["videos"], corpus["audios"])
    for dataset in (map_style, streamed, with_media_decoding(streamed, num_frames=2)):
        shards = [[r["id"] for r in for_process(dataset, rank, 2)] for rank in range(2)]
        assert sorted(shards[0] + shards[1]) == ["clip0", "clip1", "clip2", "clip3"]
        assert len(shards[0]) == len(shards[1]) == 2
    three = [[r["id"] for r in for_process(streamed, rank, 3)] for rank in range(3)]  # 4 shards: example-level
    assert sorted(sum(three, [])) == ["clip0", "clip1", "clip2", "clip3"]
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        for_process(map_style, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        for_process(map_style, 0, 0)


def test_streaming_annotation_files_are_shards(tmp_path):
    files = []
    for part in range(2):
        path = tmp_path / f"part{part}.jsonl"
        path.write_text("\n".join(json.dumps({"id": f"{part}-{i}", "text": f"t{i}", "subtitle": ""})
                                  for i in range(3)))
        files.append(path)
    stream = load_annotations(files, modalities=["text", "subtitle"], streaming=True)
    assert stream.num_shards == 2 and [r["id"] for r in stream] == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    assert [r["id"] for r in for_process(stream, 1, 2)] == ["1-0", "1-1", "1-2"]
    assert next(iter(stream))["modality_mask"] == [True, False]
    assert concatenate([stream, load_annotations(files[0], modalities=["text"], streaming=True)],
                       modalities=["text", "subtitle"]).features == features_for(["text", "subtitle"])


# ------------------------------------------------------------------------------------------------ collator
def test_collator_batches_decoded_examples(corpus, processor):
    ds = with_media_decoding(load_vast(corpus["vast"], corpus["videos"], corpus["audios"]), num_frames=2)
    ds = ds.add_column("index", list(range(10, 14)))
    collator = CalMRLCollator(processor)
    batch = collator([ds[i] for i in range(4)])
    assert batch["modality_mask"].tolist() == ds["modality_mask"]
    assert batch["vision_pixel_values"].shape == (4, 2, 3, 16, 16)
    assert batch["audio_input_values"].shape[0] == 3  # clip2 has no audio: only observed rows
    assert batch["audio_attention_mask"].shape == batch["audio_input_values"].shape
    assert batch["subtitle_input_ids"].shape[0] == 3 and batch["text_input_ids"].shape[0] == 4
    assert batch["ids"] == ["clip0", "clip1", "clip2", "clip3"] and batch["index"].tolist() == [10, 11, 12, 13]
    assert "labels" not in batch  # the VAST file has no labels
    labelled = [{**ds[i], "label": i % 2} for i in range(2)]
    assert torch.equal(collator(labelled)["labels"], torch.tensor([0, 1]))
    only_label = CalMRLCollator(processor, pass_through=("label",))(labelled)
    assert "ids" not in only_label and "index" not in only_label
    with pytest.raises(ValueError, match="pass_through"):
        CalMRLCollator(processor, pass_through=("speaker",))
    empty = {"id": "e", "vision": None, "audio": None, "text": None, "subtitle": None}
    with pytest.raises(ValueError, match="No example of this batch"):
        collator([empty])
