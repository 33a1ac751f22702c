"""Every bad input gets one line naming the flag or file, exit code 2, and leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_cli


def base_args(teacher: Path, data: Path, out: Path) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--top-k", "4", "--max-length", "32"]


def expect_error(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("kdpipe: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("extra, needles", [
    (["--top-k", "0"], ["--top-k 0 must be >= 1"]),
    (["--top-k", "100000"], ["--top-k 100000 exceeds", "vocabulary"]),
    (["--max-length", "1"], ["--max-length 1 must be >= 2"]),
    (["--batch-size", "0", "--shard-size", "0"], ["--batch-size", "--shard-size"]),
    (["--backend", "tgi"], ["--backend"]),
    (["--tail-temperatures", "2,x"], ["--tail-temperatures"]),
    (["--tail-temperatures", "nan"], ["--tail-temperatures nan: must be a finite number"]),
    (["--tail-temperatures", "2,inf"], ["--tail-temperatures 2.0,inf: must be a finite"]),
    (["--gpu-memory-utilization", "nan"], ["--gpu-memory-utilization nan: must be a finite"]),
])
def test_bad_flags(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str], extra: list[str],
                   needles: list[str]) -> None:
    out = tmp_path / "cache"
    expect_error(base_args(tiny_teacher_dir, small_corpus, out) + extra, capsys, *needles)
    assert not out.exists()


def test_bad_inputs(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    expect_error(base_args(tiny_teacher_dir, tmp_path / "missing.jsonl", out), capsys,
                 "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    expect_error(base_args(tiny_teacher_dir, empty, out), capsys, "empty.jsonl")
    no_field = tmp_path / "content.jsonl"
    no_field.write_text(json.dumps({"content": "def f(): pass"}) + "\n")
    expect_error(base_args(tiny_teacher_dir, no_field, out), capsys, "--text-field")
    expect_error(base_args(tmp_path / "no-such-model", small_corpus, out), capsys, "--teacher")
    assert not out.exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    expect_error(base_args(tiny_teacher_dir, small_corpus, a_file), capsys, "--out", "is a file")
    assert a_file.read_text() == "x"


def test_refuses_foreign_folder_and_newer_cache(tiny_teacher_dir: Path, small_corpus: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    expect_error(base_args(tiny_teacher_dir, small_corpus, foreign) + ["--overwrite"], capsys,
                 "not a kdpipe cache")
    assert (foreign / "notes.txt").read_text() == "mine"

    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "manifest.json").write_text(json.dumps({"schema_version": 99,
                                                     "kdpipe_version": "9.0"}))
    expect_error(base_args(tiny_teacher_dir, small_corpus, newer), capsys, "upgrade kdpipe")
    expect_error(["inspect", str(newer)], capsys, "upgrade kdpipe")
    expect_error(["verify", str(newer)], capsys, "upgrade kdpipe")
    expect_error(["inspect", str(tmp_path / "nothing")], capsys, "does not exist")
