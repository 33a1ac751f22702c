"""Stream a cache into padded batches: an index of where each sample lives, row-group decoding,
collation, and a background loader thread that reads ahead.

The cache is opened read-only and read one Parquet row group at a time, so any number of runs
can share it and memory stays bounded by the loader's row-group cache and prefetch queue, never
by the size of the cache. The order of samples comes from a sampler (`sampler.py`): the loader
follows any order of sample ids it is given.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import Cache
from kdpipe.schemas.encoding import decode_sampled, decode_topk
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.manifest import ShardInfo
from kdpipe.trainer.chunked_loss import TeacherTargets

log = logging.getLogger(__name__)

OPEN_FILES = 16  # Parquet files kept open by one loader thread


@dataclass(frozen=True)
class CacheIndex:
    """Where every sample of a cache lives; built from the small per-sequence columns only."""

    cache: Cache
    groups: tuple[tuple[ShardInfo, int], ...]  # (shard, row group in that shard)
    sample_ids: np.ndarray  # (n,) int64, storage order
    group: np.ndarray  # (n,) int64 index into `groups`
    row: np.ndarray  # (n,) int64 row within its row group
    num_targets: np.ndarray  # (n,) int64 target positions (sequence length - 1)
    _sorted: np.ndarray  # (n,) argsort of sample_ids, for lookups

    def __len__(self) -> int:
        return int(self.sample_ids.size)

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        """Storage positions of `sample_ids`; raises ConfigError for ids not in this cache."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        where = np.searchsorted(self.sample_ids, ids, sorter=self._sorted)
        where = np.minimum(where, max(len(self) - 1, 0))
        found = self._sorted[where] if len(self) else where
        if len(self) == 0 or not np.array_equal(self.sample_ids[found], ids):
            missing = ids[self.sample_ids[found] != ids] if len(self) else ids
            raise ConfigError(f"sample ids {missing[:5].tolist()} are not in the cache "
                              f"{self.cache.root}")
        return found

    def tokens_of(self, sample_ids: np.ndarray) -> int:
        """Real target tokens of these samples (what the loss is normalised by)."""
        return int(self.num_targets[self.positions(sample_ids)].sum())


def build_index(cache: Cache) -> CacheIndex:
    """Read `sample_id` and `num_targets` of every row group (a few bytes per sequence)."""
    groups: list[tuple[ShardInfo, int]] = []
    ids, group, row, targets = [], [], [], []
    for shard in cache.manifest.shards:
        parquet = pq.ParquetFile(cache.shard_path(shard))
        for rg in range(parquet.num_row_groups):
            table = parquet.read_row_group(rg, columns=[cols.SAMPLE_ID, cols.NUM_TARGETS])
            n = table.num_rows
            ids.append(table.column(cols.SAMPLE_ID).to_numpy().astype(np.int64))
            targets.append(table.column(cols.NUM_TARGETS).to_numpy().astype(np.int64))
            group.append(np.full(n, len(groups), dtype=np.int64))
            row.append(np.arange(n, dtype=np.int64))
            groups.append((shard, rg))
    sample_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(sample_ids, kind="stable")
    if sample_ids.size and np.any(np.diff(sample_ids[order]) == 0):
        raise CacheFormatError(f"{cache.root}: duplicate sample ids; run `kdpipe verify`")
    return CacheIndex(
        cache=cache, groups=tuple(groups), sample_ids=sample_ids,
        group=np.concatenate(group) if group else np.zeros(0, np.int64),
        row=np.concatenate(row) if row else np.zeros(0, np.int64),
        num_targets=np.concatenate(targets) if targets else np.zeros(0, np.int64),
        _sorted=order,
    )


