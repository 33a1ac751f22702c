"""Stream a cache into padded training batches: collation of decoded rows into tensors, and a
background loader thread that reads ahead.

Rows come from `schemas.shard_reader` (the cache's index and row-group decoding). The cache is
opened read-only and read one Parquet row group at a time, so any number of runs can share it
and memory stays bounded by the loader's read-ahead, row-group cache and prefetch queue, never
by the size of the cache. The order of samples comes from a sampler (`sampler.py`): the loader
follows any order of sample ids it is given.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.shard_reader import READ_AHEAD_TARGETS, CacheIndex, Columns, RowGroup
from kdpipe.trainer.chunked_loss import TeacherTargets
from kdpipe.trainer.read_ahead import ReadAhead

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch, right-padded; flat per-target tensors are in (row, position) order."""

    sample_ids: torch.Tensor  # (B,) int64
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    # (B, T) bool: position t is a target (it predicts a real token t + 1, and the cache's
    # target mask, if any, selects it)
    target_mask: torch.Tensor
    labels: torch.Tensor  # (N,) int64 true next tokens
    target_row: torch.Tensor  # (N,) int64 batch row of each target
    teacher: TeacherTargets | None  # teacher 1's (the first --cache)
    target_logprob: torch.Tensor | None = None  # (N,) float32 teacher log p(label), if read
    segments: list[list[int]] | None = None  # per row: packed documents' lengths (None: one)
    # Teachers 2..J (the other --cache, in order): the same N targets, each its own partition
    other_teachers: tuple[TeacherTargets, ...] = ()

    @property
    def num_targets(self) -> int:
        return int(self.labels.numel())

    @property
    def teachers(self) -> tuple[TeacherTargets, ...]:
        """Every teacher's targets, teacher 1 first; () without teacher columns."""
        return () if self.teacher is None else (self.teacher, *self.other_teachers)

    def to(self, device: torch.device) -> Batch:
        teacher = None if self.teacher is None else self.teacher.to(device)
        return Batch(sample_ids=self.sample_ids,
                     input_ids=self.input_ids.to(device, non_blocking=True),
                     attention_mask=self.attention_mask.to(device, non_blocking=True),
                     target_mask=self.target_mask.to(device, non_blocking=True),
                     labels=self.labels.to(device, non_blocking=True),
                     target_row=self.target_row.to(device, non_blocking=True), teacher=teacher,
                     target_logprob=(None if self.target_logprob is None else
                                     self.target_logprob.to(device, non_blocking=True)),
                     segments=self.segments,
                     other_teachers=tuple(t.to(device) for t in self.other_teachers))


@dataclass
class GlobalBatch:
    """The micro-batches of one optimizer step and their total real target tokens."""

    micro: list[Batch]
    sample_ids: np.ndarray  # (B * grad_accum,) or fewer at the end of an epoch
    num_targets: int


def collate(rows: Sequence[tuple[int, RowGroup, int]], columns: Columns, pad_id: int,
            others: Sequence[tuple[Sequence[tuple[int, RowGroup, int]], Columns]] = ()
            ) -> Batch:
    """Pad samples (sample_id, decoded row group, row) into one right-padded Batch.

    `others`: the same samples' rows in the caches of teachers 2..J, with their columns; they
    supply `other_teachers` only. Raises CacheFormatError where such a row's input_ids,
    target positions or packed-document boundaries differ from `rows`' (the caches'
    alignment, checked at setup from the manifests, re-checked here on the decoded rows at
    the cost of one comparison)."""
    seqs = [g.input_ids[g.offsets[r]:g.offsets[r + 1]] for _, g, r in rows]
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    width = int(lengths.max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, T)
    positions = np.arange(width)[None, :]
    attention = positions < lengths[:, None]  # (B, T)
    for b, s in enumerate(seqs):
        input_ids[b, : s.size] = s
    target_mask = np.zeros((len(rows), width), dtype=bool)  # (B, T)
    for b, (_, g, r) in enumerate(rows):
        target_mask[b, : lengths[b] - 1] = g.positions_of(r)
    labels = input_ids[:, 1:][target_mask[:, :-1]] if width > 1 else np.zeros(0, np.int64)
    segments = None
    if any(g.segments is not None for _, g, _ in rows):
        segments = [g.segments_of(r) or [int(n)] for (_, g, r), n in zip(rows, lengths,
                                                                           strict=True)]
    teacher = _collate_teacher(rows, columns)
    target_logprob = None if teacher is None else teacher.target_logprob
    if teacher is None and columns.target_logprob:
        target_logprob = _collate_target_logprob(rows)
    for other_rows, _ in others:
        _check_same_rows(rows, other_rows)
    return Batch(
        sample_ids=torch.tensor([sid for sid, _, _ in rows], dtype=torch.int64),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention.astype(np.int64)),
        target_mask=torch.from_numpy(target_mask),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        target_row=torch.from_numpy(np.repeat(np.arange(len(rows)), target_mask.sum(axis=1))),
        teacher=teacher, target_logprob=target_logprob, segments=segments,
        other_teachers=tuple(t for other_rows, other_columns in others
                             if (t := _collate_teacher(other_rows, other_columns)) is not None),
    )


