"""Read ahead over an order that is known in advance: each row group decoded once per horizon,
only the rows the horizon needs kept.

The loader knows its whole epoch order before it starts. A curriculum draws every batch
uniformly from a pool of the easiest samples, which lies scattered over the whole cache, so an
LRU of `--shuffle-window` decoded row groups misses on almost every sample once the pool spans
more row groups than that: ~64 rows decoded to use one (docs/curriculum.md, "Cost: random
access to the cache"). `ReadAhead` instead walks the order in horizons of at most `budget`
target tokens (`--read-ahead`). Within a horizon, each row group it touches is fetched once
from the reader (`RowGroupReader`, or `WorkerRowGroupReader`, whose processes decode them in
exactly that sequence, `fetch_sequence`) when its first sample comes up; only the rows the
horizon uses are copied out (`compact_rows`), the group itself is left to the reader's LRU,
and the copy is let go after its last sample in the horizon. A row group costs one decode per
horizon instead of one per sample; memory holds at most `budget` target tokens of copies on
top of the reader's LRU (which still serves an order that stays within a window, such as the
default shuffle, with no extra decode).

The rows handed out hold the decoded rows' values in the same dtypes, so batches collated from
them are the same bits as from the row groups; nothing about the order changes.
One `ReadAhead` reads one cache: a loader over several caches in lockstep uses one per cache,
each given the same positions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kdpipe.schemas.shard_reader import (
    READ_AHEAD_TARGETS,
    CacheIndex,
    Columns,
    RowGroup,
    RowGroupReader,
)
from kdpipe.trainer.decode_workers import WorkerRowGroupReader


def _spans(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new offsets (len(rows)+1,), flat indices) of the ragged spans `rows` of `offsets`.

    Span i of the result is span rows[i] of the input: `values[indices]` gathers them back to
    back, and the new offsets (same dtype as `offsets`) delimit them.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new = np.zeros(rows.size + 1, dtype=offsets.dtype)
    np.cumsum(lengths, out=new[1:])
    indices = np.repeat(starts - new[:-1], lengths) + np.arange(int(new[-1]), dtype=np.int64)
    return new, indices


def _take(values: np.ndarray | None, indices: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[indices]


def _take_strided(values: np.ndarray | None, indices: np.ndarray, stride: int
                  ) -> np.ndarray | None:
    """Entries [i * stride, (i + 1) * stride) of `values` for each i of `indices`, flat."""
    return None if values is None else values.reshape(-1, stride)[indices].reshape(-1)


def compact_rows(group: RowGroup, rows: np.ndarray, top_k: int) -> RowGroup:
    """A RowGroup holding only `rows` of `group`, in that order: row i is `group`'s rows[i].

    Every per-token, per-target and per-entry array is gathered (a copy, same dtype), so the
    result's rows give exactly the arrays `group`'s do, and `group` can be dropped; asked for
    all of its rows in order, `group` itself is returned.
    `top_k`: entries per target of the top-k columns (the cache's k; unused without them).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == group.offsets.size - 1 and np.array_equal(rows, np.arange(rows.size)):
        return group  # every row, in order (a shuffle's window): nothing to leave out
    offsets, tokens = _spans(group.offsets, rows)
    targets, target_index = _spans(group.target_offsets, rows)
    position_mask = None
    if group.position_mask is not None:  # row r's positions start at offsets[r] - r
        mask_offsets = group.offsets - np.arange(group.offsets.size, dtype=group.offsets.dtype)
        position_mask = group.position_mask[_spans(mask_offsets, rows)[1]]
    segment_offsets = segments = None
    if group.segment_offsets is not None and group.segments is not None:
        segment_offsets, segment_index = _spans(group.segment_offsets, rows)
        segments = group.segments[segment_index]
    sampled_offsets = sampled_ids = sampled_counts = None
    if group.sampled_offsets is not None:
        sampled_offsets, entries = _spans(group.sampled_offsets, target_index)
        sampled_ids = _take(group.sampled_ids, entries)
        sampled_counts = _take(group.sampled_counts, entries)
    return RowGroup(
        offsets=offsets, input_ids=group.input_ids[tokens], target_offsets=targets,
        position_mask=position_mask, segment_offsets=segment_offsets, segments=segments,
        topk_ids=_take_strided(group.topk_ids, target_index, top_k),
        topk_logprobs=_take_strided(group.topk_logprobs, target_index, top_k),
        tail_logmass=_take(group.tail_logmass, target_index),
        tempered=_take(group.tempered, target_index),
        target_logprob=_take(group.target_logprob, target_index),
        sampled_ids=sampled_ids, sampled_counts=sampled_counts, sampled_offsets=sampled_offsets)


def horizons(targets: np.ndarray, budget: int) -> np.ndarray:
    """(h + 1,) bounds cutting a sequence of samples into horizons of at most `budget` target
    tokens each (a sample larger than the budget gets a horizon of its own).

    `targets`: (n,) target tokens of each sample in order, repeats counted each time. Greedy:
    each horizon takes as many samples as fit.
    """
    cumulative = np.concatenate([[0], np.cumsum(targets, dtype=np.int64)])
    bounds = [0]
    while bounds[-1] < targets.size:
        end = int(np.searchsorted(cumulative, cumulative[bounds[-1]] + budget, "right")) - 1
        bounds.append(max(end, bounds[-1] + 1))
    return np.asarray(bounds, dtype=np.int64)


def fetch_sequence(groups: np.ndarray, bounds: np.ndarray) -> list[int]:
    """The row groups `ReadAhead` asks its reader for, in order: per horizon (`groups` is the
    row group of each sample in order, `bounds` the horizons' limits), its distinct groups in
    the order they first appear."""
    horizon = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))  # (n,) of each sample
    key = horizon * (int(groups.max(initial=0)) + 1) + groups  # (horizon, group) pairs
    _, first = np.unique(key, return_index=True)
    return groups[np.sort(first)].tolist()


