"""Loaders: annotation files + media folders -> `datasets` in the CalMRL schema, missing modalities marked.

Every loader returns the schema of `calmrl_hf.data.schema` (`id`, one string column per modality holding text or
a media file path, None where missing, `modality_mask`, `label`), as a `datasets.Dataset`, or with
`streaming=True` as a `datasets.IterableDataset` (sharded, for `for_process` and DataLoader workers). Media stay
paths until `with_media_decoding`. A row with no modality at all is dropped, with a count in the log.

- `load_annotations`: any corpus, from JSON / JSONL / CSV / TSV / parquet plus one media folder per modality.
- `load_vast`: VAST-150K / VAST-27M annotations (the VAST code base's JSON).
- `load_msrvtt`: MSR-VTT (the official JSON, the VAST code base's JSON, or CSV).
- `load_audiocaps`: AudioCaps (the official CSV, or the VAST code base's JSON).

Media files of the corpus loaders are looked up by name (stem) in their folder, top level only, with any of the
extensions in `VIDEO_EXTENSIONS` / `AUDIO_EXTENSIONS` (the first listed wins when several exist). Every media path
stays inside its media folder: an id never becomes a path (`../x` finds no file), and a file that is a symlink
pointing out of its folder is refused with a `MediaPathError` naming the row, id and file (with
`on_bad_path="skip"`: that modality is missing in that row, with a warning naming it).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, IterableDataset

from ..configuration_calmrl import DEFAULT_MODALITIES
from ..processing_calmrl import normalize_modalities
from .media import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    MediaPathError,
    check_inside_root,
    media_path_in,
)
from .schema import dataset_modalities, features_for


logger = logging.getLogger(__name__)

CORPUS_MODALITIES = DEFAULT_MODALITIES  # what the VAST / MSR-VTT / AudioCaps loaders can fill
STREAMING_SHARDS = 16  # shards of an in-memory streaming dataset: divisible by 1, 2, 4, 8, 16 processes


# ---------------------------------------------------------------------------------------------------- reading
def read_annotations(path: str | os.PathLike) -> Iterator[dict]:
    """The rows of a JSON, JSONL, CSV, TSV or parquet annotation file, as dicts.

    JSON may be a list of objects, an object holding such a list under `"annotations"`, `"sentences"` (the
    official MSR-VTT file) or `"data"`, or an object of objects keyed by id (the key becomes `"id"` unless the
    row has one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: invalid JSON ({error.msg}).") \
                from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error}).") from error
        if isinstance(data, dict):
            keys = [key for key in ("annotations", "sentences", "data") if isinstance(data.get(key), list)]
            listed = data[keys[0]] if keys else None
            if listed is not None:
                data = listed
            elif data and all(isinstance(value, dict) for value in data.values()):
                data = [{"id": key, **value} for key, value in data.items()]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ValueError(f"{path}: expected a JSON list of objects (or an object holding one under "
                             f"'annotations', 'sentences' or 'data'), got {type(data).__name__}.")
        yield from data
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number}: invalid JSON ({error}).") from error
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            try:
                yield from csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            except (UnicodeDecodeError, csv.Error) as error:
                raise ValueError(f"{path}: unreadable {suffix[1:].upper()} ({error}).") from error
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unsupported annotation format {suffix!r} (use .json, .jsonl, .csv, .tsv or "
                         f".parquet).")