def _check_same_rows(rows: Sequence[tuple[int, RowGroup, int]],
                     other: Sequence[tuple[int, RowGroup, int]]) -> None:
    """Raise CacheFormatError unless `other` holds the same samples, input_ids, target
    positions and packed-document boundaries (`segments`) as `rows`. The manifests only tell
    whether both caches record segments (`schemas.cache_alignment`); the lengths themselves
    are compared here, row by row."""
    for (sid, g, r), (other_sid, h, q) in zip(rows, other, strict=True):
        same = (sid == other_sid and np.array_equal(g.input_ids[g.offsets[r]:g.offsets[r + 1]],
                                                    h.input_ids[h.offsets[q]:h.offsets[q + 1]])
                and np.array_equal(g.positions_of(r), h.positions_of(q))
                and g.segments_of(r) == h.segments_of(q))
        if not same:
            raise CacheFormatError(f"sample id {sid} has other input_ids, target positions or "
                                   "packed-document boundaries in another teacher's cache than "
                                   "in the first; the caches changed since the run checked "
                                   "them: run `kdpipe verify` on both")


def _collate_target_logprob(rows: Sequence[tuple[int, RowGroup, int]]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(
        [g.target_logprob[g.target_span(r)] for _, g, r in rows]  # type: ignore[index]
    ).astype(np.float32))  # (N,)


def _collate_teacher(rows: Sequence[tuple[int, RowGroup, int]], columns: Columns
                     ) -> TeacherTargets | None:
    """The teacher targets of `rows` (N rows, in (row, position) order), None without the
    teacher columns."""
    teacher = None
    if columns.teacher and columns.cache_mode == "sampled":
        teacher = _collate_sampled(rows, columns.samples)
    elif columns.teacher:
        k = columns.top_k
        spans = [g.target_span(r) for _, g, r in rows]
        ids = np.concatenate([g.topk_ids[s.start * k:s.stop * k]  # type: ignore[index]
                              for (_, g, _), s in zip(rows, spans, strict=True)])
        lps = np.concatenate([g.topk_logprobs[s.start * k:s.stop * k]  # type: ignore[index]
                              for (_, g, _), s in zip(rows, spans, strict=True)])
        tail = np.concatenate([g.tail_logmass[s]  # type: ignore[index]
                               for (_, g, _), s in zip(rows, spans, strict=True)])
        tempered = None
        if columns.tempered_index is not None:
            tempered = torch.from_numpy(np.concatenate(
                [g.tempered[s] for (_, g, _), s in zip(rows, spans, strict=True)]  # type: ignore[index]
            ).astype(np.float32))
        teacher = TeacherTargets(
            topk_ids=torch.from_numpy(ids.astype(np.int64).reshape(-1, k)),  # (N, k)
            topk_logprobs=torch.from_numpy(lps.astype(np.float32).reshape(-1, k)),  # (N, k)
            tail_logmass=torch.from_numpy(tail.astype(np.float32)),  # (N,)
            tempered_tail_logmass=tempered,  # (N,) or None
        )
    if teacher is not None and columns.target_logprob:
        teacher.target_logprob = _collate_target_logprob(rows)
    return teacher


