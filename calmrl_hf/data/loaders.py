"""Loaders returning HF `datasets` with one column per modality (None where absent) and `modality_mask`.

Every loader produces the same schema, so full-modality and partial sets concatenate or interleave with their
masks intact: text modalities hold strings, media modalities hold file paths (decoded lazily by
`with_media_decoding`), `modality_mask` is a list of bools in modality order, `id` a string, and `label` an
integer where the annotations have one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, Features, IterableDataset, Sequence, Value, concatenate_datasets
from datasets.distributed import split_dataset_by_node

from ..processing_calmrl import DEFAULT_MODALITY_KINDS


logger = logging.getLogger(__name__)

DEFAULT_MODALITIES = tuple(DEFAULT_MODALITY_KINDS)
NON_MODALITY_COLUMNS = ("id", "label", "labels", "modality_mask", "index")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


def dataset_modalities(dataset) -> list[str]:
    """The modality columns of a CalMRL dataset (every column except id / label / modality_mask)."""
    names = dataset.column_names
    if isinstance(names, dict):  # DatasetDict
        names = next(iter(names.values()))
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return [c for c in names or [] if c not in NON_MODALITY_COLUMNS]


def features_for(modalities: Iterable[str], with_label: bool) -> Features:
    columns = {"id": Value("string")}
    columns.update({m: Value("string") for m in modalities})
    columns["modality_mask"] = Sequence(Value("bool"))
    if with_label:
        columns["label"] = Value("int64")
    return Features(columns)


def _yield_records(chunks: list[list[dict]]) -> Iterator[dict]:
    for chunk in chunks:
        yield from chunk


def _build(records: list[dict], modalities: list[str], with_label: bool, streaming: bool, chunk_size: int = 1024):
    features = features_for(modalities, with_label)
    if streaming:
        # a list in gen_kwargs is split into shards: chunks of records let processes and workers split the stream
        chunks = [records[i : i + chunk_size] for i in range(0, len(records), chunk_size)] or [[]]
        return IterableDataset.from_generator(_yield_records, features=features, gen_kwargs={"chunks": chunks})
    columns = {name: [r.get(name) for r in records] for name in features}
    return Dataset.from_dict(columns, features=features)


def _record(example_id, values: dict, modalities: list[str], label=None) -> dict:
    record = {"id": str(example_id)}
    for name in modalities:
        value = values.get(name)
        record[name] = None if value is None or value == "" else str(value)
    record["modality_mask"] = [record[name] is not None for name in modalities]
    if label is not None:
        record["label"] = int(label)
    return record


def _read_records(path: Path) -> Iterator[dict]:
    """Rows of a JSON (list of objects), JSONL, CSV or parquet annotation file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file not found: {path}")
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # {"annotations": [...]} or {id: record}
            data = data.get("annotations", data.get("sentences", list(data.values())))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects.")
        yield from data
    elif suffix == ".jsonl":
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            yield from csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unsupported annotation format {suffix!r} (use .json, .jsonl, .csv or .parquet).")


