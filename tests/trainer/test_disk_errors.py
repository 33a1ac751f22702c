"""train-student and build-curriculum on a full disk or a read-only folder: one line naming
the file and what ran out, exit 2, no half-written checkpoint, log line or curriculum left, and
the run resumes."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError

from kdpipe.schemas.errors import DiskError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.metrics import JsonLines, truncate_after_step

from ..conftest import run_cli
from ..disk import kdpipe_error, kdpipe_on_mount, needs_mount

RESUME = "(nothing valid was lost: re-run it; --resume continues from its last complete checkpoint)"


def train_args(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--cache", str(cache), "--student", str(student), "--out",
            str(out), "--device", "cpu", "--batch-size", "4", "--mode", "ce",
            "--no-snapshots", "--no-progress", *extra]


def torch_save_full_at(call: int) -> Any:
    """torch.save that fails like torch's writer on a full disk at its `call`-th use: some
    bytes written, then a RuntimeError whose context is the OSError."""
    real, calls = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        if len(calls) < call:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a zip")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "  # noqa: B904
                               "576 vs 534")
    return save


def safetensors_full_at(call: int) -> Any:
    real, calls = transformers.modeling_utils.safe_save_file, []

    def save(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(filename)
        if len(calls) < call:
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"half a safetensors file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    return save


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_checkpoint_that_does_not_fit(writer: str, tiny_cache: Path, tiny_student_dir: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    args = train_args(tiny_cache, tiny_student_dir, run, "--max-steps", "3", "--save-every",
                      "1")
    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", torch_save_full_at(2))
    else:
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                            safetensors_full_at(2))
    code, _, err = run_cli(args, capsys)
    assert code == 2
    checkpoints = RunLayout(run).checkpoints
    assert kdpipe_error(err) == (
        f"kdpipe: error: no space left on device writing {checkpoints}/.step-000002.tmp-"
        f"{os.getpid()}; free space or choose another --out {RESUME}")
    assert [p.name for p in checkpoints.iterdir()] == ["step-000001"]  # no temporary left

    monkeypatch.undo()
    code, out, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 3


def test_a_log_line_that_does_not_fit_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = JsonLines(path)
    lines.write({"step": 1, "loss": 2.5})

    class FullDisk:
        """Takes half of a write, then reports the disk full."""

        def __init__(self, file: Any) -> None:
            self.file, self.full = file, False

        def write(self, data: memoryview) -> int:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.full = True
            return int(self.file.write(data[:len(data) // 2]))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

    lines.file = FullDisk(lines.file)  # type: ignore[assignment]
    with pytest.raises(DiskError, match=f"no space left on device writing {path}"):
        lines.write({"step": 2, "loss": 2.25})
    lines.close()
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n'
    # A line a crash cut short (no chance to cut it off) is dropped on resume.
    with path.open("a") as f:
        f.write('{"step": 2, "lo')
    truncate_after_step(path, 5)
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n'


def test_build_curriculum_in_a_read_only_folder(tiny_cache: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "curricula" / "nll.parquet"

    def read_only(table: Any, where: Any, **options: Any) -> None:  # as pyarrow reports it
        raise OSError(errno.EROFS, f"Failed to open local file '{where}'. Detail: [errno 30] "
                                   "Read-only file system")

    monkeypatch.setattr(pq, "write_table", read_only)
    code, _, err = run_cli(["build-curriculum", "--cache", str(tiny_cache), "--out", str(out),
                            "--no-progress"], capsys)
    assert code == 2
    assert re.fullmatch(  # the temporary's name: the process id, then a per-write id
        rf"kdpipe: error: read-only file system writing {re.escape(str(out.parent))}/"
        rf"\.nll\.parquet\.tmp-{os.getpid()}-[0-9a-f]+; make it writable or choose another "
        r"--out \(nothing valid was lost: re-run the same command\)", kdpipe_error(err))
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
@needs_mount
def test_on_a_read_only_file_system(tiny_cache: Path, tiny_student_dir: Path,
                                    tmp_path: Path) -> None:
    mount = tmp_path / "readonly"
    (train, build), files = kdpipe_on_mount(
        mount, "ro", train_args(tiny_cache, tiny_student_dir, mount / "run", "--max-steps", "1"),
        ["build-curriculum", "--cache", str(tiny_cache), "--out", str(mount / "c.parquet"),
         "--no-progress"])
    assert train.code == 2 and kdpipe_error(train.err) == (
        f"kdpipe: error: read-only file system writing {mount / 'run'}; make it writable or "
        f"choose another --out {RESUME}")
    assert build.code == 2 and kdpipe_error(build.err).startswith(
        f"kdpipe: error: read-only file system writing {mount}/.c.parquet.tmp-")
    assert files == []


@pytest.mark.slow
@needs_mount
def test_a_checkpoint_that_does_not_fit_on_a_small_tmpfs(tiny_cache: Path,
                                                         tiny_student_dir: Path,
                                                         tmp_path: Path) -> None:
    """The student's weights (~170 kB) do not fit in 120 kB; the run's small files do."""
    mount = tmp_path / "small"
    run = mount / "run"
    (train,), files = kdpipe_on_mount(
        mount, "size=120k", train_args(tiny_cache, tiny_student_dir, run, "--max-steps", "2",
                                       "--save-every", "1"))
    assert train.code == 2
    line = kdpipe_error(train.err)
    assert line.startswith(f"kdpipe: error: no space left on device writing {run}/checkpoints/"
                           ".step-000001.tmp-") and line.endswith(RESUME), line
    assert not [f for f in files if f.startswith("run/checkpoints/")], files