def _collate_sampled(rows: Sequence[tuple[int, RowGroup, int]], samples: int) -> TeacherTargets:
    """Sampled targets padded to (N, S), S the most unique ids of a token in the batch.

    The top-k fields hold the empirical distribution's mode and the mass outside it (k = 1),
    so top-1 agreement is reported against the most-drawn id.
    """
    ids_parts, count_parts, length_parts = [], [], []
    for _, g, r in rows:
        span = g.target_span(r)
        assert g.sampled_offsets is not None and g.sampled_ids is not None
        assert g.sampled_counts is not None
        first, last = int(g.sampled_offsets[span.start]), int(g.sampled_offsets[span.stop])
        ids_parts.append(g.sampled_ids[first:last])
        count_parts.append(g.sampled_counts[first:last])
        length_parts.append(np.diff(g.sampled_offsets[span.start:span.stop + 1]))
    lengths = np.concatenate(length_parts).astype(np.int64)  # (N,)
    width = max(int(lengths.max()) if lengths.size else 0, 1)
    token = np.repeat(np.arange(lengths.size), lengths)  # (entries,)
    slot = np.arange(token.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.zeros((lengths.size, width), dtype=np.int64)  # (N, S)
    weights = np.zeros((lengths.size, width), dtype=np.float32)  # (N, S) c_j / samples
    ids[token, slot] = np.concatenate(ids_parts)
    weights[token, slot] = np.concatenate(count_parts).astype(np.float32) / samples
    mode = weights.argmax(axis=1)[:, None]  # (N, 1)
    top = np.take_along_axis(weights, mode, axis=1)  # (N, 1)
    with np.errstate(divide="ignore"):
        return TeacherTargets(
            topk_ids=torch.from_numpy(np.take_along_axis(ids, mode, axis=1)),  # (N, 1)
            topk_logprobs=torch.from_numpy(np.log(top)),  # (N, 1)
            tail_logmass=torch.from_numpy(np.log1p(-top[:, 0])),  # (N,)
            sampled_ids=torch.from_numpy(ids), sampled_weights=torch.from_numpy(weights))


_END = object()


class BatchLoader:
    """Yield GlobalBatches for `order` (sample ids), decoded by a background thread.

    `order` is cut into global batches of `batch_size * grad_accum` samples, each split into
    micro-batches of `batch_size`; the last global batch of an epoch may be smaller. At most
    `prefetch` global batches wait in the queue. Rows come from a `ReadAhead`
    (`read_ahead.py`): the order is read in horizons of at most `read_ahead` target tokens,
    each row group a horizon touches decoded once and only the rows the horizon uses kept, on
    top of an LRU of `cached_groups` whole decoded row groups; so memory does not grow with the
    cache, and any order, a curriculum's included, costs at most one decode per row group per
    horizon (an order within windows of `cached_groups` row groups, the default sampler's
    `--shuffle-window`, one per row group per epoch). With `workers` > 0 the row groups are
    read and decoded by that many processes ahead of the thread (`decode_workers.py`). The
    batches are the same bits whatever `read_ahead`, `cached_groups` and `workers`. Use as a
    context manager so an early stop (e.g. --max-steps mid-epoch) ends the thread and the
    workers.

    `others`: the (index, columns) of teachers 2..J's caches, read in lockstep: each has its
    own `ReadAhead` over the same order (its own budget of `read_ahead` target tokens, LRU of
    `cached_groups` and workers), so a row group of any cache is decoded as the first cache's
    are; they supply each batch's `other_teachers` for the same rows (`collate`).
    """

    def __init__(self, index: CacheIndex, order: np.ndarray, columns: Columns, batch_size: int,
                 grad_accum: int = 1, pad_id: int = 0, prefetch: int = 4,
                 cached_groups: int = 16, workers: int = 0,
                 read_ahead: int = READ_AHEAD_TARGETS,
                 others: Sequence[tuple[CacheIndex, Columns]] = ()) -> None:
        self.index, self.columns, self.others = index, columns, tuple(others)
        self.order = np.asarray(order, dtype=np.int64)
        self.batch_size, self.grad_accum, self.pad_id = batch_size, grad_accum, pad_id
        self.cached_groups, self.workers, self.read_ahead = cached_groups, workers, read_ahead
        self.queue: queue.Queue[object] = queue.Queue(maxsize=max(prefetch, 1))
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __len__(self) -> int:
        per_step = self.batch_size * self.grad_accum
        return -(-self.order.size // per_step)

    def __enter__(self) -> BatchLoader:
        self.thread = threading.Thread(target=self._produce, name="kdpipe-loader", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[GlobalBatch]:
        if self.thread is None:
            self.__enter__()
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, GlobalBatch)
            yield item

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a producer on a full queue
                    self.queue.get(timeout=0.05)
            self.thread.join()
            self.thread = None

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        # One (index, columns) per cache, first = inputs, each read ahead over the same order.
        caches = [(self.index, self.columns)] + list(self.others)
        aheads: list[ReadAhead] = []
        try:
            positions = [index.positions(self.order) for index, _ in caches]
            for (index, columns), pos in zip(caches, positions, strict=True):
                aheads.append(ReadAhead(index, columns, pos, self.cached_groups, self.workers,
                                        self.read_ahead))
            rows_of = [iter(ahead) for ahead in aheads]  # (row group, row) of each position
            per_step = self.batch_size * self.grad_accum
            for start in range(0, self.order.size, per_step):
                micro = []
                for m in range(start, min(start + per_step, self.order.size), self.batch_size):
                    end = min(m + self.batch_size, start + per_step)
                    rows = [[(int(index.sample_ids[p]), *next(ahead)) for p in pos[m:end]]
                            for (index, _), pos, ahead in zip(caches, positions, rows_of,
                                                              strict=True)]
                    micro.append(collate(rows[0], self.columns, self.pad_id,
                                         list(zip(rows[1:], [c for _, c in self.others],
                                                  strict=True))))
                step_pos = positions[0][start:start + per_step]
                batch = GlobalBatch(micro, self.order[start:start + per_step],
                                    int(self.index.num_targets[step_pos].sum()))
                if not self._put(batch):
                    return
            self._put(_END)
        except Exception as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
        finally:
            for ahead in aheads:
                ahead.close()
