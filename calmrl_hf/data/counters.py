"""Counts that stay right when DataLoader worker processes do the counting.

Media are decoded, and batches collated, inside DataLoader workers when `num_workers > 0`: a plain Python
counter there would count in the worker's copy and the main process would read 0. `SharedCounts` keeps its
numbers in shared memory, which worker processes inherit (fork) or receive when they start (spawn, forkserver).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable
from multiprocessing.context import get_spawning_popen


# A lock made in the "fork" context cannot be handed to a process started by "spawn" or "forkserver" (as DataLoader
# workers may be); one made in "spawn" can be handed to processes of every start method.
_CONTEXT = multiprocessing.get_context("spawn")

class SharedCounts:
    """Integer counts under fixed names, shared with the processes this object is handed to when they start.

    Copies made by `copy.deepcopy` (which `datasets` makes of a dataset's transform) share the same counts. Pickled
    outside a process start (e.g. for `datasets` fingerprinting), it carries a snapshot of the counts instead.
    """

    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"SharedCounts needs distinct names, got {list(self.names)}.")
        self._values = _CONTEXT.Array("q", len(self.names))  # shared memory, with its own lock

    def add(self, name: str, count: int = 1) -> None:
        index = self._index(name)
        with self._values.get_lock():
            self._values[index] += count

    def __getitem__(self, name: str) -> int:
        return int(self._values[self._index(name)])

    def as_dict(self) -> dict[str, int]:
        with self._values.get_lock():
            return {name: int(value) for name, value in zip(self.names, self._values)}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"No count named {name!r}; the names are {list(self.names)}.") from None

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        if get_spawning_popen() is None:  # not a process start: shared memory cannot travel, carry a snapshot
            state["_values"] = list(self._values)
        return state

    def __setstate__(self, state):
        values = state["_values"]
        if isinstance(values, list):
            state["_values"] = _CONTEXT.Array("q", values)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.as_dict()})"


__all__ = ["SharedCounts"]