@dataclass(frozen=True)
class Columns:
    """What the loader reads: the teacher columns only for KD, one tempered tail at most."""

    teacher: bool
    top_k: int
    tempered_index: int | None = None  # which of the cache's tail temperatures to read
    num_tempered: int = 0
    target_logprob: bool = False  # the teacher's log p(true token): token-level reliance
    encoding: str = "plain"  # the cache's top-k encoding; decoded transparently
    cache_mode: str = "topk"  # "sampled": sampled ids and counts instead of top-k and tail
    samples: int = 0  # sampled: draws per position (the counts' denominator)

    @property
    def names(self) -> list[str]:
        names = [cols.SAMPLE_ID, cols.INPUT_IDS]
        if self.teacher and self.cache_mode == "sampled":
            names += [cols.SAMPLED_ID_DELTAS, cols.SAMPLED_COUNTS, cols.SAMPLED_LENGTHS]
        elif self.teacher:
            names += ([cols.TOPK_ID_DELTAS, cols.TOPK_LOGPROB_Q] if self.encoding == "compact"
                      else [cols.TOPK_IDS, cols.TOPK_LOGPROBS])
            names.append(cols.TAIL_LOGMASS)
            if self.tempered_index is not None:
                names.append(cols.TAIL_LOGMASS_TEMPERED)
        if self.target_logprob:
            names.append(cols.TARGET_LOGPROB)
        return names


def columns_for(cache: Cache, teacher: bool, temperature: float,
                target_logprob: bool = False) -> Columns:
    """Read the exact tempered tail when the cache stores one for `temperature`."""
    temps = cache.manifest.tail_temperatures
    index = next((i for i, t in enumerate(temps) if abs(t - temperature) < 1e-9), None)
    if teacher and temperature != 1.0 and index is None:
        log.info("cache %s stores no exact tail at temperature %s; using the uniform-tail "
                 "approximation", cache.root, temperature)
    return Columns(teacher=teacher, top_k=cache.manifest.top_k,
                   tempered_index=index if teacher and temperature != 1.0 else None,
                   num_tempered=len(temps), target_logprob=target_logprob,
                   encoding=cache.manifest.encoding, cache_mode=cache.manifest.cache_mode,
                   samples=cache.manifest.samples)


def _flat_list(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets (rows+1,), flat values) numpy arrays, offsets from 0."""
    array = table.column(name).combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], array.flatten().to_numpy(zero_copy_only=False)


@dataclass
class RowGroup:
    """One decoded row group, kept in the cache's compact dtypes until collation."""

    offsets: np.ndarray  # (rows+1,) into input_ids
    input_ids: np.ndarray  # (tokens,)
    topk_ids: np.ndarray | None  # (targets * k,) flat, stride k
    topk_logprobs: np.ndarray | None  # (targets * k,)
    tail_logmass: np.ndarray | None  # (targets,)
    tempered: np.ndarray | None  # (targets,) at the chosen temperature
    target_logprob: np.ndarray | None = None  # (targets,) teacher log p(true next token)
    sampled_ids: np.ndarray | None = None  # (entries,) unique sampled ids, per target
    sampled_counts: np.ndarray | None = None  # (entries,)
    sampled_offsets: np.ndarray | None = None  # (targets + 1,) into sampled_ids

    def target_span(self, row: int) -> slice:
        # Row r has len_r tokens and len_r - 1 targets; targets are stored back to back.
        start = int(self.offsets[row]) - row
        return slice(start, int(self.offsets[row + 1]) - row - 1)


