"""cache-teacher on a full disk or in a folder it may not write: one line naming the file and
what ran out, exit 2, nothing half-written left, and the same command resumes."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from kdpipe.schemas.manifest import read_manifest

from ..disk import kdpipe_error, kdpipe_on_mount, needs_mount
from .conftest import run_cli

RESUME = "(nothing valid was lost: re-run the same command to resume)"


def cache_args(teacher: Path, corpus: Path, out: Path) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--out",
            str(out), "--top-k", "8", "--max-length", "48", "--shard-size", "5",
            "--batch-size", "4", "--device", "cpu", "--no-progress"]


def test_a_full_disk_stops_cache_teacher_in_one_line_and_the_same_command_resumes(
        tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cache"
    args = cache_args(tiny_teacher_dir, small_corpus, out)
    real, written = pq.write_table, []

    def full_at_the_second_shard(table: Any, where: Any, **options: Any) -> None:
        written.append(where)
        if len(written) == 2:  # as pyarrow does: part of the file, then an OSError
            Path(where).write_bytes(b"PAR1 and half a shard")
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No "
                                        "space left on device")
        real(table, where, **options)

    monkeypatch.setattr(pq, "write_table", full_at_the_second_shard)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert re.fullmatch(  # the temporary's name: the process id, then a per-write id
        rf"kdpipe: error: no space left on device writing {re.escape(str(out))}/"
        rf"\.shard-00001\.parquet\.tmp-{os.getpid()}-[0-9a-f]+; free space or choose another "
        rf"--out {re.escape(RESUME)}", kdpipe_error(err))
    assert sorted(p.name for p in out.iterdir()) == [
        "cache_config.json", "manifest.json", "shard-00000.parquet", "tokenizer"]
    manifest = read_manifest(out)
    assert not manifest.complete and [s.file for s in manifest.shards] == ["shard-00000.parquet"]

    monkeypatch.undo()
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "cache ready" in stdout, err
    assert run_cli(["verify", str(out)], capsys)[0] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_folder_without_write_permission(tiny_teacher_dir: Path, small_corpus: Path,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(cache_args(tiny_teacher_dir, small_corpus, locked / "cache"),
                               capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2
    assert kdpipe_error(err) == (f"kdpipe: error: permission denied writing {locked / 'cache'}; "
                                 f"make it writable or choose another --out {RESUME}")
    assert list(locked.iterdir()) == []


@pytest.mark.slow
@needs_mount
def test_cache_teacher_on_a_small_tmpfs(tiny_teacher_dir: Path, small_corpus: Path,
                                        tmp_path: Path) -> None:
    mount = tmp_path / "small"
    cache = mount / "cache"
    (run, check), files = kdpipe_on_mount(
        mount, "size=48k", cache_args(tiny_teacher_dir, small_corpus, cache),
        ["verify", str(cache)])
    assert run.code == 2
    line = kdpipe_error(run.err)
    assert re.fullmatch(rf"kdpipe: error: no space left on device writing {cache}/\S+\.tmp-"
                        rf"\d+-[0-9a-f]+; free space or choose another --out "
                        rf"{re.escape(RESUME)}", line), line
    assert not [f for f in files if ".tmp-" in f], files
    # What is left is whole: listed shards verify; a shard finished after the last manifest
    # that fitted is complete too, only unlisted (a re-run writes it again).
    faults = check.err.splitlines()
    assert check.code == 1 and faults[-1].endswith("incomplete: re-run the same `kdpipe "
                                                   "cache-teacher` command to finish it")
    assert all(f.endswith("shard file not listed in the manifest") for f in faults[:-1]), faults