def _clean(value):
    """A cell as a non-empty string, or None: None, NaN, blank strings and empty lists are missing; a list gives
    its first non-empty entry (annotation files keep several captions per clip as lists)."""
    if isinstance(value, (list, tuple)):
        return next((v for v in map(_clean, value) if v is not None), None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _captions(value) -> list[str]:
    """Every non-empty caption of a cell (a string or a list of strings)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [c for c in map(_clean, values) if c is not None]


def _label(value, where: str):
    value = _clean(value)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise ValueError(f"{where}: label {value!r} is not an integer class index.")
    return int(number)


# Columns only one corpus's annotation files have: how a file given to the wrong loader is recognised.
FORMAT_SIGNATURES = {"vast": ("vast_cap",), "msrvtt": ("sentence", "sen_id"),
                     "audiocaps": ("youtube_id", "audiocap_id")}


def check_format(path, columns: set[str], loader: str, has_captions: bool) -> None:
    """Refuse an annotation file of another corpus: no row had a caption this loader reads, and the file has
    columns that only another corpus's files have."""
    if has_captions:
        return
    this = loader.removeprefix("load_")
    others = [name for name, keys in FORMAT_SIGNATURES.items() if name != this and columns & set(keys)]
    if others:
        raise ValueError(f"{path}: no row has a caption {loader} reads, and its columns {sorted(columns)} are those "
                         f"of a {others[0]} annotation file: load it with load_{others[0]} (calmrl: --format "
                         f"{others[0]}).")


def _first_key(row: dict, keys: Iterable[str]):
    return next((row[k] for k in keys if _clean(row.get(k)) is not None), None)


def _check_on_bad_path(value: str) -> str:
    if value not in ("raise", "skip"):
        raise ValueError(f"on_bad_path must be 'raise' or 'skip', got {value!r}.")
    return value


class _MediaIndex:
    """File stem -> path of the media files in one folder (one listing, so 150K clips cost one `scandir`).

    Names come from the folder's listing, never from the annotation file, so they cannot lead out of it; an entry
    that is a symlink pointing out of the folder is refused (`MediaPathError` naming the row) when a row uses it."""

    def __init__(self, folder, extensions: tuple[str, ...], argument: str, on_bad_path: str = "raise"):
        self.paths: dict[str, str] = {}
        self.folder, self.on_bad_path = folder, _check_on_bad_path(on_bad_path)
        if folder is None:
            return
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{argument}: media folder not found: {folder}")
        rank = {ext: i for i, ext in enumerate(extensions)}
        best: dict[str, int] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                ext = ext.lower()
                if ext in rank and rank[ext] < best.get(stem, len(rank)) and entry.is_file():
                    best[stem] = rank[ext]
                    self.paths[stem] = entry.path

    def find(self, *stems, where: str = "") -> str | None:
        path = next((self.paths[s] for s in stems if s is not None and s in self.paths), None)
        if path is not None and os.path.islink(path):
            try:
                check_inside_root(path, self.folder, where or f"the media file {path}", shown=os.path.basename(path))
            except MediaPathError as error:
                if self.on_bad_path == "raise":
                    raise
                logger.warning("Skipping a media path (the modality is missing in that row): %s", error)
                return None
        return path


# ---------------------------------------------------------------------------------------------------- building
def _record(example_id, values: dict, names: list[str], label=None) -> dict:
    record = {"id": str(example_id)}
    for name in names:
        record[name] = _clean(values.get(name))
    record["modality_mask"] = [record[name] is not None for name in names]
    record["label"] = label
    return record


def _build(records: list[dict], names: list[str], streaming: bool, source):
    """The dataset of `records` (rows without any modality dropped and counted)."""
    kept = [record for record in records if any(record["modality_mask"])]
    if len(kept) < len(records):
        logger.warning("%s: dropped %d of %d rows that have no modality at all.", source, len(records) - len(kept),
                       len(records))
    if not kept:
        logger.warning("%s: the dataset is empty.", source)
    features = features_for(names)
    if streaming:
        count = max(1, min(STREAMING_SHARDS, len(kept)))
        bounds = [round(i * len(kept) / count) for i in range(count + 1)]  # contiguous, sizes differ by <= 1
        shards = [kept[bounds[i] : bounds[i + 1]] for i in range(count)]
        return IterableDataset.from_generator(_yield_shards, features=features, gen_kwargs={"shards": shards})
    return Dataset.from_dict({column: [r[column] for r in kept] for column in features}, features=features)


def _yield_shards(shards: list[list[dict]]) -> Iterator[dict]:
    for shard in shards:
        yield from shard


def _output_modalities(modalities, loader: str) -> list[str]:
    names = [name for name, _ in normalize_modalities(modalities)]
    unknown = [m for m in names if m not in CORPUS_MODALITIES]
    if unknown:
        raise ValueError(f"{loader} fills the modalities {list(CORPUS_MODALITIES)}; got {unknown} in modalities. Add "
                         f"other (always missing) modalities with calmrl_hf.data.align_modalities.")
    return names


# ---------------------------------------------------------------------------------------------------- generic
def load_annotations(path, media_roots: dict | None = None, modalities=None, column_map: dict | None = None,
                     id_column: str = "id", label_column: str | None = "label", streaming: bool = False,
                     on_bad_path: str = "raise"):
    """Any corpus: an annotation file (JSON, JSONL, CSV, TSV or parquet; or a list of files) plus media folders.

    Args:
        path (`str`, `os.PathLike` or a list of them): the annotation file(s). With `streaming=True`, each file is
            one shard, read only when iterated (for corpora whose annotations do not fit in memory).
        media_roots (`dict[str, str]`, *optional*): modality -> folder that relative media paths resolve against.
            A relative path of a media modality without a root resolves against its annotation file's folder;
            URLs are kept. Every path must resolve inside its root (the annotation file's folder without one):
            an absolute path under a root, `..` leading out of it or a symlink inside it pointing out of it is a
            `MediaPathError` (a ValueError) naming the file, row, id and path; an absolute path of a modality
            without a root is kept (the annotation file names it). A missing file is reported (or skipped) by
            `with_media_decoding`.
        modalities (*optional*): the modalities, in order, with kinds (`{"image": "vision", "caption": "text"}`),
            or default names (vision, audio, text, subtitle; the default).
        column_map (`dict[str, str]`, *optional*): modality -> its column in the file (default: its own name).
        id_column (`str`, defaults to `"id"`): the id column (the row number where a row has none).
        label_column (`str`, *optional*, defaults to `"label"`): an integer class column, if any.
        streaming (`bool`, defaults to False): return an `IterableDataset`.
        on_bad_path (`"raise"` or `"skip"`, defaults to `"raise"`): `"skip"` makes a media path that leads out of
            its root missing in that row (a warning naming it) instead of raising `MediaPathError`.

    A missing, empty or NaN value makes its modality missing for that row; a list value gives its first entry.
    """
    paths = [Path(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not paths:
        raise ValueError("path is an empty list: give at least one annotation file.")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"Annotation file not found: {p}")
    pairs = normalize_modalities(modalities)
    kinds = dict(pairs)
    roots = {m: str(r) for m, r in (media_roots or {}).items()}
    unknown = sorted(set(roots) - set(kinds))
    if unknown:
        raise ValueError(f"media_roots names {unknown}, which are not among the modalities {list(kinds)}.")
    text_roots = [m for m in roots if kinds[m] == "text"]
    if text_roots:
        raise ValueError(f"media_roots gives folders for text-kind modalities {text_roots}; only vision and audio "
                         f"modalities hold media paths.")
    column_map = dict(column_map or {})
    unmapped = sorted(set(column_map) - set(kinds))
    if unmapped:
        raise ValueError(f"column_map names {unmapped}, which are not among the modalities {list(kinds)}.")
    spec = {"kinds": kinds, "roots": roots, "columns": {m: column_map.get(m, m) for m in kinds},
            "id_column": id_column, "label_column": label_column, "on_bad_path": _check_on_bad_path(on_bad_path)}
    names = list(kinds)
    if streaming:
        return IterableDataset.from_generator(_generate_annotation_records, features=features_for(names),
                                              gen_kwargs={"paths": [str(p) for p in paths], "spec": spec})
    records = list(_generate_annotation_records([str(p) for p in paths], spec, keep_empty=True))
    return _build(records, names, False, paths[0] if len(paths) == 1 else f"{len(paths)} annotation files")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _media_value(value: str, name: str, roots: dict, folder: str, where: str) -> str:
    """A media path of the annotation file, joined to its modality's root and confined to it (`media_path_in`);
    without a root, a relative path is confined to the annotation file's folder and an absolute one kept."""
    if _URL.match(value):
        return value
    if name in roots:
        return media_path_in(roots[name], value, where)
    if os.path.isabs(value):
        return value
    return media_path_in(folder, value, where)


def _generate_annotation_records(paths: list[str], spec: dict, keep_empty: bool = False) -> Iterator[dict]:
    kinds, roots, columns = spec["kinds"], spec["roots"], spec["columns"]
    for path in map(Path, paths):
        dropped = 0
        for number, row in enumerate(read_annotations(path)):
            example_id = _clean(row.get(spec["id_column"]))
            values = {}
            for name, kind in kinds.items():
                value = _clean(row.get(columns[name]))
                if value is not None and kind != "text":
                    where = f"{path}, row {number} (id {number if example_id is None else example_id!r}), {name}"
                    try:
                        value = _media_value(value, name, roots, str(path.parent), where)
                    except MediaPathError as error:
                        if spec.get("on_bad_path", "raise") == "raise":
                            raise
                        logger.warning("Skipping a media path (the modality is missing in that row): %s", error)
                        value = None
                values[name] = value
            label_column = spec["label_column"]
            label = _label(row.get(label_column), f"{path}, row {number}") if label_column else None
            record = _record(number if example_id is None else example_id, values, list(kinds), label)
            if keep_empty or any(record["modality_mask"]):
                yield record
            else:
                dropped += 1
        if dropped:
            logger.warning("%s: dropped %d rows that have no modality at all.", path, dropped)


# ---------------------------------------------------------------------------------------------------- corpora
def load_vast(annotation_file, video_dir=None, audio_dir=None, modalities=None, streaming: bool = False,
              on_bad_path: str = "raise"):
    """VAST-150K (or VAST-27M) in the format of the VAST code base (TXH-mercury/VAST, and GRAM / PMRL built on it).

    The annotation file is a JSON list (or JSONL) of clips. Read per clip:

    - id: `clip_id` (else `video_id`, else `id`);
    - text: the omni-modality caption `vast_cap` (else `desc`, else `caption`); a list gives its first entry;
    - subtitle: `subtitle` (ASR of the clip's speech; often empty: then missing);
    - vision: `{id}.<ext>` in `video_dir` (mp4, mkv, webm, ...), audio: `{id}.<ext>` in `audio_dir` (wav, flac,
      mp3, ..., or a video container's audio track); a clip whose file is absent has that modality missing;
    - label: `label` where present.

    The per-modality captions of VAST-27M (`vision_cap`, `audio_cap`) are not read.
    """
    names = _output_modalities(modalities, "load_vast")
    videos = _MediaIndex(video_dir, VIDEO_EXTENSIONS + IMAGE_EXTENSIONS, "video_dir", on_bad_path)
    audios = _MediaIndex(audio_dir, AUDIO_EXTENSIONS, "audio_dir", on_bad_path)
    records, columns = [], set()
    for number, row in enumerate(read_annotations(annotation_file)):
        columns.update(row)
        clip = _clean(_first_key(row, ("clip_id", "video_id", "id")))
        if clip is None:
            check_format(annotation_file, columns, "load_vast", has_captions=False)
            raise ValueError(f"{annotation_file}, row {number}: no clip_id / video_id / id.")
        where = f"{annotation_file}, row {number} (id {clip!r})"
        values = {"vision": videos.find(clip, where=where), "audio": audios.find(clip, where=where),
                  "text": _first_key(row, ("vast_cap", "desc", "caption")), "subtitle": row.get("subtitle")}
        records.append(_record(clip, values, names, _label(row.get("label"), f"{annotation_file}, row {number}")))
    check_format(annotation_file, columns, "load_vast",
                 "text" not in names or any(r["text"] is not None for r in records))
    return _build(records, names, streaming, annotation_file)


def load_msrvtt(annotation_file, video_dir, audio_dir=None, modalities=None, require_video: bool = True,
                streaming: bool = False, on_bad_path: str = "raise"):
    """MSR-VTT: video + caption (+ subtitle and audio where available), one row per caption.

    Accepted annotation files (rows with `video_id` and a caption under `caption`, `desc` or `sentence`, a string or
    a list of strings):

    - the official `train_val_videodatainfo.json` / `MSRVTT_data.json` (`{"videos": [...], "sentences":
      [{"video_id", "caption", "sen_id"}, ...]}`);
    - the VAST code base's `descs_ret_*.json` (`[{"video_id", "desc", "subtitle"}, ...]`: subtitles are read);
    - CSV such as `MSRVTT_JSFUSION_test.csv` (`video_id`, `sentence`).

    Videos are `{video_id}.<ext>` in `video_dir`; audio `{video_id}.<ext>` in `audio_dir` where that file exists
    (else audio is missing). The id is the video id, with `#n` appended when the video has several captions. Rows
    whose video file is absent are dropped (counted in the log) unless `require_video=False`.
    """
    names = _output_modalities(modalities, "load_msrvtt")
    videos = _MediaIndex(video_dir, VIDEO_EXTENSIONS, "video_dir", on_bad_path)
    audios = _MediaIndex(audio_dir, AUDIO_EXTENSIONS, "audio_dir", on_bad_path)
    entries, columns = [], set()  # (video_id, caption, subtitle, label)
    for number, row in enumerate(read_annotations(annotation_file)):
        columns.update(row)
        video = _clean(_first_key(row, ("video_id", "clip_id", "id")))
        if video is None:
            raise ValueError(f"{annotation_file}, row {number}: no video_id.")
        label = _label(row.get("label"), f"{annotation_file}, row {number}")
        captions = _captions(_first_key(row, ("caption", "desc", "sentence"))) or [None]
        entries += [(video, caption, row.get("subtitle"), label, number) for caption in captions]
    check_format(annotation_file, columns, "load_msrvtt", any(caption is not None for _, caption, *_ in entries))
    per_video = Counter(video for video, *_ in entries)
    seen: Counter = Counter()
    records, dropped = [], 0
    for video, caption, subtitle, label, number in entries:
        n = seen[video]
        seen[video] += 1
        where = f"{annotation_file}, row {number} (id {video!r})"
        path = videos.find(video, where=where)
        if path is None and require_video:
            dropped += 1
            continue
        values = {"vision": path, "audio": audios.find(video, where=where), "text": caption, "subtitle": subtitle}
        records.append(_record(f"{video}#{n}" if per_video[video] > 1 else video, values, names, label))
    if dropped:
        logger.warning("MSR-VTT: %d of %d captions of %s have no video file in %s and were dropped.", dropped,
                       len(entries), annotation_file, video_dir)
    return _build(records, names, streaming, annotation_file)


def load_audiocaps(csv_file, audio_dir, modalities=None, require_audio: bool = True, streaming: bool = False,
                   on_bad_path: str = "raise"):
    """AudioCaps: audio + caption, one row per caption.

    Accepted annotation files:

    - the official CSV (`audiocap_id, youtube_id, start_time, caption`): the audio of a row is the first file in
      `audio_dir` named (any audio extension) `{youtube_id}_{start:.3f}_{start+10:.3f}` (the VAST / GRAM naming),
      `{youtube_id}_{start_time}`, `Y{youtube_id}` (AudioSet naming), `{youtube_id}` or `{audiocap_id}`; the id
      is `audiocap_id`;
    - the VAST code base's JSON (`[{"video_id": "{youtube_id}_{start}_{end}", "caption": str or list}]`): the audio
      is `{video_id}.<ext>`; the id is `video_id` (`#n` appended for several captions).

    YouTube clips often cannot be downloaded any more: rows whose audio file is absent are dropped (counted in the
    log) unless `require_audio=False`. A `label` column is read where present.
    """
    names = _output_modalities(modalities, "load_audiocaps")
    audios = _MediaIndex(audio_dir, AUDIO_EXTENSIONS, "audio_dir", on_bad_path)
    entries, columns = [], set()  # (id, audio path, caption, label)
    for number, row in enumerate(read_annotations(csv_file)):
        columns.update(row)
        label = _label(row.get("label"), f"{csv_file}, row {number}")
        youtube_id = _clean(row.get("youtube_id"))
        if youtube_id is not None:
            start = _clean(row.get("start_time"))
            stems = [youtube_id]
            if start is not None:
                try:
                    seconds = float(start)
                    stems = [f"{youtube_id}_{seconds:.3f}_{seconds + 10:.3f}", f"{youtube_id}_{start}",
                             f"{youtube_id}_{seconds:g}"]
                except ValueError:
                    stems = [f"{youtube_id}_{start}"]
            stems += [f"Y{youtube_id}", youtube_id, _clean(row.get("audiocap_id"))]
            example_id = _clean(row.get("audiocap_id")) or str(number)
            found = audios.find(*stems, where=f"{csv_file}, row {number} (id {example_id!r})")
            entries += [(example_id, found, caption, label)
                        for caption in (_captions(row.get("caption")) or [None])]
        else:
            clip = _clean(_first_key(row, ("video_id", "clip_id", "id")))
            if clip is None:
                raise ValueError(f"{csv_file}, row {number}: neither youtube_id nor video_id.")
            path = audios.find(clip, os.path.splitext(clip)[0], where=f"{csv_file}, row {number} (id {clip!r})")
            captions = _captions(_first_key(row, ("caption", "desc"))) or [None]
            entries += [(f"{clip}#{n}" if len(captions) > 1 else clip, path, caption, label)
                        for n, caption in enumerate(captions)]
    check_format(csv_file, columns, "load_audiocaps", any(caption is not None for _, _, caption, _ in entries))
    records, dropped = [], 0
    for example_id, path, caption, label in entries:
        if path is None and require_audio:
            dropped += 1
            continue
        records.append(_record(example_id, {"audio": path, "text": caption}, names, label))
    if dropped:
        logger.warning("AudioCaps: %d of %d rows of %s have no audio file in %s and were dropped.", dropped,
                       len(entries), csv_file, audio_dir)
    return _build(records, names, streaming, csv_file)


__all__ = ["DEFAULT_MODALITIES", "dataset_modalities", "load_annotations", "load_audiocaps", "load_msrvtt",
           "load_vast", "read_annotations"]
