"""Shards at a real vocabulary (V = 151,936: uint32 ids): the writer's Parquet encodings apply,
the plain encoding round-trips exactly, the compact one within its documented error, and
shards written with the earlier Parquet options still read the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdpipe.schemas import shard as cols
from kdpipe.schemas.encoding import LOGPROB_STEP
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.shard import ShardLayout, check_shard_schema, id_dtype_for_vocab
from kdpipe.schemas.shard_reader import Columns, RowGroup, decode_row_group
from kdpipe.schemas.shard_writer import SequenceTargets, write_shard

from .legacy_shards import write_dictionary_shard

VOCAB = 151_936
K = 16
LENGTHS = (40, 2, 73)  # tokens per sequence


def teacher_outputs(seed: int = 0) -> tuple[list[np.ndarray], list[SequenceTargets]]:
    """Sequences and peaked top-k distributions whose ids span the whole vocabulary."""
    rng = np.random.default_rng(seed)
    sequences, targets = [], []
    for length in LENGTHS:
        n = length - 1
        ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(n)])  # (n, K)
        ids[:, 0] = VOCAB - 1 - np.arange(n)  # ids far above 65,535 in every row
        ids[:, 1] = np.arange(n)
        logits = np.concatenate([rng.standard_normal((n, K)) * 3, np.zeros((n, 1))], axis=1)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # (n, K + 1)
        top = -np.sort(-logp[:, :K], axis=1)
        sequences.append(rng.integers(0, VOCAB, length))
        targets.append(SequenceTargets(
            ids, top.astype(np.float32), logp[:, K].astype(np.float32),
            top[:, 0].astype(np.float32), None, 1.0, 2.0, 0.5, 0.25))
    return sequences, targets


def decode(path: Path, encoding: str) -> RowGroup:
    columns = Columns(teacher=True, top_k=K, target_logprob=True, encoding=encoding)
    return decode_row_group(pq.read_table(path, columns=columns.names), columns)


def encodings_of(path: Path) -> dict[str, tuple[str, ...]]:
    group = pq.ParquetFile(path).metadata.row_group(0)
    return {group.column(i).path_in_schema.split(".")[0]: group.column(i).encodings
            for i in range(group.num_columns)}


@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
def test_plain_round_trip_is_exact(tmp_path: Path, logprob_dtype: str) -> None:
    sequences, targets = teacher_outputs()
    layout = ShardLayout(id_dtype_for_vocab(VOCAB), logprob_dtype, False)
    assert layout.id_dtype == "uint32"
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, layout, [0, 1, 2], sequences, targets)
    check_shard_schema(path, layout)
    used = encodings_of(path)
    for name in (cols.TOPK_IDS, cols.TOPK_LOGPROBS, cols.TAIL_LOGMASS):
        assert "BYTE_STREAM_SPLIT" in used[name] and "RLE_DICTIONARY" not in used[name]

    group = decode(path, "plain")
    np.testing.assert_array_equal(group.input_ids, np.concatenate(sequences))
    np.testing.assert_array_equal(group.topk_ids,
                                  np.concatenate([t.topk_ids for t in targets]).reshape(-1))
    stored = np.concatenate([t.topk_logprobs for t in targets]).reshape(-1)
    np.testing.assert_array_equal(group.topk_logprobs, stored.astype(logprob_dtype))
    np.testing.assert_array_equal(group.tail_logmass,
                                  np.concatenate([t.tail_logmass for t in targets]))
    np.testing.assert_array_equal(group.target_logprob,
                                  np.concatenate([t.target_logprob for t in targets]))


def test_compact_round_trip_is_within_its_documented_error(tmp_path: Path) -> None:
    sequences, targets = teacher_outputs(1)
    layout = ShardLayout(id_dtype_for_vocab(VOCAB), "float16", False, "compact")
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, layout, [0, 1, 2], sequences, targets)
    check_shard_schema(path, layout)
    used = encodings_of(path)
    for name in (cols.TOPK_ID_DELTAS, cols.TOPK_LOGPROB_Q):
        assert "BYTE_STREAM_SPLIT" in used[name] and "RLE_DICTIONARY" not in used[name]

    group = decode(path, "compact")
    assert group.topk_ids is not None and group.topk_logprobs is not None
    ids = np.concatenate([t.topk_ids for t in targets])  # (N, K)
    exact = np.concatenate([t.topk_logprobs for t in targets]).astype(np.float64)
    tail = np.concatenate([t.tail_logmass for t in targets]).astype(np.float64)
    out_ids = group.topk_ids.reshape(-1, K)
    out_lp = group.topk_logprobs.reshape(-1, K).astype(np.float64)
    by_id, out_by_id = np.argsort(ids, 1), np.argsort(out_ids, 1)
    np.testing.assert_array_equal(np.take_along_axis(ids, by_id, 1),
                                  np.take_along_axis(out_ids, out_by_id, 1))  # ids exact
    exact = np.take_along_axis(exact, by_id, 1)
    decoded = np.take_along_axis(out_lp, out_by_id, 1)
    assert np.abs(decoded - exact).max() <= LOGPROB_STEP / 2 + 1e-6
    p = np.concatenate([exact, tail[:, None]], axis=1)
    q = np.concatenate([decoded, tail[:, None]], axis=1)
    p -= np.logaddexp.reduce(p, axis=1, keepdims=True)
    q -= np.logaddexp.reduce(q, axis=1, keepdims=True)  # as the trainer renormalises
    assert (np.exp(p) * (p - q)).sum(1).max() <= LOGPROB_STEP ** 2 / 8 + 1e-9


@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_shards_written_with_the_earlier_options_read_the_same(tmp_path: Path,
                                                               encoding: str) -> None:
    sequences, targets = teacher_outputs(2)
    layout = ShardLayout(id_dtype_for_vocab(VOCAB), "float16", False, encoding)
    old, new = tmp_path / "old" / "shard-00000.parquet", tmp_path / "new" / "shard-00000.parquet"
    old.parent.mkdir()
    new.parent.mkdir()
    write_dictionary_shard(old, layout, [0, 1, 2], sequences, targets)
    write_shard(new, layout, [0, 1, 2], sequences, targets)
    ids = cols.TOPK_IDS if encoding == "plain" else cols.TOPK_ID_DELTAS
    assert "RLE_DICTIONARY" in encodings_of(old)[ids]  # the test really reads the old pages
    assert sha256_file(old) != sha256_file(new)
    check_shard_schema(old, layout)
    before, now = decode(old, encoding), decode(new, encoding)
    for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"):
        np.testing.assert_array_equal(getattr(before, name), getattr(now, name))
