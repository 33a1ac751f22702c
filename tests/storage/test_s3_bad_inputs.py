"""Bad storage inputs: one line each, naming the URL and what to do, exit 2, nothing
written that looks valid."""

from __future__ import annotations

import socket
from pathlib import Path

import fsspec
import pytest
import s3fs

from ..conftest import run_cli


def one_error_line(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdpipe: error: "), err
    return lines[0]


def cache_args(teacher: Path, data: Path, out: str) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", out,
            "--top-k", "4", "--max-length", "32", "--no-progress"]


def test_unknown_protocol_names_the_extras(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(capsys, ["inspect", "xyz://bucket/cache"])
    assert "unknown storage protocol xyz://" in line and "kdpipe[s3]" in line


def test_missing_protocol_package_names_its_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tiny_teacher_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    real = fsspec.get_filesystem_class

    def without_gcsfs(protocol: str) -> type:
        if protocol in ("gs", "gcs"):
            raise ImportError("Please install gcsfs to access Google Storage")
        return real(protocol)

    monkeypatch.setattr(fsspec, "get_filesystem_class", without_gcsfs)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, cache_args(tiny_teacher_dir, corpus_file, "gs://b/cache"))
    assert "--out gs://b/cache" in line and "pip install 'kdpipe[gcs]'" in line
    assert not (tmp_path / "gs:").exists()  # no local folder named `gs:`


def test_missing_credentials(monkeypatch: pytest.MonkeyPatch, bucket: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    s3fs.S3FileSystem.clear_instance_cache()
    line = one_error_line(capsys, ["inspect", f"{bucket}/cache"])
    assert "no valid credentials" in line and "AWS_ACCESS_KEY_ID" in line
    assert "testing" not in line  # never a secret in a message


def test_bucket_that_does_not_exist(fs: s3fs.S3FileSystem, capsys: pytest.CaptureFixture[str],
                                    tiny_teacher_dir: Path, corpus_file: Path) -> None:
    line = one_error_line(capsys, ["inspect", "s3://no-such-bucket/cache"])
    assert "bucket 'no-such-bucket' does not exist" in line
    line = one_error_line(capsys, cache_args(tiny_teacher_dir, corpus_file,
                                             "s3://no-such-bucket/cache"))
    assert "--out s3://no-such-bucket/cache" in line and "does not exist" in line
    fs.invalidate_cache()
    assert not fs.exists("no-such-bucket")  # not created behind the user's back


def test_cache_url_without_manifest(fs: s3fs.S3FileSystem, bucket: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    fs.pipe_file(f"{bucket}/half/shard-00000.parquet", b"not listed by any manifest")
    for args in (["inspect", f"{bucket}/half"], ["verify", f"{bucket}/half"],
                 ["build-curriculum", "--cache", f"{bucket}/half", "--out", "c.parquet"]):
        line = one_error_line(capsys, args)
        assert f"{bucket}/half/manifest.json not found" in line and "not a kdpipe cache" in line


def test_unreachable_store(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                           tiny_teacher_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s3fs.S3FileSystem.clear_instance_cache()
    line = one_error_line(capsys, ["inspect", "s3://bucket/cache"])
    assert "s3://bucket/cache: the store cannot be reached" in line
    assert "AWS_ENDPOINT_URL" in line
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, cache_args(tiny_teacher_dir, corpus_file, "s3://bucket/c"))
    assert "cannot be reached" in line
    assert not (tmp_path / "s3:").exists()
