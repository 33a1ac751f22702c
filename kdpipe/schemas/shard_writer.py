"""Write a cache shard: teacher outputs (`SequenceTargets`, what every teacher backend hands
over) into one Parquet file, written under a temporary name and renamed.

Columns are built straight from numpy buffers with the schema from `shard.py` (never
inferred), so a shard is bit-for-bit determined by its inputs and layout. `shard_reader.py`
reads it back; `encoding.py` holds the compact encodings both use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache_verify import tokens_digest
from kdpipe.schemas.encoding import delta_encode_segments, encode_topk
from kdpipe.schemas.io import atomic_path, sha256_file
from kdpipe.schemas.manifest import ShardInfo
from kdpipe.schemas.shard import ShardLayout

_NUMPY = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "int32": np.int32,
          "float16": np.float16, "float32": np.float32}


@dataclass
class SequenceTargets:
    """Teacher outputs for one sequence of T tokens at its N target positions: all T - 1, or
    those its target mask selects (chat data), in order."""

    topk_ids: np.ndarray  # (N, k) int64
    topk_logprobs: np.ndarray  # (N, k) float32
    tail_logmass: np.ndarray  # (N,) float32, -inf when k = V
    target_logprob: np.ndarray  # (N,) float32
    tail_logmass_tempered: np.ndarray | None  # (N, n_temperatures) float32
    nll: float
    entropy: float
    confidence: float
    top1: float
    # Sampled caches only: per position the unique ids among N draws (ascending), their
    # counts, and how many unique ids each position has.
    sampled_ids: np.ndarray | None = None  # (entries,) int64
    sampled_counts: np.ndarray | None = None  # (entries,) int64, sum N per position
    sampled_lengths: np.ndarray | None = None  # (N,) int64

    def first_invalid(self) -> tuple[str, int | None, float] | None:
        """(column, target position or None for a per-sequence value, value) of the first
        value a cache must not hold (`schemas.shard.first_invalid`), or None."""
        per_position = {cols.TOPK_LOGPROBS: self.topk_logprobs,
                        cols.TAIL_LOGMASS: self.tail_logmass,
                        cols.TARGET_LOGPROB: self.target_logprob,
                        cols.TAIL_LOGMASS_TEMPERED: self.tail_logmass_tempered}
        for column, values in per_position.items():
            if values is None or values.size == 0:
                continue
            index = cols.first_invalid(column, values.reshape(-1))
            if index is not None:
                return column, index // (values.size // values.shape[0]), float(
                    values.reshape(-1)[index])
        stats = {cols.TEACHER_NLL: self.nll, cols.TEACHER_ENTROPY: self.entropy,
                 cols.TEACHER_CONFIDENCE: self.confidence, cols.TEACHER_TOP1: self.top1}
        for column, value in stats.items():
            if cols.first_invalid(column, np.array([value])) is not None:
                return column, None, value
        return None


def _list_column(values: Sequence[np.ndarray], dtype: str, arrow_type: pa.DataType) -> pa.Array:
    """A list<arrow_type> column from one flat numpy array per row."""
    lengths = np.fromiter((v.size for v in values), dtype=np.int64, count=len(values))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([v.reshape(-1) for v in values]).astype(_NUMPY[dtype], copy=False)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                    pa.array(flat, arrow_type.value_type))


def _num_targets(sequences: Sequence[Sequence[int]],
                 target_masks: Sequence[np.ndarray] | None) -> list[int]:
    if target_masks is None:
        return [len(s) - 1 for s in sequences]
    for s, mask in zip(sequences, target_masks, strict=True):
        if mask.shape != (len(s) - 1,):
            raise ValueError(f"a target mask of shape {mask.shape} for a sequence of {len(s)} "
                             "tokens (expected one flag per position but the last)")
    return [int(mask.sum()) for mask in target_masks]


def build_table(layout: ShardLayout, sample_ids: Sequence[int],
                sequences: Sequence[Sequence[int]], targets: Sequence[SequenceTargets],
                target_masks: Sequence[np.ndarray] | None = None,
                segments: Sequence[Sequence[int]] | None = None) -> pa.Table:
    """The shard table. `target_masks` (one (T-1,) bool array per sequence) when the layout has
    them: `targets` then hold the masked positions only; `segments` (document lengths summing
    to each T) when it has them. Raises ValueError when inputs disagree with the layout."""
    schema = layout.schema()
    if (target_masks is not None) != layout.has_target_mask or (
            segments is not None) != layout.has_segments:
        raise ValueError("target masks and segments must be given exactly when the layout "
                         "has them")
    num_targets = _num_targets(sequences, target_masks)
    for n, t in zip(num_targets, targets, strict=True):
        if t.target_logprob.shape[0] != n:
            raise ValueError(f"teacher targets for {t.target_logprob.shape[0]} positions, the "
                             f"sequence has {n}")
    if segments is not None and any(sum(g) != len(s) or min(g, default=0) < 1
                                    for g, s in zip(segments, sequences, strict=True)):
        raise ValueError("segments must be positive lengths summing to the sequence length")

    def lists(name: str, rows: Sequence[np.ndarray], dtype: str) -> pa.Array:
        return _list_column(rows, dtype, schema.field(name).type)

    arrays = {
        cols.SAMPLE_ID: pa.array(sample_ids, pa.int64()),
        cols.INPUT_IDS: lists(cols.INPUT_IDS, [np.asarray(s) for s in sequences],
                              layout.id_dtype),
    }
    if layout.cache_mode == "sampled":
        _add_sampled(arrays, lists, targets, layout.id_dtype)
    elif layout.encoding == "compact":
        encoded = [encode_topk(t.topk_ids, t.topk_logprobs) for t in targets]
        arrays[cols.TOPK_ID_DELTAS] = lists(cols.TOPK_ID_DELTAS, [d for d, _ in encoded],
                                            layout.id_dtype)
        arrays[cols.TOPK_LOGPROB_Q] = lists(cols.TOPK_LOGPROB_Q, [q for _, q in encoded],
                                            "uint16")
    else:
        arrays[cols.TOPK_IDS] = lists(cols.TOPK_IDS, [t.topk_ids for t in targets],
                                      layout.id_dtype)
        arrays[cols.TOPK_LOGPROBS] = lists(cols.TOPK_LOGPROBS,
                                           [t.topk_logprobs for t in targets],
                                           layout.logprob_dtype)
    if layout.cache_mode == "topk":
        arrays[cols.TAIL_LOGMASS] = lists(cols.TAIL_LOGMASS, [t.tail_logmass for t in targets],
                                          "float32")
    arrays[cols.TARGET_LOGPROB] = lists(cols.TARGET_LOGPROB,
                                        [t.target_logprob for t in targets], "float32")
    if layout.has_tempered_tails:
        tempered = [t.tail_logmass_tempered for t in targets]
        assert all(t is not None for t in tempered)
        arrays[cols.TAIL_LOGMASS_TEMPERED] = lists(
            cols.TAIL_LOGMASS_TEMPERED, tempered, "float32")  # type: ignore[arg-type]
    arrays[cols.NUM_TARGETS] = pa.array(num_targets, pa.int32())
    arrays[cols.TEACHER_NLL] = pa.array([t.nll for t in targets], pa.float32())
    arrays[cols.TEACHER_ENTROPY] = pa.array([t.entropy for t in targets], pa.float32())
    arrays[cols.TEACHER_CONFIDENCE] = pa.array([t.confidence for t in targets], pa.float32())
    arrays[cols.TEACHER_TOP1] = pa.array([t.top1 for t in targets], pa.float32())
    if target_masks is not None:
        offsets = np.concatenate([[0], np.cumsum([m.size for m in target_masks])])
        flat = (np.concatenate(target_masks).astype(bool) if target_masks
                else np.zeros(0, dtype=bool))
        arrays[cols.TARGET_MASK] = pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32), pa.int32()), pa.array(flat, pa.bool_()))
    if segments is not None:
        arrays[cols.SEGMENTS] = lists(cols.SEGMENTS, [np.asarray(g) for g in segments],
                                      "int32")
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def _add_sampled(arrays: dict[str, pa.Array],
                 lists: Callable[[str, Sequence[np.ndarray], str], pa.Array],
                 targets: Sequence[SequenceTargets], id_dtype: str) -> None:
    """The sampled-cache columns: delta-coded unique ids, their counts, ids per position."""
    deltas, counts, lengths = [], [], []
    for t in targets:
        if t.sampled_ids is None or t.sampled_counts is None or t.sampled_lengths is None:
            raise ValueError("a sampled cache needs teacher targets drawn with samples > 0")
        deltas.append(delta_encode_segments(t.sampled_ids, t.sampled_lengths))
        counts.append(t.sampled_counts)
        lengths.append(t.sampled_lengths)
    arrays[cols.SAMPLED_ID_DELTAS] = lists(cols.SAMPLED_ID_DELTAS, deltas, id_dtype)
    arrays[cols.SAMPLED_COUNTS] = lists(cols.SAMPLED_COUNTS, counts, "uint8")
    arrays[cols.SAMPLED_LENGTHS] = lists(cols.SAMPLED_LENGTHS, lengths, "uint8")


def write_shard(path: Path, layout: ShardLayout, sample_ids: Sequence[int],
                sequences: Sequence[Sequence[int]], targets: Sequence[SequenceTargets],
                target_masks: Sequence[np.ndarray] | None = None,
                segments: Sequence[Sequence[int]] | None = None) -> ShardInfo:
    """Write a complete shard atomically and describe it for the manifest (`build_table`)."""
    table = build_table(layout, sample_ids, sequences, targets, target_masks, segments)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=cols.ROW_GROUP_SIZE,
                       **cols.parquet_options(table.column_names))
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    tokens = sum(len(s) for s in sequences)
    return ShardInfo(file=path.name, rows=len(sequences), tokens=tokens,
                     targets=sum(table.column(cols.NUM_TARGETS).to_pylist()),
                     first_sample_id=int(sample_ids[0]),
                     last_sample_id=int(sample_ids[-1]), bytes=size, sha256=digest,
                     tokens_sha256=tokens_digest(sample_ids, sequences))
