"""`--data` URLs: a file, a folder, a glob, each downloaded under its base name."""

from __future__ import annotations

from pathlib import Path

import pytest
import s3fs

from kdpipe.pipeline.remote_out import fetch_data
from kdpipe.schemas.errors import ConfigError


def test_data_urls_are_downloaded_under_their_names(fs: s3fs.S3FileSystem, bucket: str,
                                                    tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl", "notes.txt"):
        fs.pipe_file(f"{bucket}/corpus/{name}", f'{{"text": "{name}"}}\n'.encode())
    local = tmp_path / "local.jsonl"
    local.write_text('{"text": "local"}\n')
    single, folder, pattern, kept = fetch_data(
        (f"{bucket}/corpus/a.jsonl", f"{bucket}/corpus", f"{bucket}/corpus/*.jsonl",
         str(local)), tmp_path / "data")
    assert Path(single).name == "a.jsonl" and Path(single).read_text() == '{"text": "a.jsonl"}\n'
    assert sorted(p.name for p in Path(folder).iterdir()) == ["a.jsonl", "b.jsonl", "notes.txt"]
    assert sorted(p.name for p in Path(pattern).iterdir()) == ["a.jsonl", "b.jsonl"]
    assert kept == str(local)


def test_a_data_url_that_names_nothing(fs: s3fs.S3FileSystem, bucket: str,
                                       tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--data s3://.*/missing/\*\.jsonl: no such file"):
        fetch_data((f"{bucket}/missing/*.jsonl",), tmp_path)
