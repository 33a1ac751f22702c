"""Manifest round trip and refusal of anything the reader does not understand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.manifest import (
    CacheManifest,
    CorpusInfo,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
    read_manifest,
    write_manifest,
)


def example_manifest() -> CacheManifest:
    return CacheManifest(
        teacher=TeacherInfo("t", None, "f" * 64, "hf", "float32"),
        tokenizer=TokenizerInfo("t", "a" * 64, 320, 0, 0, 1),
        corpus=CorpusInfo(("c.jsonl",), "text", "train", "b" * 64, 3, 1),
        vocab_size=320, top_k=8, max_length=64, layout="document", shard_size=4,
        id_dtype="uint16", logprob_dtype="float16", capture_temperature=1.0,
        tail_temperatures=(2.0,), tail_mode="exact", settings_fingerprint="", complete=True,
        shards=(ShardInfo("shard-00000.parquet", 4, 100, 96, 0, 3, 1234, "c" * 64, "d" * 64),),
    ).with_fingerprint()


def test_round_trip(tmp_path: Path) -> None:
    manifest = example_manifest()
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert manifest.num_targets == 96 and manifest.shard_layout.has_tempered_tails


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "upgrade kdpipe"),
    (lambda d: d.update(schema_version=0), "no longer supported"),
    (lambda d: d.pop("top_k"), "missing field 'top_k'"),
    (lambda d: d.update(top_k="8"), "top_k: expected int"),
    (lambda d: d.update(surprise=1), "unknown field"),
    (lambda d: d.update(top_k=16), "edited by hand"),
    (lambda d: d["shards"][0].update(file="../../etc/passwd"), "plain name"),
    (lambda d: d["corpus"].update(documents_read=None), "documents_read"),
])
def test_invalid_manifests_are_refused(tmp_path: Path, edit, message: str) -> None:
    write_manifest(tmp_path, example_manifest())
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CacheFormatError, match=message):
        read_manifest(tmp_path)


def test_missing_or_garbled_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        read_manifest(tmp_path)
