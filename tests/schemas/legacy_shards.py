"""Shards as earlier kdpipe versions wrote them, for the tests that check they still read.

Until the measurement of docs/benchmarks.md ("Bytes per entry at a real vocabulary"), the
writer dictionary-encoded the top-k integer columns (`topk_ids`, `topk_id_deltas`,
`topk_logprob_q`) and byte-stream-split only the float columns. The columns and their types
are unchanged; only the Parquet pages differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from kdpipe.schemas import shard as cols
from kdpipe.schemas.shard import ShardLayout
from kdpipe.schemas.shard_writer import SequenceTargets, build_table

DICTIONARY_BEFORE = (cols.TOPK_IDS, cols.TOPK_ID_DELTAS, cols.TOPK_LOGPROB_Q,
                     cols.SAMPLED_ID_DELTAS, cols.SAMPLED_COUNTS, cols.SAMPLED_LENGTHS)
BYTE_STREAM_SPLIT_BEFORE = (cols.TOPK_LOGPROBS, cols.TAIL_LOGMASS, cols.TARGET_LOGPROB,
                            cols.TAIL_LOGMASS_TEMPERED)


def write_dictionary_shard(path: Path, layout: ShardLayout, sample_ids: Sequence[int],
                           sequences: Sequence[Sequence[int]],
                           targets: Sequence[SequenceTargets]) -> None:
    """Write a shard with the Parquet options kdpipe used before byte-stream-split ids."""
    table = build_table(layout, sample_ids, sequences, targets)
    names = set(table.column_names)
    pq.write_table(table, path, row_group_size=cols.ROW_GROUP_SIZE,
                   compression=cols.SHARD_COMPRESSION,
                   compression_level=cols.SHARD_COMPRESSION_LEVEL,
                   use_dictionary=[cols.parquet_leaf(c) for c in DICTIONARY_BEFORE if c in names],
                   use_byte_stream_split=[cols.parquet_leaf(c) for c in BYTE_STREAM_SPLIT_BEFORE
                                          if c in names])
