"""The Parquet schema of a cache shard: one row per sequence, explicit types, never inferred.

Per-position columns hold one value per *target* position (position t predicts token t+1 of
`input_ids`): every t = 0..T-2, or, when the shard has a `target_mask` column (T-1 booleans),
only the positions where it is true, in order (chat data: the assistant's tokens). The top-k
columns are flat with stride k: entry `i * k + j` is the j-th most likely next token at the
i-th target position, in descending order of log-prob. The compact encoding
(`kdpipe.schemas.encoding`) replaces the two top-k columns with `topk_id_deltas` and
`topk_logprob_q`, same stride, ascending id order. A packed sequence may carry `segments`, the
lengths of the documents packed into it (summing to T): attention never crosses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas.errors import CacheFormatError

# 2: optional `target_mask` and `segments` columns. Version 1 shards (neither column) still read.
SHARD_SCHEMA_VERSION = 2
READABLE_SHARD_VERSIONS = (1, 2)
SCHEMA_VERSION_KEY = b"kdpipe.schema_version"
SHARD_COMPRESSION = "zstd"
SHARD_COMPRESSION_LEVEL = 6
ROW_GROUP_SIZE = 64  # sequences per row group: a reader's unit of decoding and prefetch

# Column names: the public contract (docs/cache-format.md documents each).
SAMPLE_ID = "sample_id"
INPUT_IDS = "input_ids"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TOPK_ID_DELTAS = "topk_id_deltas"  # compact encoding
TOPK_LOGPROB_Q = "topk_logprob_q"  # compact encoding
SAMPLED_ID_DELTAS = "sampled_id_deltas"  # sampled cache: unique ids, ascending, delta-coded
SAMPLED_COUNTS = "sampled_counts"  # sampled cache: how often each id was drawn
SAMPLED_LENGTHS = "sampled_lengths"  # sampled cache: unique ids per target position
TAIL_LOGMASS = "tail_logmass"
TARGET_LOGPROB = "target_logprob"
TAIL_LOGMASS_TEMPERED = "tail_logmass_tempered"
NUM_TARGETS = "num_targets"
TEACHER_NLL = "teacher_nll"
TEACHER_ENTROPY = "teacher_entropy"
TEACHER_CONFIDENCE = "teacher_confidence"
TEACHER_TOP1 = "teacher_top1"
TARGET_MASK = "target_mask"  # (T-1,) bool per sequence: which positions are targets
SEGMENTS = "segments"  # lengths of the documents packed into a sequence, summing to T

SEQUENCE_STATS = (TEACHER_NLL, TEACHER_ENTROPY, TEACHER_CONFIDENCE, TEACHER_TOP1)

# Values a cache never holds: NaN and +inf anywhere, -inf outside the columns where it is a
# probability of exactly 0 (an id the teacher rules out, the empty tail of a k = V cache).
FLOAT_COLUMNS = (TOPK_LOGPROBS, TAIL_LOGMASS, TAIL_LOGMASS_TEMPERED, TARGET_LOGPROB,
                 *SEQUENCE_STATS)
ZERO_MASS_COLUMNS = (TOPK_LOGPROBS, TAIL_LOGMASS, TAIL_LOGMASS_TEMPERED)

# Parquet encodings, chosen by measurement (docs/benchmarks.md, "Bytes per entry at a real
# vocabulary"): byte-stream-split, then zstd, stores the top-k ids, deltas and quantised levels
# at about their order-0 entropy, where a dictionary bit-packs its indices at a fixed width
# that zstd compresses poorly. At 128k-152k vocabularies that makes compact caches 15-19% and
# plain ones 5-10% smaller than dictionary-encoded ids; on a trained 2,048-token teacher,
# compact 9% smaller and plain the same (-0.2% at k = 64, +1.5% at k = 32), so one rule serves
# every vocabulary. The sampled columns keep the dictionary
# they were measured with. pyarrow applies these per-column options to leaf paths only (a list
# column's top-level name is silently ignored), hence `parquet_leaf`. Each Parquet page records
# its encoding, so shards written with the earlier choices read the same.
DICTIONARY_COLUMNS = (SAMPLED_ID_DELTAS, SAMPLED_COUNTS, SAMPLED_LENGTHS)
BYTE_STREAM_SPLIT_COLUMNS = (TOPK_IDS, TOPK_LOGPROBS, TOPK_ID_DELTAS, TOPK_LOGPROB_Q,
                             TAIL_LOGMASS, TARGET_LOGPROB, TAIL_LOGMASS_TEMPERED)


def first_invalid(column: str, values: np.ndarray) -> int | None:
    """Index of the first value of `column` (flat floats) that a cache must not hold, or None."""
    bad = np.isnan(values) | np.isposinf(values)
    if column not in ZERO_MASS_COLUMNS:
        bad |= np.isneginf(values)
    found = np.flatnonzero(bad)
    return int(found[0]) if found.size else None


def invalid_values(table: pa.Table) -> list[str]:
    """One line per float column of a shard table holding a value it must not (`first_invalid`),
    naming the sample and the target position."""
    problems = []
    for name in (c for c in FLOAT_COLUMNS if c in table.column_names):
        column = table.column(name).combine_chunks()
        nested = pa.types.is_list(column.type)
        flat = (column.flatten() if nested else column).to_numpy(zero_copy_only=False)
        index = first_invalid(name, flat)
        if index is None:
            continue
        row, detail = index, ""
        if nested:
            offsets = column.offsets.to_numpy()
            row = int(np.searchsorted(offsets, index, side="right")) - 1
            per_position = 1
            if NUM_TARGETS in table.column_names:
                targets = int(table.column(NUM_TARGETS)[row].as_py())
                per_position = max((int(offsets[row + 1]) - int(offsets[row])) // max(targets, 1),
                                   1)
            position = (index - int(offsets[row])) // per_position  # i-th target of the row
            if TARGET_MASK in table.column_names:  # the i-th masked position
                mask = np.asarray(table.column(TARGET_MASK)[row].as_py(), dtype=bool)
                position = int(np.flatnonzero(mask)[position])
            detail = f", target position {position}"
        sample = (table.column(SAMPLE_ID)[row].as_py() if SAMPLE_ID in table.column_names
                  else f"row {row}")
        problems.append(f"{name} holds {flat[index]} at sample {sample}{detail}")
    return problems


def shard_name(index: int) -> str:
    """File name of shard `index`, the one holding sample ids from index * shard_size on."""
    return f"shard-{index:05d}.parquet"


def parquet_leaf(column: str) -> str:
    """The Parquet leaf path of one of our list columns (what per-column options must name)."""
    return f"{column}.list.element"


def parquet_options(column_names: Sequence[str]) -> dict[str, Any]:
    """`pyarrow.parquet.write_table` keyword arguments for a shard with these columns: the
    codec and the per-column encodings above. Readers need none of this: each Parquet page
    records its own encoding, so a shard written with other options reads the same."""
    names = set(column_names)
    return {"compression": SHARD_COMPRESSION, "compression_level": SHARD_COMPRESSION_LEVEL,
            "use_dictionary": [parquet_leaf(c) for c in DICTIONARY_COLUMNS if c in names],
            "use_byte_stream_split": [parquet_leaf(c) for c in BYTE_STREAM_SPLIT_COLUMNS
                                      if c in names]}


ID_DTYPES = {"uint16": pa.uint16(), "uint32": pa.uint32()}
LOGPROB_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def id_dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class ShardLayout:
    """What varies between caches: integer width, log-prob precision, tempered tails stored,
    and the top-k encoding ("plain": ids and float log-probs; "compact": see encoding.py)."""

    id_dtype: str
    logprob_dtype: str
    has_tempered_tails: bool
    encoding: str = "plain"
    cache_mode: str = "topk"  # "sampled": sampled ids and counts instead of top-k and tail
    has_target_mask: bool = False  # targets at masked positions only (schema 2)
    has_segments: bool = False  # packed documents' lengths (schema 2)

    def schema(self) -> pa.Schema:
        ids = ID_DTYPES[self.id_dtype]
        fields = [
            pa.field(SAMPLE_ID, pa.int64(), nullable=False),
            pa.field(INPUT_IDS, pa.list_(ids), nullable=False),
        ]
        if self.cache_mode == "sampled":
            fields += [
                pa.field(SAMPLED_ID_DELTAS, pa.list_(ids), nullable=False),
                pa.field(SAMPLED_COUNTS, pa.list_(pa.uint8()), nullable=False),
                pa.field(SAMPLED_LENGTHS, pa.list_(pa.uint8()), nullable=False),
                pa.field(TARGET_LOGPROB, pa.list_(pa.float32()), nullable=False),
            ]
        elif self.cache_mode != "topk":
            raise KeyError(f"cache_mode {self.cache_mode!r}")
        elif self.encoding == "plain":
            fields += [
                pa.field(TOPK_IDS, pa.list_(ids), nullable=False),
                pa.field(TOPK_LOGPROBS, pa.list_(LOGPROB_DTYPES[self.logprob_dtype]),
                         nullable=False),
            ]
        elif self.encoding == "compact":
            fields += [
                pa.field(TOPK_ID_DELTAS, pa.list_(ids), nullable=False),
                pa.field(TOPK_LOGPROB_Q, pa.list_(pa.uint16()), nullable=False),
            ]
        else:
            raise KeyError(f"encoding {self.encoding!r}")
        if self.cache_mode == "topk":
            fields += [
                pa.field(TAIL_LOGMASS, pa.list_(pa.float32()), nullable=False),
                pa.field(TARGET_LOGPROB, pa.list_(pa.float32()), nullable=False),
            ]
        if self.has_tempered_tails:
            fields.append(pa.field(TAIL_LOGMASS_TEMPERED, pa.list_(pa.float32()), nullable=False))
        fields.append(pa.field(NUM_TARGETS, pa.int32(), nullable=False))
        fields.extend(pa.field(name, pa.float32(), nullable=False) for name in SEQUENCE_STATS)
        if self.has_target_mask:
            fields.append(pa.field(TARGET_MASK, pa.list_(pa.bool_()), nullable=False))
        if self.has_segments:
            fields.append(pa.field(SEGMENTS, pa.list_(pa.int32()), nullable=False))
        metadata = {SCHEMA_VERSION_KEY: str(SHARD_SCHEMA_VERSION).encode()}
        return pa.schema(fields, metadata=metadata)


def check_shard_schema(path: Path | str, layout: ShardLayout, source: Any = None) -> None:
    """Raise CacheFormatError unless the Parquet file at `path` has exactly `layout`'s schema;
    read from `source` (an open file, e.g. a shard streamed from a store) when given."""
    try:
        found = pq.read_schema(path if source is None else source)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CacheFormatError(f"{path}: not a readable Parquet file ({exc}); "
                               "run `kdpipe verify` on the cache") from exc
    version = (found.metadata or {}).get(SCHEMA_VERSION_KEY)
    readable = {str(v).encode() for v in READABLE_SHARD_VERSIONS}
    if version not in readable or (version == b"1" and (layout.has_target_mask
                                                        or layout.has_segments)):
        shown = version.decode() if version else "none"
        raise CacheFormatError(
            f"{path}: shard schema version {shown}, this kdpipe reads versions "
            f"{', '.join(map(str, READABLE_SHARD_VERSIONS))} (version 1 without target masks or "
            "segments); re-create the cache or use a matching kdpipe"
        )
    expected = layout.schema()
    if not found.remove_metadata().equals(expected.remove_metadata()):
        raise CacheFormatError(
            f"{path}: columns do not match the manifest's layout "
            f"(expected {expected.remove_metadata()}, found {found.remove_metadata()})"
        )
