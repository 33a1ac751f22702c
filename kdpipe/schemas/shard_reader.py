"""Read a cache shard back: where every sample lives (`CacheIndex`), which columns to read
(`Columns`), and one Parquet row group decoded into flat numpy arrays (`decode_row_group`,
`RowGroupReader`).

The counterpart of `shard_writer.py`, with `encoding.py` beside both; `trainer/data.py`
collates the decoded rows into training batches. Everything here is numpy and pyarrow, so a
reader needs neither the teacher side nor torch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import Cache
from kdpipe.schemas.encoding import decode_sampled, decode_topk
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.manifest import ShardInfo

log = logging.getLogger(__name__)

OPEN_FILES = 16  # Parquet files kept open by one loader thread
# Target tokens the trainer's loader reads ahead by default (`--read-ahead`,
# trainer/read_ahead.py): ~270 MB of decoded rows at k = 64 with 16-bit ids and float16
# log-probs (k x 4 bytes and a few more per target); docs/curriculum.md has the trade-off.
READ_AHEAD_TARGETS = 1 << 20


@dataclass(frozen=True)
class CacheIndex:
    """Where every sample of a cache lives; built from the small per-sequence columns only."""

    cache: Cache
    groups: tuple[tuple[ShardInfo, int], ...]  # (shard, row group in that shard)
    sample_ids: np.ndarray  # (n,) int64, storage order
    group: np.ndarray  # (n,) int64 index into `groups`
    row: np.ndarray  # (n,) int64 row within its row group
    num_targets: np.ndarray  # (n,) int64 target positions (length - 1, or the masked ones)
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
                              f"{self.cache.location}")
        return found

    def tokens_of(self, sample_ids: np.ndarray) -> int:
        """Real target tokens of these samples (what the loss is normalised by)."""
        return int(self.num_targets[self.positions(sample_ids)].sum())


def build_index(cache: Cache) -> CacheIndex:
    """Read `sample_id` and `num_targets` of every row group (a few bytes per sequence).

    Every shard's checksum is checked first (`Cache.check_shards`), so a corrupted shard
    stops a run before it trains on anything; raises CacheFormatError naming the shard.
    """
    cache.check_shards(cache.manifest.shards)
    groups: list[tuple[ShardInfo, int]] = []
    ids, group, row, targets = [], [], [], []
    for shard in cache.manifest.shards:
        parquet = cache.open_shard(shard)
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
        raise CacheFormatError(f"{cache.location}: duplicate sample ids; run `kdpipe verify`")
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
    target_mask: bool = False  # the cache stores targets at masked positions only
    segments: bool = False  # the cache records packed documents' lengths
    vocab_size: int | None = None  # the cache's real ids: any id read must be below it

    @property
    def names(self) -> list[str]:
        names = [cols.SAMPLE_ID, cols.INPUT_IDS]
        if self.target_mask:
            names.append(cols.TARGET_MASK)
        if self.segments:
            names.append(cols.SEGMENTS)
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
                 "approximation", cache.location, temperature)
    return Columns(teacher=teacher, top_k=cache.manifest.top_k,
                   tempered_index=index if teacher and temperature != 1.0 else None,
                   num_tempered=len(temps), target_logprob=target_logprob,
                   encoding=cache.manifest.encoding, cache_mode=cache.manifest.cache_mode,
                   samples=cache.manifest.samples,
                   target_mask=cache.manifest.shard_layout.has_target_mask,
                   segments=cache.manifest.shard_layout.has_segments,
                   vocab_size=cache.manifest.vocab_size)


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
    # (rows+1,) into the per-target arrays: row r's targets are target_offsets[r]..[r+1]
    target_offsets: np.ndarray
    # (tokens - rows,) flat: whether each position t of a row (t < len - 1) is a target;
    # None: every one is
    position_mask: np.ndarray | None
    segment_offsets: np.ndarray | None  # (rows+1,) into segments; None: one document per row
    segments: np.ndarray | None  # flat document lengths of every row
    topk_ids: np.ndarray | None  # (targets * k,) flat, stride k
    topk_logprobs: np.ndarray | None  # (targets * k,)
    tail_logmass: np.ndarray | None  # (targets,)
    tempered: np.ndarray | None  # (targets,) at the chosen temperature
    target_logprob: np.ndarray | None = None  # (targets,) teacher log p(true next token)
    sampled_ids: np.ndarray | None = None  # (entries,) unique sampled ids, per target
    sampled_counts: np.ndarray | None = None  # (entries,)
    sampled_offsets: np.ndarray | None = None  # (targets + 1,) into sampled_ids

    @property
    def num_targets(self) -> int:
        return int(self.target_offsets[-1])

    def target_span(self, row: int) -> slice:
        """Where row `row`'s targets lie in the per-target arrays (stored back to back)."""
        return slice(int(self.target_offsets[row]), int(self.target_offsets[row + 1]))

    def positions_of(self, row: int) -> np.ndarray:
        """(len - 1,) bool: which positions of row `row` are targets."""
        length = int(self.offsets[row + 1] - self.offsets[row])
        if self.position_mask is None:
            return np.ones(length - 1, dtype=bool)
        start = int(self.offsets[row]) - row
        return self.position_mask[start:start + length - 1]

    def segments_of(self, row: int) -> list[int] | None:
        """Lengths of the documents packed into row `row`, or None for one document."""
        if self.segments is None or self.segment_offsets is None:
            return None
        return self.segments[self.segment_offsets[row]:self.segment_offsets[row + 1]].tolist()


