"""The snapshot file format: written and read back, and anything else refused on read."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.metrics import SampleStats


def _stats() -> SampleStats:
    stats = SampleStats()
    ce = torch.tensor([1.0, 3.0, 2.0, 0.5, 0.5])  # per-token CE of two samples
    stats.add(torch.tensor([11, 4]), torch.tensor([0, 0, 1, 1, 1]), ce, step=7)
    stats.add(torch.tensor([4]), torch.tensor([0, 0, 0]), torch.tensor([1.0, 1.0, 1.0]), step=9)
    return stats


def test_sample_stats_round_trip(tmp_path: Path) -> None:
    stats = _stats()
    path = RunLayout(tmp_path).snapshots / snap.snapshot_name(2, 9)
    snap.write_snapshot(path, stats.table(epoch=2), epoch=2, step=9, epoch_complete=False,
                        cache_fingerprint="abc")
    table, info = snap.read_snapshot(path)
    assert (info.epoch, info.step, info.epoch_complete, info.cache_fingerprint) == \
        (2, 9, False, "abc")
    rows = {r[snap.SAMPLE_ID]: r for r in table.to_pylist()}
    assert table.column(snap.SAMPLE_ID).to_pylist() == [4, 11]
    assert rows[11][snap.LOSS] == pytest.approx(2.0)  # mean of 1 and 3
    assert rows[11][snap.CONFIDENCE] == pytest.approx((torch.exp(torch.tensor(-1.0))
                                                       + torch.exp(torch.tensor(-3.0))) / 2)
    assert rows[4][snap.SEEN] == 2 and rows[4][snap.STEP] == 9 and rows[11][snap.STEP] == 7
    assert rows[4][snap.LOSS] == pytest.approx((1.0 + 1.0) / 2)  # per-occurrence means averaged
    assert rows[4][snap.TOKENS] == 3
    assert snap.list_snapshots(tmp_path) == [(2, 9, path)]
    restored = SampleStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.table(2).equals(stats.table(2))


def test_reader_refuses_other_files(tmp_path: Path) -> None:
    table = _stats().table(epoch=0)
    bad_version = tmp_path / "v.parquet"
    pq.write_table(table.replace_schema_metadata({snap.VERSION_KEY: b"99"}), bad_version)
    with pytest.raises(CacheFormatError, match="version 99"):
        snap.read_snapshot(bad_version)
    wrong_columns = tmp_path / "c.parquet"
    pq.write_table(pa.table({"sample_id": [1]}).replace_schema_metadata(
        {snap.VERSION_KEY: str(snap.SNAPSHOT_SCHEMA_VERSION).encode()}), wrong_columns)
    with pytest.raises(CacheFormatError, match="do not match"):
        snap.read_snapshot(wrong_columns)
    with pytest.raises(FileNotFoundError):
        snap.read_snapshot(tmp_path / "missing.parquet")


def test_snapshot_names_sort_step_files_before_the_epoch_end(tmp_path: Path) -> None:
    folder = RunLayout(tmp_path).snapshots
    folder.mkdir()
    for name in ("epoch-0001.parquet", "epoch-0001-step-000012.parquet", "epoch-0000.parquet",
                 "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [(e, s) for e, s, _ in snap.list_snapshots(tmp_path)] == \
        [(0, None), (1, 12), (1, None)]
