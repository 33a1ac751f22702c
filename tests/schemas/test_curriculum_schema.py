"""The curriculum index format: ranks, percentiles and buckets, round trip, and refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe.schemas import curriculum as cur
from kdpipe.schemas.errors import CacheFormatError, ConfigError

CACHE_IDS = np.arange(100, 110, dtype=np.int64)


def example(**overrides: object) -> cur.Curriculum:
    settings: dict[str, object] = dict(
        source="teacher", metric="nll", cache_fingerprint="f" * 64,
        cache_sample_ids=CACHE_IDS, num_buckets=3, settings={"source": "teacher"})
    settings.update(overrides)
    scores = np.array([0.5, 0.1, 0.9, 0.1, 2.0, 0.3, 0.7, 0.2, 1.5, 0.4])
    ids = CACHE_IDS[::-1].copy()  # any order in; sorted by id out
    return cur.make_curriculum(ids, scores, **settings)  # type: ignore[arg-type]


def test_rank_percentile_bucket_follow_the_scores() -> None:
    ids = np.array([7, 3, 5, 9])
    rank, percentile, bucket = cur.rank_scores(ids, np.array([2.0, 1.0, 1.0, 0.5]), 2)
    # ascending score, the tie between ids 3 and 5 broken by id
    assert rank.tolist() == [3, 1, 2, 0]
    assert percentile.tolist() == [1.0, 1 / 3, 2 / 3, 0.0]
    assert bucket.tolist() == [1, 0, 1, 0]  # floor(rank * B / n)
    with pytest.raises(ValueError, match="finite"):
        cur.rank_scores(ids, np.array([1.0, np.nan, 0.0, 0.0]), 2)
    one = cur.rank_scores(np.array([4]), np.array([3.0]), 5)
    assert [a.tolist() for a in one] == [[0], [0.0], [0]]


def test_round_trip(tmp_path: Path) -> None:
    c = example(mean_confidence=np.linspace(0, 1, 10), variability=np.full(10, 0.25))
    path = tmp_path / "sub" / "c.parquet"
    cur.write_curriculum(path, c)
    back = cur.read_curriculum(path)
    assert back.info == c.info
    assert back.sample_ids.tolist() == sorted(CACHE_IDS.tolist())
    for name in ("sample_ids", "score", "rank", "percentile", "bucket", "mean_confidence",
                 "variability"):
        assert np.array_equal(getattr(back, name), getattr(c, name)), name
    # Ordered ids: ascending score, ties by id (ids 108 and 106 both have score 0.1).
    by_id = dict(zip(back.sample_ids.tolist(), back.score.tolist(), strict=True))
    ordered = back.ordered_ids().tolist()
    assert ordered == sorted(by_id, key=lambda i: (by_id[i], i))
    assert back.info.sample_ids_sha256 == cur.sample_ids_digest(CACHE_IDS)
    assert cur.is_curriculum_file(path) and not cur.is_curriculum_file(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == ["c.parquet"]  # no temporary left
    plain = example()
    cur.write_curriculum(tmp_path / "plain.parquet", plain)
    again = cur.read_curriculum(tmp_path / "plain.parquet")
    assert again.mean_confidence is None and again.variability is None


def _rewrite(path: Path, out: Path, table_edit: Callable[[pa.Table], pa.Table] | None = None,
             info_edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[cur.INFO_KEY])
    if info_edit:
        info_edit(info)
    if table_edit:
        table = table_edit(table)
    pq.write_table(table.replace_schema_metadata({cur.INFO_KEY: json.dumps(info).encode()}),
                   out)
    return out


def test_reader_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    cur.write_curriculum(good, example())
    with pytest.raises(FileNotFoundError, match="build-curriculum"):
        cur.read_curriculum(tmp_path / "missing.parquet")
    newer = _rewrite(good, tmp_path / "v.parquet",
                     info_edit=lambda i: i.update(schema_version=99))
    with pytest.raises(CacheFormatError, match="version 99"):
        cur.read_curriculum(newer)
    unknown = _rewrite(good, tmp_path / "u.parquet", info_edit=lambda i: i.update(extra=1))
    with pytest.raises(CacheFormatError, match="unknown field"):
        cur.read_curriculum(unknown)
    columns = _rewrite(good, tmp_path / "c.parquet",
                       table_edit=lambda t: t.drop_columns([cur.VARIABILITY]))
    with pytest.raises(CacheFormatError, match="do not match"):
        cur.read_curriculum(columns)

    def swap_ranks(table: pa.Table) -> pa.Table:
        ranks = table.column(cur.RANK).to_numpy().copy()
        ranks[[0, 1]] = ranks[[1, 0]]
        return table.set_column(2, table.schema.field(cur.RANK), [ranks])

    tampered = _rewrite(good, tmp_path / "t.parquet", table_edit=swap_ranks)
    with pytest.raises(CacheFormatError, match="do not follow the scores"):
        cur.read_curriculum(tampered)
    truncated = _rewrite(good, tmp_path / "r.parquet", table_edit=lambda t: t.slice(0, 5))
    with pytest.raises(CacheFormatError, match="sample ids"):
        cur.read_curriculum(truncated)
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(good).replace_schema_metadata(None), bare)
    with pytest.raises(CacheFormatError, match="not a kdpipe curriculum"):
        cur.read_curriculum(bare)


def test_check_matches_cache_refuses_other_caches() -> None:
    c = example()
    cur.check_matches_cache(c, "--curriculum c", "cache", "f" * 64, CACHE_IDS, CACHE_IDS[:4])
    with pytest.raises(ConfigError, match="settings fingerprint"):
        cur.check_matches_cache(c, "--curriculum c", "cache", "e" * 64, CACHE_IDS, CACHE_IDS)
    with pytest.raises(ConfigError, match="other sample ids"):
        cur.check_matches_cache(c, "--curriculum c", "cache", "f" * 64, CACHE_IDS + 1,
                                CACHE_IDS)
    subset = cur.make_curriculum(CACHE_IDS[:5], np.arange(5.0), source="snapshot",
                                 metric="nll", cache_fingerprint="f" * 64,
                                 cache_sample_ids=CACHE_IDS, num_buckets=2)
    with pytest.raises(ConfigError, match="5 training samples .* are not among them"):
        cur.check_matches_cache(subset, "--curriculum s", "cache", "f" * 64, CACHE_IDS,
                                CACHE_IDS)
    message = ""
    try:
        cur.check_matches_cache(c, "--curriculum c", "cache", "e" * 64, CACHE_IDS, CACHE_IDS)
    except ConfigError as exc:
        message = str(exc)
    assert "\n" not in message and "--curriculum c" in message
