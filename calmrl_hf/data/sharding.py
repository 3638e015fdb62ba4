"""Each process's share of a dataset, for multi-process training."""

from __future__ import annotations

import logging

from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node


logger = logging.getLogger(__name__)


def for_process(dataset, rank: int, world_size: int):
    """This process's share of a map-style or streaming dataset (`datasets.distributed.split_dataset_by_node`).

    A map-style dataset is split into `world_size` contiguous blocks (sizes differ by at most one). A streaming
    dataset whose number of shards is a multiple of `world_size` gives each process whole shards (the loaders
    make 16 shards of near-equal size for in-memory annotations; `load_annotations(streaming=True)` one per file);
    otherwise every process reads the whole stream and keeps one example in `world_size`.

    Processes may end up with slightly different numbers of examples; a training loop that steps all processes
    together should stop at the shortest (e.g. `drop_last=True` and a step budget).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the dataset to split.
        rank (`int`): this process's index, in `[0, world_size)` (`accelerator.process_index`).
        world_size (`int`): the number of processes (`accelerator.num_processes`).
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    if isinstance(dataset, IterableDataset) and dataset.num_shards % world_size:
        logger.info("The stream has %d shards, not a multiple of %d processes: each process reads it all and keeps "
                    "one example in %d.", dataset.num_shards, world_size, world_size)
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


__all__ = ["for_process"]
