"""Row groups decoded by worker processes (`--loader-workers`), in the order the loader needs
them.

One Python thread reads and decodes about half a million target tokens per CPU-second at
k = 64 (docs/benchmarks.md, "Loader at GPU rates"): less than five times what one GPU consumes
at 32 × 4,096 tokens per step and two steps per second. With `workers` > 0, torch's
`DataLoader` runs the Parquet read and `decode_row_group` in that many processes, over a
map-style dataset whose items are the row groups the loader will miss, in the order it will
miss them (`load_sequence`: the loads of the loader's LRU over the row groups its read-ahead
asks for, `read_ahead.fetch_sequence`).
The loader thread still collates, so batches are the same bits as without workers, and resume
stays exact: a resumed run's order gives its own sequence.

Workers start the way torch's DataLoader starts them by default (`fork` on Linux: no need for
an `if __name__ == "__main__"` guard in a user's script). They only read Parquet and numpy;
they never touch torch's thread pools or CUDA. Checksums stay in the loader's process, once
per shard, before the first row group of a shard is used.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from kdpipe.schemas.errors import CacheFormatError, KdpipeError, StorageError
from kdpipe.schemas.shard_reader import (
    OPEN_FILES,
    CacheIndex,
    Columns,
    RowGroup,
    decode_row_group,
)


def load_sequence(groups: Sequence[int], capacity: int) -> list[int]:
    """The row groups an LRU of `capacity` decoded groups loads, in order, when `groups` are
    read one after another: `RowGroupReader.get`'s policy, replayed without decoding."""
    held: OrderedDict[int, None] = OrderedDict()
    loads = []
    for group in groups:
        if group in held:
            held.move_to_end(group)
            continue
        loads.append(group)
        held[group] = None
        if len(held) > max(capacity, 1):
            held.popitem(last=False)
    return loads


Shared = dict[str, torch.Tensor]  # a RowGroup's arrays, as tensors DataLoader moves by memory


def _as_is(item: Any) -> Any:
    """The DataLoader's collate function: items are whole row groups already."""
    return item


def to_shared(group: RowGroup) -> Shared:
    """A RowGroup's arrays as tensors, which DataLoader hands over through shared memory (one
    copy) instead of pickling them through a pipe. Arrays read from Arrow are read-only; the
    tensors are only ever copied, so torch's warning about that does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {f.name: torch.from_numpy(np.asarray(getattr(group, f.name)))
                for f in dataclasses.fields(group) if getattr(group, f.name) is not None}


def from_shared(arrays: Shared) -> RowGroup:
    """The RowGroup `to_shared` gave: numpy views of the shared tensors, no copy."""
    fields: dict[str, Any] = {f.name: arrays[f.name].numpy() if f.name in arrays else None
                              for f in dataclasses.fields(RowGroup)}
    return RowGroup(**fields)


class _RowGroups(Dataset[tuple[int, Shared | KdpipeError]]):
    """Item i: (group, its decoded arrays), for the i-th row group of `loads`. A faulty row
    group, or a store that fails while it is read, is returned as its CacheFormatError or
    StorageError, so that the loader raises it as one line (DataLoader would wrap it in the
    worker's traceback)."""

    def __init__(self, index: CacheIndex, columns: Columns, loads: list[int]) -> None:
        self.index, self.columns, self.loads = index, columns, loads
        self.files: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def __len__(self) -> int:
        return len(self.loads)

    def __getitem__(self, i: int) -> tuple[int, Shared | KdpipeError]:
        group = self.loads[i]
        shard, rg = self.index.groups[group]
        path = self.index.cache.shard_path(shard)
        try:
            if shard.file not in self.files:
                self.files[shard.file] = self.index.cache.open_shard(shard)  # or a URL's
                if len(self.files) > OPEN_FILES:
                    self.files.popitem(last=False)[1].close()
            with self.index.cache.reading(shard):
                table = self.files[shard.file].read_row_group(rg, columns=self.columns.names)
            return group, to_shared(decode_row_group(table, self.columns))
        except CacheFormatError as exc:
            return group, CacheFormatError(f"{path} row group {rg}: {exc}")
        except StorageError as exc:  # the store failed: its one line, as the loader's own
            return group, exc


class WorkerRowGroupReader:
    """`RowGroupReader`'s `get` and `close`, fed by DataLoader workers that decode ahead.

    `groups`: the row groups in the order the loader will ask for them; the loader must then
    call `get` in exactly that order (it does: its `ReadAhead` made the sequence).
    `prefetch`: row groups decoded ahead per worker.
    """

    def __init__(self, index: CacheIndex, columns: Columns, capacity: int,
                 groups: Sequence[int], workers: int, prefetch: int = 2) -> None:
        self.index, self.capacity = index, max(capacity, 1)
        self.groups: OrderedDict[int, RowGroup] = OrderedDict()
        dataset = _RowGroups(index, columns, load_sequence(groups, self.capacity))
        self.decoded: Iterator[tuple[int, Shared | KdpipeError]] | None = iter(
            DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                       prefetch_factor=prefetch))

    def get(self, group: int) -> RowGroup:
        if group in self.groups:
            self.groups.move_to_end(group)
            return self.groups[group]
        assert self.decoded is not None, "get() after close()"
        loaded, decoded = next(self.decoded)
        if loaded != group:  # the caller broke the contract: a bug, not the user's input
            raise RuntimeError(f"row group {group} asked for, {loaded} decoded next")
        if isinstance(decoded, KdpipeError):
            raise decoded
        self.index.cache.check_shards([self.index.groups[group][0]])  # once per shard
        self.groups[group] = from_shared(decoded)
        if len(self.groups) > self.capacity:
            self.groups.popitem(last=False)
        return self.groups[group]

    def close(self) -> None:
        """Stop the workers (the DataLoader iterator shuts them down when dropped)."""
        self.decoded = None
        self.groups.clear()
