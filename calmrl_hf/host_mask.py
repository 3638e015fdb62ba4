"""A bool mask on the device together with its copy on the host, so that indexing with it reads nothing back.

`x[mask]`, `mask.nonzero()`, `bool(mask.all())` each wait for the device to finish and copy to the host (a
device-to-host synchronisation on a GPU). The modality mask of a batch is read back ONCE, where the batch enters the
model (with the door's value checks, `modality_inputs.raise_bad_values`); from then on its counts, patterns and
branches come from the host copy, and row indices are found on the device with `torch.nonzero_static` sized by the
host's count: the same rows, in the same order, as `nonzero` and boolean indexing give. Imports torch and numpy
only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import torch


def rows_where(flags: torch.Tensor, count: int) -> torch.Tensor:
    """The indices [count] of the True entries of a 1-D bool tensor holding `count` of them, in order:
    `flags.nonzero().flatten()` without reading the count back."""
    try:
        return torch.nonzero_static(flags, size=count).flatten()
    except NotImplementedError:  # a backend without nonzero_static: the reading version
        return flags.nonzero().flatten()


class HostMask:
    """A bool tensor `device` ([B, k] masks, or [k] flags) and `values`, the same entries as a numpy array.

    Derived masks are built on both sides at once (`&`, `|`, `~`, `any_per_row`, `select_rows`), never by reading the
    device tensor back.
    """

    __slots__ = ("device", "values", "_rows")

    def __init__(self, device: torch.Tensor, values):
        values = np.asarray(values, dtype=bool)
        if tuple(values.shape) != tuple(device.shape):
            raise ValueError(f"The host copy of a mask has shape {list(values.shape)}, the mask {list(device.shape)}.")
        self.device, self.values, self._rows = device, values, {}

    @classmethod
    def read(cls, mask: torch.Tensor) -> "HostMask":
        """The mask and its values read back: one sync, for callers with no door that read it already."""
        return cls(mask, mask.detach().cpu().numpy())

    @classmethod
    def constant(cls, values, device: torch.device) -> "HostMask":
        """Flags known on the host (e.g. the modalities a step may impute), put on the device by per-entry fills
        instead of a blocking host-to-device copy."""
        values = np.asarray(values, dtype=bool)
        tensor = torch.zeros(values.shape, dtype=torch.bool, device=device)
        for index in zip(*np.nonzero(values)):
            tensor[index] = True
        return cls(tensor, values)

    @classmethod
    def all_true(cls, mask: torch.Tensor) -> "HostMask":
        """`mask`, known to hold only True entries (e.g. built for embeddings given without a mask)."""
        return cls(mask, np.ones(tuple(mask.shape), dtype=bool))

    @classmethod
    def cat(cls, masks: list["HostMask"], dim: int) -> "HostMask":
        return cls(torch.cat([m.device for m in masks], dim=dim), np.concatenate([m.values for m in masks], axis=dim))

    @property
    def all(self) -> bool:
        return bool(self.values.all())

    @property
    def any(self) -> bool:
        return bool(self.values.any())

    def count(self, column: int | None = None) -> int:
        """True entries of a [k] flag vector, or of one column of a [B, k] mask."""
        return int(self.values.sum() if column is None else self.values[:, column].sum())

    def rows(self, column: int | None = None) -> torch.Tensor:
        """The True entries of a [k] flag vector, or the rows [n] of a [B, k] mask with `column` True, as indices on
        the device (cached: the forward indexes the same columns several times)."""
        if column not in self._rows:
            flags = self.device if column is None else self.device[:, column]
            self._rows[column] = rows_where(flags, self.count(column))
        return self._rows[column]

    def any_per_row(self) -> "HostMask":
        """[B] flags: the rows with at least one True entry."""
        return HostMask(self.device.any(dim=1), self.values.any(axis=1))

    def all_per_row(self) -> "HostMask":
        """[B] flags: the rows with only True entries."""
        return HostMask(self.device.all(dim=1), self.values.all(axis=1))

    def column(self, column: int) -> "HostMask":
        """[B] flags: one column of a [B, k] mask."""
        return HostMask(self.device[:, column], self.values[:, column])

    def columns(self, columns: list[int]) -> "HostMask":
        """[B, len(columns)]: some columns of a [B, k] mask, in the order given."""
        return HostMask(self.device[:, columns], self.values[:, columns])

    def select_rows(self, rows: "HostMask") -> "HostMask":
        """The [n, k] sub-mask of the rows where `rows` ([B] flags) is True."""
        return HostMask(self.device[rows.rows()], self.values[rows.values])

    def with_column(self, column: int, value: bool) -> "HostMask":
        """A copy with every entry of `column` set to `value`."""
        device, values = self.device.clone(), self.values.copy()
        device[:, column], values[:, column] = value, value
        return HostMask(device, values)

    def __and__(self, other: "HostMask") -> "HostMask":
        return HostMask(self.device & other.device, self.values & other.values)

    def __or__(self, other: "HostMask") -> "HostMask":
        return HostMask(self.device | other.device, self.values | other.values)

    def __invert__(self) -> "HostMask":
        return HostMask(~self.device, ~self.values)

    def pattern_counts(self) -> list[tuple[int, int]]:
        """(code, rows) of each observation pattern of a [B, k] mask present, by increasing code, with code
        = sum_m 2^m [m observed]: what `torch.unique` of the codes gives, known without reading them back."""
        codes = self.values.astype(np.int64) @ (np.int64(1) << np.arange(self.values.shape[1], dtype=np.int64))
        present, counts = np.unique(codes, return_counts=True)
        return list(zip(present.tolist(), counts.tolist()))


# The host copies of the masks of the batch in flight (`host_mask_known`), for the code a step calls with the
# device mask alone (the imputer step, `imputer_update_fn(embeddings, modality_mask)`).
_KNOWN: contextvars.ContextVar = contextvars.ContextVar("calmrl_known_host_masks", default=())


@contextlib.contextmanager
def host_mask_known(host: HostMask) -> Iterator[None]:
    """Within it, `host_mask_of(host.device)` is `host`."""
    token = _KNOWN.set((*_KNOWN.get(), host))
    try:
        yield
    finally:
        _KNOWN.reset(token)


def host_mask_of(mask: torch.Tensor) -> HostMask:
    """The host copy of `mask`: the one `host_mask_known` holds for this very tensor, else read now (one sync)."""
    known = next((host for host in _KNOWN.get() if host.device is mask), None)
    return known if known is not None else HostMask.read(mask)


__all__ = ["HostMask", "host_mask_known", "host_mask_of", "rows_where"]