def _media_index(folder: str | Path | None, extensions: tuple[str, ...]) -> dict[str, str]:
    """File stem -> path of the media files in a folder (one scan, so 150K clips cost one listing)."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Media folder not found: {folder}")
    index = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in extensions and entry.is_file():
                index.setdefault(stem, entry.path)
    return index


def _first(value):
    """VAST / MSR-VTT store some captions as lists: take the first non-empty one."""
    if isinstance(value, list):
        return next((v for v in value if v), None)
    return value


def load_annotations(path: str | Path, media_roots: dict[str, str | Path] | None = None,
                     modalities: Iterable[str] = DEFAULT_MODALITIES, column_map: dict[str, str] | None = None,
                     id_column: str = "id", label_column: str | None = "label",
                     modality_kinds: dict[str, str] | None = None, streaming: bool = False):
    """A generic loader: one annotation file (JSON, JSONL, CSV or parquet) plus media folders.

    `column_map` maps a modality to its column in the file (default: the modality's own name). A media value
    that is a relative path resolves against `media_roots[modality]`. An empty or absent value means the
    modality is missing for that row.
    """
    path = Path(path)
    modalities = list(modalities)
    kinds = {**DEFAULT_MODALITY_KINDS, **(modality_kinds or {})}
    column_map = {m: (column_map or {}).get(m, m) for m in modalities}
    roots = {m: Path(r) for m, r in (media_roots or {}).items()}
    unknown = sorted(set(roots) - set(modalities))
    if unknown:
        raise ValueError(f"media_roots names unknown modalities {unknown}; the modalities are {modalities}.")
    records, has_label = [], False
    for i, row in enumerate(_read_records(path)):
        values = {}
        for name in modalities:
            value = _first(row.get(column_map[name]))
            if value is not None and value != "" and kinds.get(name, "text") != "text" and name in roots:
                value = str(roots[name] / value) if not os.path.isabs(str(value)) else value
            values[name] = value
        label = row.get(label_column) if label_column else None
        label = None if label in (None, "") else label
        has_label |= label is not None
        records.append(_record(row.get(id_column, i), values, modalities, label))
    if has_label and any("label" not in r for r in records):
        raise ValueError(f"{path}: some rows have a '{label_column}' and some do not.")
    return _build(records, modalities, has_label, streaming)


def load_vast(annotation_file: str | Path, video_dir: str | Path | None = None, audio_dir: str | Path | None = None,
              modalities: Iterable[str] = DEFAULT_MODALITIES, streaming: bool = False):
    """VAST-150K (TXH-mercury/VAST): a JSON list with `clip_id`, `vast_cap` (caption; a list in some releases:
    the first is used), `subtitle`, and media `{clip_id}.<ext>` in `video_dir` / `audio_dir` (any common
    extension). A clip whose video or audio file is absent has that modality marked missing."""
    modalities = list(modalities)
    videos = _media_index(video_dir, VIDEO_EXTENSIONS)
    audios = _media_index(audio_dir, AUDIO_EXTENSIONS)
    records, has_label = [], False
    for row in _read_records(Path(annotation_file)):
        clip = str(row["clip_id"])
        values = {"vision": videos.get(clip), "audio": audios.get(clip), "text": _first(row.get("vast_cap")),
                  "subtitle": _first(row.get("subtitle"))}
        has_label |= row.get("label") is not None
        records.append(_record(clip, values, modalities, row.get("label")))
    return _build(records, modalities, has_label, streaming)


def load_msrvtt(annotation_file: str | Path, video_dir: str | Path, audio_dir: str | Path | None = None,
                modalities: Iterable[str] = DEFAULT_MODALITIES, streaming: bool = False):
    """MSR-VTT: a JSON list of `{"video_id", "caption"}` (a list of captions gives one row per caption),
    videos `{video_id}.mp4`; audio where `audio_dir` has `{video_id}.<ext>` (else the audio is missing)."""
    modalities = list(modalities)
    videos = _media_index(video_dir, VIDEO_EXTENSIONS)
    audios = _media_index(audio_dir, AUDIO_EXTENSIONS)
    records, has_label = [], False
    for row in _read_records(Path(annotation_file)):
        video = str(row["video_id"])
        captions = row.get("caption", row.get("sentence"))
        captions = captions if isinstance(captions, list) else [captions]
        for n, caption in enumerate(captions):
            values = {"vision": videos.get(video), "audio": audios.get(video), "text": caption}
            has_label |= row.get("label") is not None
            records.append(_record(f"{video}#{n}" if len(captions) > 1 else video, values, modalities,
                                   row.get("label")))
    return _build(records, modalities, has_label, streaming)


def load_audiocaps(csv_file: str | Path, audio_dir: str | Path, modalities: Iterable[str] = DEFAULT_MODALITIES,
                   streaming: bool = False):
    """AudioCaps: a CSV with `audiocap_id, youtube_id, start_time, caption`; audio `{youtube_id}.<ext>` or
    `{audiocap_id}.<ext>` in `audio_dir` (rows whose clip is absent, as often with YouTube, are dropped and
    counted in the log: they would have no audio and a caption alone)."""
    modalities = list(modalities)
    audios = _media_index(audio_dir, AUDIO_EXTENSIONS)
    records, has_label, dropped = [], False, 0
    for row in _read_records(Path(csv_file)):
        audio = audios.get(str(row.get("youtube_id"))) or audios.get(str(row.get("audiocap_id")))
        if audio is None:
            dropped += 1
            continue
        label = row.get("label")
        label = None if label in (None, "") else label
        has_label |= label is not None
        records.append(_record(row.get("audiocap_id", len(records)), {"audio": audio, "text": row.get("caption")},
                               modalities, label))
    if dropped:
        logger.warning("AudioCaps: %d rows of %s have no audio file in %s and were dropped.", dropped, csv_file,
                       audio_dir)
    return _build(records, modalities, has_label, streaming)


def align_modalities(dataset, modalities: Iterable[str]):
    """The dataset with exactly `modalities` as modality columns (absent ones added as None, in this order)."""
    modalities = list(modalities)
    current = dataset_modalities(dataset)
    extra = [m for m in current if m not in modalities]
    if extra:
        raise ValueError(f"The dataset has modalities {extra} that are not in {modalities}.")
    if current == modalities:
        return dataset
    position = {m: current.index(m) for m in current}

    def realign(batch):
        masks = batch["modality_mask"]
        size = len(masks)
        for name in modalities:
            if name not in batch:
                batch[name] = [None] * size
        batch["modality_mask"] = [[mask[position[m]] if m in position else False for m in modalities]
                                  for mask in masks]
        return batch

    with_label = "label" in (dataset.column_names or [])
    return dataset.map(realign, batched=True, features=features_for(modalities, with_label))


def concatenate(datasets: list, modalities: Iterable[str] | None = None):
    """Concatenate CalMRL datasets, aligning their modality columns and masks first."""
    modalities = list(modalities) if modalities is not None else list(
        dict.fromkeys(m for ds in datasets for m in dataset_modalities(ds)))
    aligned = [align_modalities(ds, modalities) for ds in datasets]
    labels = ["label" in ds.column_names for ds in aligned]
    if any(labels) and not all(labels):
        aligned = [ds.remove_columns("label") if "label" in ds.column_names else ds for ds in aligned]
    return concatenate_datasets(aligned)


def for_process(dataset, rank: int, world_size: int):
    """This process's shard of a map-style or streaming dataset (`datasets.distributed.split_dataset_by_node`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


__all__ = ["align_modalities", "concatenate", "dataset_modalities", "features_for", "for_process",
           "load_annotations", "load_audiocaps", "load_msrvtt", "load_vast"]