def _targets_and_segments(table: pa.Table, columns: Columns, offsets: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None,
                                     np.ndarray | None]:
    """(target offsets, flat position mask, segment offsets, flat segments) of a row group."""
    rows = table.num_rows
    lengths = np.diff(offsets)
    mask = None
    if columns.target_mask:
        mask_offsets, mask = _flat_list(table, cols.TARGET_MASK)
        if not np.array_equal(np.diff(mask_offsets), lengths - 1):
            raise CacheFormatError("target_mask does not match input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
        mask = mask.astype(bool)  # every row has >= 1 position, so reduceat's spans are real
        per_row = (np.add.reduceat(mask, mask_offsets[:-1]).astype(np.int64) if rows
                   else np.zeros(0, np.int64))
    else:
        per_row = lengths - 1
    target_offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    segment_offsets = segments = None
    if columns.segments:
        segment_offsets, segments = _flat_list(table, cols.SEGMENTS)
        sums = np.add.reduceat(segments, segment_offsets[:-1]) if rows else lengths
        if not np.array_equal(sums, lengths) or (segments < 1).any():
            raise CacheFormatError("segments do not add up to input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
        segments = segments.astype(np.int64)
    return target_offsets, mask, segment_offsets, segments


def decode_row_group(table: pa.Table, columns: Columns) -> RowGroup:
    offsets, input_ids = _flat_list(table, cols.INPUT_IDS)
    group = RowGroup(offsets, input_ids, *_targets_and_segments(table, columns, offsets),
                     None, None, None, None)
    targets = group.num_targets
    if columns.teacher and columns.cache_mode == "sampled":
        _, deltas = _flat_list(table, cols.SAMPLED_ID_DELTAS)
        _, group.sampled_counts = _flat_list(table, cols.SAMPLED_COUNTS)
        _, lengths = _flat_list(table, cols.SAMPLED_LENGTHS)
        group.sampled_ids, group.sampled_offsets = decode_sampled(deltas, lengths)
        if lengths.size != targets or group.sampled_counts.size != group.sampled_ids.size:
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
        if group.topk_ids.size != targets * columns.top_k or group.tail_logmass.size != targets:
            raise CacheFormatError("top-k columns do not match input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
        if columns.tempered_index is not None:
            _, tempered = _flat_list(table, cols.TAIL_LOGMASS_TEMPERED)  # (targets * n_temps,)
            group.tempered = tempered.reshape(targets, columns.num_tempered)[
                :, columns.tempered_index]
    if columns.target_logprob:
        _, group.target_logprob = _flat_list(table, cols.TARGET_LOGPROB)
        if group.target_logprob.size != targets:
            raise CacheFormatError("target_logprob does not match input_ids lengths; run "
                                   "`kdpipe verify` on the cache")
    # An id outside the vocabulary (a shard altered and read with --no-verify-reads) would
    # stop an embedding or gather with an index error deep in torch: name it here instead.
    for name, ids in ((cols.INPUT_IDS, group.input_ids), (cols.TOPK_IDS, group.topk_ids),
                      (cols.SAMPLED_ID_DELTAS, group.sampled_ids)):
        if columns.vocab_size is not None and ids is not None and ids.size and (
                int(ids.max()) >= columns.vocab_size or int(ids.min()) < 0):
            wrong = int(ids.max()) if int(ids.max()) >= columns.vocab_size else int(ids.min())
            raise CacheFormatError(f"{name} holds the id {wrong}, outside the cache's "
                                   f"{columns.vocab_size} token ids; run `kdpipe verify` on "
                                   "the cache, or re-create it")
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


class RowGroupReader:
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
        with self.index.cache.reading(shard):
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
            self.index.cache.check_shards([shard])  # free unless the file changed since
            self.files[shard.file] = self.index.cache.open_shard(shard)
            if len(self.files) > OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files.move_to_end(shard.file)
        return self.files[shard.file]

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
        self.groups.clear()
