"""Verified reads: every reader of a cache checks a shard's sha256 before first decoding it, once
per process, and stops with the shard's name; --no-verify-reads skips the check."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe.schemas import shard as cols
from kdpipe.schemas import shard_checksum
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.shard_reader import build_index, columns_for
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.train import train

from ..conftest import run_cli
from .conftest import small_config

EDITED_SHARD = 2  # of the tiny cache's shards of 16 sequences


def edit_one_topk_id(path: Path) -> None:
    """Rewrite `path` with one `topk_ids` entry changed: still a valid Parquet file of the
    right schema, which pyarrow reads without complaint, as after a flipped bit on disk."""
    table = pq.read_table(path)
    ids = table.column(cols.TOPK_IDS).combine_chunks()
    values = ids.values.to_numpy().copy()
    values[3] = (int(values[3]) + 1) % 300
    changed = pa.ListArray.from_arrays(ids.offsets, pa.array(values, ids.type.value_type))
    index = table.schema.get_field_index(cols.TOPK_IDS)
    pq.write_table(table.set_column(index, table.field(index), changed), path,
                   row_group_size=cols.ROW_GROUP_SIZE, compression=cols.SHARD_COMPRESSION)


@pytest.fixture()
def edited_cache(tiny_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny cache with one value of one shard changed: (cache, that shard)."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    shard = cache / open_cache(cache).manifest.shards[EDITED_SHARD].file
    edit_one_topk_id(shard)
    return cache, shard


def expect_checksum_error(code: int, err: str, cache: Path, shard: Path) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after the student's loading bar, if any
    assert last.startswith("kdpipe: error: ") and err.count("kdpipe: error") == 1
    assert f"cache shard {shard} does not match its checksum" in last
    assert f"kdpipe verify {cache}" in last


def test_every_reader_stops_at_an_edited_shard(edited_cache: tuple[Path, Path],
                                               tiny_student_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cache, shard = edited_cache
    run = tmp_path / "run"
    train_args = ["train-student", "--cache", str(cache), "--out", str(run), "--student",
                  str(tiny_student_dir), "--device", "cpu", "--max-steps", "1",
                  "--batch-size", "4", "--no-progress"]
    expect_checksum_error(*run_cli(train_args, capsys)[::2], cache, shard)
    assert not run.exists()  # stopped before the run folder was made
    evaluate_args = ["evaluate", "--cache", str(cache), "--student", str(tiny_student_dir),
                     "--device", "cpu"]
    expect_checksum_error(*run_cli(evaluate_args, capsys)[::2], cache, shard)
    curriculum = tmp_path / "curriculum.parquet"
    build_args = ["build-curriculum", "--cache", str(cache), "--out", str(curriculum),
                  "--no-progress"]
    expect_checksum_error(*run_cli(build_args, capsys)[::2], cache, shard)
    assert not curriculum.exists()

    # The user who ran `kdpipe verify` (or accepts the edit) can skip the check.
    code, out, err = run_cli([*train_args, "--no-verify-reads"], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 1
    assert run_cli([*build_args, "--no-verify-reads"], capsys)[0] == 0


def test_a_shard_changed_under_the_loader_stops_it_in_the_consumer(
        edited_cache: tuple[Path, Path], tiny_cache: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The loader thread checks a shard when it opens it; a shard edited after the index was
    built raises in the training loop's thread, with no traceback from the loader's."""
    cache = tmp_path / "fresh"
    shutil.copytree(tiny_cache, cache)
    opened = open_cache(cache)
    index = build_index(opened)
    edit_one_topk_id(cache / opened.manifest.shards[EDITED_SHARD].file)
    columns = columns_for(opened, teacher=True, temperature=1.0)
    with pytest.raises(CacheFormatError, match="does not match its checksum"), \
            BatchLoader(index, index.sample_ids, columns, batch_size=8) as loader:
        for _ in loader:
            pass
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Exception in thread" not in captured.err


def test_each_shard_is_hashed_once_per_process_until_it_changes(
        tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    hashed: list[str] = []
    real = shard_checksum.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(shard_checksum, "sha256_file", counting)
    opened = open_cache(cache)
    shards = opened.manifest.shards
    index = build_index(opened)
    assert sorted(hashed) == sorted(s.file for s in shards)
    build_index(open_cache(cache))  # a second reader in this process: no hashing
    columns = columns_for(opened, teacher=True, temperature=1.0)
    with BatchLoader(index, index.sample_ids, columns, batch_size=8) as loader:
        assert sum(len(b.sample_ids) for b in loader) == len(index)
    assert len(hashed) == len(shards)
    path = cache / shards[0].file
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: re-hashed
    build_index(open_cache(cache))
    assert len(hashed) == len(shards) + 1 and hashed[-1] == shards[0].file
    build_index(open_cache(cache, verify_reads=False))
    assert len(hashed) == len(shards) + 1


def test_no_verify_reads_is_accepted_on_resume(tiny_cache: Path, tiny_student_dir: Path,
                                               tmp_path: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir),
                       max_steps=2, mode="ce", snapshots=False)
    assert train(cfg)["step"] == 2
    resumed = train(replace(cfg, max_steps=3, resume=True, verify_reads=False))
    assert resumed["step"] == 3
    # A finished run is recognised whether or not reads are verified.
    assert train(replace(cfg, max_steps=3, verify_reads=False)) == resumed


def test_an_edited_shard_reads_without_error_until_checked(
        edited_cache: tuple[Path, Path], tiny_cache: Path) -> None:
    """Why the check exists: pyarrow reads the edited shard as if nothing happened."""
    cache, shard = edited_cache

    def topk_ids(path: Path) -> np.ndarray:
        table = pq.read_table(path, columns=[cols.TOPK_IDS])
        return table.column(0).combine_chunks().values.to_numpy()

    changed = topk_ids(shard) != topk_ids(tiny_cache / shard.name)
    assert changed.sum() == 1
    with pytest.raises(CacheFormatError, match=shard.name):
        build_index(open_cache(cache))
    assert len(build_index(open_cache(cache, verify_reads=False))) > 0


@pytest.mark.parametrize("workers", [0, 1])
def test_an_id_outside_the_vocabulary_is_one_line_without_verified_reads(
        tiny_cache: Path, tiny_student_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], workers: int) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    shard = cache / open_cache(cache).manifest.shards[EDITED_SHARD].file
    table = pq.read_table(shard)
    ids = table.column(cols.TOPK_IDS).combine_chunks()
    values = ids.values.to_numpy().copy()
    values[3] = open_cache(cache).manifest.vocab_size + 7  # a flipped high bit, say
    changed = pa.ListArray.from_arrays(ids.offsets, pa.array(values, ids.type.value_type))
    index = table.schema.get_field_index(cols.TOPK_IDS)
    pq.write_table(table.set_column(index, table.field(index), changed), shard,
                   row_group_size=cols.ROW_GROUP_SIZE, compression=cols.SHARD_COMPRESSION)
    code, _, err = run_cli(["train-student", "--cache", str(cache), "--student",
                            str(tiny_student_dir), "--out", str(tmp_path / "run"),
                            "--device", "cpu", "--no-progress", "--no-verify-reads",
                            "--loader-workers", str(workers), "--shuffle-window", "64"], capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kdpipe: error: {shard} row group 0: topk_ids holds the id "), last
    assert "outside the cache's" in last and "kdpipe verify" in last