class ReadAhead:
    """(row group, row) of every position of `positions`, in order, read a horizon at a time.

    `positions`: (n,) storage positions in `index` (`CacheIndex.positions` of the order).
    `cached_groups`: the reader's LRU of whole decoded row groups (`--shuffle-window`).
    `workers` > 0: row groups decoded by that many processes, in the order they are needed.
    `budget`: target tokens per horizon; the rows copied out for one horizon hold at most that
    many (or one row, if it alone is larger); `peak_targets` records the most held. Iterate
    once; `close` ends the reader.
    """

    def __init__(self, index: CacheIndex, columns: Columns, positions: np.ndarray,
                 cached_groups: int, workers: int = 0, budget: int = READ_AHEAD_TARGETS) -> None:
        if budget < 1:
            raise ValueError(f"the read-ahead budget must be >= 1 target token, not {budget}")
        self.index, self.columns = index, columns
        self.positions = np.asarray(positions, dtype=np.int64)
        self.bounds = horizons(index.num_targets[self.positions], budget)
        self.peak_targets = 0
        fetches = fetch_sequence(index.group[self.positions], self.bounds)
        self.reader: RowGroupReader | WorkerRowGroupReader
        if workers:
            self.reader = WorkerRowGroupReader(index, columns, cached_groups, fetches, workers)
        else:
            self.reader = RowGroupReader(index, columns, cached_groups)

    def __iter__(self) -> Iterator[tuple[RowGroup, int]]:
        for start, stop in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist(),
                               strict=True):
            yield from self._horizon(self.positions[start:stop])

    def _horizon(self, positions: np.ndarray) -> Iterator[tuple[RowGroup, int]]:
        """The rows of one horizon: each group fetched when its first sample comes up (so in
        `fetch_sequence`'s order), the rows of it the horizon uses copied out, and the copy
        let go after its last sample (an order that stays within a few groups, as a shuffle
        does, then holds little more than the LRU)."""
        # Sorted positions are grouped by row group (storage order), each group's rows ascending.
        distinct, slot = np.unique(positions, return_inverse=True)
        groups = self.index.group[distinct]  # (d,) non-decreasing
        first = np.searchsorted(groups, groups)  # (d,) where each one's group starts
        last = np.searchsorted(groups, groups, "right")
        owner = first[slot]  # (h,) the group of each sample, by where it starts
        _, from_end = np.unique(owner[::-1], return_index=True)
        final = np.zeros(slot.size, dtype=bool)  # the last sample of its group here
        final[slot.size - 1 - from_end] = True
        held = np.full(distinct.size, None, dtype=object)  # the copy holding each row
        copied = 0  # target tokens held
        for i, s in enumerate(slot.tolist()):
            lo, hi = int(first[s]), int(last[s])
            rows = held[s]
            if rows is None:
                rows = compact_rows(self.reader.get(int(groups[s])),
                                    self.index.row[distinct[lo:hi]], self.columns.top_k)
                held[lo:hi] = [rows] * (hi - lo)
                copied += rows.num_targets
                self.peak_targets = max(self.peak_targets, copied)
            if final[i]:
                held[lo:hi] = None
                copied -= rows.num_targets
            yield rows, s - lo

    def close(self) -> None:
        self.reader.close()
