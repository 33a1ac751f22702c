"""Shard schema 2: a target mask (teacher targets at some positions only) and packed documents'
segments survive the round trip writer → Parquet → reader → training batch; version 1 shards
still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdpipe.schemas import shard as cols
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.shard import ShardLayout, check_shard_schema
from kdpipe.schemas.shard_reader import Columns, decode_row_group
from kdpipe.schemas.shard_writer import SequenceTargets, build_table, write_shard
from kdpipe.trainer.data import collate

K = 3
SEQUENCES = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
MASKS = [np.array([0, 0, 1, 1, 0], bool), np.array([1, 1], bool), np.array([0, 0, 1], bool)]
SEGMENTS = [[2, 4], [3], [1, 1, 2]]


def targets_at(sequence: list[int], mask: np.ndarray) -> SequenceTargets:
    """Recognisable teacher values: top-1 id = the true next token, log-probs from the position."""
    positions = np.flatnonzero(mask)
    labels = np.asarray(sequence)[positions + 1]
    ids = np.stack([labels, labels + 100, labels + 200], axis=1).astype(np.int64)  # (N, K)
    lps = np.log(np.full((positions.size, K), 0.2, np.float32))
    return SequenceTargets(ids, lps, np.log(np.full(positions.size, 0.4, np.float32)),
                           -positions.astype(np.float32) - 1.0, None, 1.0, 1.0, 0.5, 1.0)


def test_masked_targets_and_segments_round_trip(tmp_path: Path) -> None:
    layout = ShardLayout("uint16", "float32", False, has_target_mask=True, has_segments=True)
    targets = [targets_at(s, m) for s, m in zip(SEQUENCES, MASKS, strict=True)]
    info = write_shard(tmp_path / "shard-00000.parquet", layout, [0, 1, 2], SEQUENCES, targets,
                       MASKS, SEGMENTS)
    assert info.targets == 5 and info.tokens == 13
    check_shard_schema(tmp_path / "shard-00000.parquet", layout)

    table = pq.read_table(tmp_path / "shard-00000.parquet")
    assert table.column(cols.NUM_TARGETS).to_pylist() == [2, 2, 1]
    assert table.column(cols.TARGET_MASK).to_pylist() == [m.tolist() for m in MASKS]
    columns = Columns(teacher=True, top_k=K, target_logprob=True, target_mask=True,
                      segments=True)
    group = decode_row_group(table.select(columns.names), columns)
    assert [group.segments_of(r) for r in range(3)] == SEGMENTS

    batch = collate([(i, group, i) for i in (2, 0)], columns, pad_id=0)  # rows in another order
    assert batch.segments == [SEGMENTS[2], SEGMENTS[0]]
    expected = [(0, 2), (1, 2), (1, 3)]  # (batch row, position) of every target
    assert np.flatnonzero(batch.target_mask.numpy()).tolist() == [
        row * batch.input_ids.shape[1] + t for row, t in expected]
    labels = [SEQUENCES[2][3], SEQUENCES[0][3], SEQUENCES[0][4]]
    assert batch.labels.tolist() == labels and batch.target_row.tolist() == [0, 1, 1]
    assert batch.teacher is not None
    assert batch.teacher.topk_ids[:, 0].tolist() == labels  # teacher rows follow the targets
    assert batch.target_logprob is not None
    assert batch.target_logprob.tolist() == [-3.0, -3.0, -4.0]


def test_disagreeing_inputs_are_refused() -> None:
    layout = ShardLayout("uint16", "float32", False, has_target_mask=True)
    targets = [targets_at(s, m) for s, m in zip(SEQUENCES, MASKS, strict=True)]
    with pytest.raises(ValueError, match="target masks and segments must be given exactly"):
        build_table(layout, [0, 1, 2], SEQUENCES, targets)
    wrong = [np.ones(len(s) - 1, bool) for s in SEQUENCES]
    with pytest.raises(ValueError, match="teacher targets for 2 positions, the sequence has 5"):
        build_table(layout, [0, 1, 2], SEQUENCES, targets, wrong)


def test_version_1_shards_still_read_and_cannot_claim_masks(tmp_path: Path) -> None:
    plain = ShardLayout("uint16", "float32", False)
    full = [np.ones(len(s) - 1, bool) for s in SEQUENCES]
    table = build_table(plain, [0, 1, 2], SEQUENCES,
                        [targets_at(s, m) for s, m in zip(SEQUENCES, full, strict=True)])
    path = tmp_path / "v1.parquet"
    metadata = {cols.SCHEMA_VERSION_KEY: b"1"}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    check_shard_schema(path, plain)
    with pytest.raises(CacheFormatError, match="shard schema version 1"):
        check_shard_schema(path, ShardLayout("uint16", "float32", False, has_target_mask=True))
    group = decode_row_group(pq.read_table(path), Columns(teacher=True, top_k=K))
    assert group.num_targets == 10 and group.segments_of(0) is None
    assert group.positions_of(0).all()
