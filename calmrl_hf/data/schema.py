"""The one schema every CalMRL dataset has, and combining datasets that cover different modalities.

Columns, in this order:

- `id` (string): the example's identifier in its source corpus;
- one column per modality, in modality order (string or None): text for text-kind modalities, a media file path
  for vision and audio (decoded lazily by `with_media_decoding`), None where the modality is missing;
- `modality_mask` (list of bool, one per modality column, in column order): True where observed;
- `label` (int64 or None): a class label where the corpus has one (class-level retrieval), else None.

Because every loader writes exactly this schema, `datasets.concatenate_datasets` and
`datasets.interleave_datasets` work directly on datasets with the same modality list. For datasets over
different modality lists, `align_modalities` (or `concatenate` / `interleave`, which call it) adds the absent
modality columns as None and rewrites the masks, so a mask entry always matches its column.
"""

from __future__ import annotations

import logging

from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets, interleave_datasets

from ..processing_calmrl import normalize_modalities


logger = logging.getLogger(__name__)

NON_MODALITY_COLUMNS = ("id", "label", "labels", "modality_mask", "index")


def features_for(modalities) -> Features:
    """The `datasets.Features` of a CalMRL dataset over `modalities` (names, or a dict/pairs with kinds)."""
    columns = {"id": Value("string")}
    columns.update({name: Value("string") for name in _modality_names(modalities)})
    columns["modality_mask"] = List(Value("bool"))
    columns["label"] = Value("int64")
    return Features(columns)


def dataset_modalities(dataset) -> list[str]:
    """The modality columns of a CalMRL dataset, in order (every column except id / label / modality_mask / index)."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # DatasetDict: its splits share the schema
        names = next(iter(names.values()))
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return [c for c in names or [] if c not in NON_MODALITY_COLUMNS]


def align_modalities(dataset, modalities):
    """`dataset` (map-style or iterable) with exactly `modalities` as modality columns, in that order.

    Modalities the dataset lacks are added as None (mask False); its masks are rewritten in the new order; `label`
    is added as None where absent. A modality of the dataset that `modalities` lacks is an error (drop it first
    with `dataset.remove_columns`).
    """
    names = _modality_names(modalities)
    _check_dataset(dataset, "dataset")
    current = dataset_modalities(dataset)
    extra = [m for m in current if m not in names]
    if extra:
        raise ValueError(f"The dataset has modalities {extra} that are not in modalities={names}; drop them first "
                         f"(dataset.remove_columns({extra})).")
    columns = dataset.column_names or []
    if "id" not in columns or "modality_mask" not in columns:
        raise ValueError(f"A CalMRL dataset needs 'id' and 'modality_mask' columns; this one has {columns}.")
    target = features_for(names)
    if list(columns) == list(target) and dataset.features == target:
        return dataset
    position = {m: i for i, m in enumerate(current)}

    def realign(batch):
        size = len(batch["id"])
        out = {"id": batch["id"]}
        for name in names:
            out[name] = batch[name] if name in batch else [None] * size
        masks = batch["modality_mask"]
        for mask in masks:
            if len(mask) != len(current):
                raise ValueError(f"A modality_mask has {len(mask)} entries but the dataset has {len(current)} "
                                 f"modality columns {current}.")
        out["modality_mask"] = [[bool(mask[position[m]]) if m in position else False for m in names] for mask in masks]
        out["label"] = batch["label"] if "label" in batch else [None] * size
        return out

    return dataset.map(realign, batched=True, features=target, remove_columns=list(columns))


def concatenate(datasets: list, modalities=None):
    """Concatenate CalMRL datasets (map-style or iterable) over the union of their modalities (or `modalities`),
    aligning each first so every mask matches its columns."""
    names = _union_modalities(datasets, modalities)
    return concatenate_datasets([align_modalities(ds, names) for ds in datasets])


def interleave(datasets: list, modalities=None, probabilities=None, seed: int | None = None,
               stopping_strategy: str = "first_exhausted"):
    """`datasets.interleave_datasets` over CalMRL datasets aligned to the union of their modalities (or
    `modalities`), e.g. to mix a full-modality corpus with partial ones at chosen rates."""
    names = _union_modalities(datasets, modalities)
    return interleave_datasets([align_modalities(ds, names) for ds in datasets], probabilities=probabilities,
                               seed=seed, stopping_strategy=stopping_strategy)


def _union_modalities(datasets, modalities) -> list[str]:
    if not isinstance(datasets, (list, tuple)) or not datasets:
        raise ValueError(f"datasets must be a non-empty list of datasets, got {type(datasets).__name__}.")
    for i, ds in enumerate(datasets):
        _check_dataset(ds, f"datasets[{i}]")
    if modalities is not None:
        return _modality_names(modalities)
    return list(dict.fromkeys(m for ds in datasets for m in dataset_modalities(ds)))


def _modality_names(modalities) -> list[str]:
    if isinstance(modalities, (list, tuple)) and all(isinstance(m, str) for m in modalities):
        names = list(modalities)  # names only: no kind needed here
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"modalities must be distinct names, got {names}.")
        reserved = [m for m in names if m in NON_MODALITY_COLUMNS]
        if reserved:
            raise ValueError(f"{reserved} cannot name modalities: they are the columns {list(NON_MODALITY_COLUMNS)}.")
        return names
    return [name for name, _ in normalize_modalities(modalities)]


def _check_dataset(dataset, argument: str) -> None:
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"{argument} must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")


__all__ = ["NON_MODALITY_COLUMNS", "align_modalities", "concatenate", "dataset_modalities", "features_for",
           "interleave"]