def decode_row_group(table: pa.Table, columns: Columns) -> RowGroup:
    offsets, input_ids = _flat_list(table, cols.INPUT_IDS)
    group = RowGroup(offsets, input_ids, None, None, None, None)
    if columns.teacher and columns.cache_mode == "sampled":
        _, deltas = _flat_list(table, cols.SAMPLED_ID_DELTAS)
        _, group.sampled_counts = _flat_list(table, cols.SAMPLED_COUNTS)
        _, lengths = _flat_list(table, cols.SAMPLED_LENGTHS)
        group.sampled_ids, group.sampled_offsets = decode_sampled(deltas, lengths)
        if lengths.size != int(offsets[-1]) - table.num_rows or \
                group.sampled_counts.size != group.sampled_ids.size:
            raise CacheFormatError("sampled columns do not match input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
    elif columns.teacher:
        if columns.encoding == "compact":
            _, deltas = _flat_list(table, cols.TOPK_ID_DELTAS)
            _, levels = _flat_list(table, cols.TOPK_LOGPROB_Q)
            group.topk_ids, group.topk_logprobs = decode_topk(deltas, levels, columns.top_k)
        else:
            _, group.topk_ids = _flat_list(table, cols.TOPK_IDS)
            _, group.topk_logprobs = _flat_list(table, cols.TOPK_LOGPROBS)
        _, group.tail_logmass = _flat_list(table, cols.TAIL_LOGMASS)
        targets = int(offsets[-1]) - table.num_rows
        if group.topk_ids.size != targets * columns.top_k or group.tail_logmass.size != targets:
            raise CacheFormatError("top-k columns do not match input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
        if columns.tempered_index is not None:
            _, tempered = _flat_list(table, cols.TAIL_LOGMASS_TEMPERED)  # (targets * n_temps,)
            group.tempered = tempered.reshape(targets, columns.num_tempered)[
                :, columns.tempered_index]
    if columns.target_logprob:
        _, group.target_logprob = _flat_list(table, cols.TARGET_LOGPROB)
        if group.target_logprob.size != int(offsets[-1]) - table.num_rows:
            raise CacheFormatError("target_logprob does not match input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
    # A NaN log-prob would silently zero its token's KD term: refuse it before training on it.
    for name, values in ((cols.TOPK_LOGPROBS, group.topk_logprobs),
                         (cols.TAIL_LOGMASS, group.tail_logmass),
                         (cols.TAIL_LOGMASS_TEMPERED, group.tempered),
                         (cols.TARGET_LOGPROB, group.target_logprob)):
        bad = None if values is None else cols.first_invalid(name, values)
        if bad is not None:
            assert values is not None
            raise CacheFormatError(f"{name} holds {values[bad]}, which a cache never does; "
                                   "`kdpipe verify` lists every such value: re-create the "
                                   "cache")
    return group


@dataclass
class Batch:
    """One micro-batch, right-padded; flat per-target tensors are in (row, position) order."""

    sample_ids: torch.Tensor  # (B,) int64
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    target_mask: torch.Tensor  # (B, T) bool: position t predicts a real token t + 1
    labels: torch.Tensor  # (N,) int64 true next tokens
    target_row: torch.Tensor  # (N,) int64 batch row of each target
    teacher: TeacherTargets | None
    target_logprob: torch.Tensor | None = None  # (N,) float32 teacher log p(label), if read

    @property
    def num_targets(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device) -> Batch:
        teacher = None
        if self.teacher is not None:
            t = self.teacher
            teacher = TeacherTargets(
                topk_ids=t.topk_ids.to(device, non_blocking=True),
                topk_logprobs=t.topk_logprobs.to(device, non_blocking=True),
                tail_logmass=t.tail_logmass.to(device, non_blocking=True),
                tempered_tail_logmass=(None if t.tempered_tail_logmass is None else
                                       t.tempered_tail_logmass.to(device, non_blocking=True)),
                sampled_ids=(None if t.sampled_ids is None else
                             t.sampled_ids.to(device, non_blocking=True)),
                sampled_weights=(None if t.sampled_weights is None else
                                 t.sampled_weights.to(device, non_blocking=True)))
        return Batch(sample_ids=self.sample_ids,
                     input_ids=self.input_ids.to(device, non_blocking=True),
                     attention_mask=self.attention_mask.to(device, non_blocking=True),
                     target_mask=self.target_mask.to(device, non_blocking=True),
                     labels=self.labels.to(device, non_blocking=True),
                     target_row=self.target_row.to(device, non_blocking=True), teacher=teacher,
                     target_logprob=(None if self.target_logprob is None else
                                     self.target_logprob.to(device, non_blocking=True)))


@dataclass
class GlobalBatch:
    """The micro-batches of one optimizer step and their total real target tokens."""

    micro: list[Batch]
    sample_ids: np.ndarray  # (B * grad_accum,) or fewer at the end of an epoch
    num_targets: int


def collate(rows: Sequence[tuple[int, RowGroup, int]], columns: Columns, pad_id: int) -> Batch:
    """Pad samples (sample_id, decoded row group, row) into one right-padded Batch."""
    seqs = [g.input_ids[g.offsets[r]:g.offsets[r + 1]] for _, g, r in rows]
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    width = int(lengths.max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, T)
    positions = np.arange(width)[None, :]
    attention = positions < lengths[:, None]  # (B, T)
    for b, s in enumerate(seqs):
        input_ids[b, : s.size] = s
    target_mask = positions < (lengths - 1)[:, None]  # (B, T)
    labels = input_ids[:, 1:][target_mask[:, :-1]] if width > 1 else np.zeros(0, np.int64)
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
    target_logprob = None
    if columns.target_logprob:
        target_logprob = torch.from_numpy(np.concatenate(
            [g.target_logprob[g.target_span(r)] for _, g, r in rows]  # type: ignore[index]
        ).astype(np.float32))  # (N,)
    return Batch(
        sample_ids=torch.tensor([sid for sid, _, _ in rows], dtype=torch.int64),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention.astype(np.int64)),
        target_mask=torch.from_numpy(target_mask),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        target_row=torch.from_numpy(np.repeat(np.arange(len(rows)), lengths - 1)),
        teacher=teacher, target_logprob=target_logprob,
    )


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


class _RowGroupReader:
    """Decoded row groups with an LRU bound; Parquet files opened read-only, a few at a time."""

    def __init__(self, index: CacheIndex, columns: Columns, capacity: int) -> None:
        self.index, self.columns, self.capacity = index, columns, max(capacity, 1)
        self.groups: OrderedDict[int, RowGroup] = OrderedDict()
        self.files: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def get(self, group: int) -> RowGroup:
        if group in self.groups:
            self.groups.move_to_end(group)
            return self.groups[group]
        shard, rg = self.index.groups[group]
        table = self._file(shard).read_row_group(rg, columns=self.columns.names)
        try:
            decoded = decode_row_group(table, self.columns)
        except CacheFormatError as exc:  # name the place: the message alone cannot
            path = self.index.cache.shard_path(shard)
            raise CacheFormatError(f"{path} row group {rg}: {exc}") from exc
        self.groups[group] = decoded
        if len(self.groups) > self.capacity:
            self.groups.popitem(last=False)
        return decoded

    def _file(self, shard: ShardInfo) -> pq.ParquetFile:
        if shard.file not in self.files:
            self.files[shard.file] = pq.ParquetFile(self.index.cache.shard_path(shard))
            if len(self.files) > OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files.move_to_end(shard.file)
        return self.files[shard.file]

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
        self.groups.clear()


_END = object()


class BatchLoader:
    """Yield GlobalBatches for `order` (sample ids), decoded by a background thread.

    `order` is cut into global batches of `batch_size * grad_accum` samples, each split into
    micro-batches of `batch_size`; the last global batch of an epoch may be smaller. At most
    `prefetch` global batches wait in the queue, and at most `cached_groups` decoded row groups
    are held (LRU), so memory does not grow with the cache. An order that visits row groups in
    windows of at most `cached_groups` (the default sampler's `--shuffle-window`) decodes each
    row group once per epoch; any other order is still correct, only slower. Use as a context
    manager so an early stop (e.g. --max-steps mid-epoch) ends the thread.
    """

    def __init__(self, index: CacheIndex, order: np.ndarray, columns: Columns, batch_size: int,
                 grad_accum: int = 1, pad_id: int = 0, prefetch: int = 4,
                 cached_groups: int = 16) -> None:
        self.index, self.columns = index, columns
        self.order = np.asarray(order, dtype=np.int64)
        self.batch_size, self.grad_accum, self.pad_id = batch_size, grad_accum, pad_id
        self.cached_groups = cached_groups
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
        reader = _RowGroupReader(self.index, self.columns, self.cached_groups)
        try:
            positions = self.index.positions(self.order)
            per_step = self.batch_size * self.grad_accum
            for start in range(0, self.order.size, per_step):
                step_pos = positions[start:start + per_step]
                micro = []
                for m in range(0, step_pos.size, self.batch_size):
                    rows = [(int(self.index.sample_ids[p]),
                             reader.get(int(self.index.group[p])), int(self.index.row[p]))
                            for p in step_pos[m:m + self.batch_size]]
                    micro.append(collate(rows, self.columns, self.pad_id))
                batch = GlobalBatch(micro, self.order[start:start + per_step],
                                    int(self.index.num_targets[step_pos].sum()))
                if not self._put(batch):
                    return
            self._put(_END)
        except Exception as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
        finally:
            reader.close()
