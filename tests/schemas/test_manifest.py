"""Manifest round trip and refusal of anything the reader does not understand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.manifest import (
    MANIFEST_SCHEMA_VERSION,
    CacheManifest,
    CorpusInfo,
    FileInfo,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
    read_manifest,
    same_mapping,
    write_manifest,
)
from kdpipe.schemas.records import to_dict


def example_manifest(head_width: int = 320, add_special_tokens: bool = False
                     ) -> CacheManifest:
    return CacheManifest(
        teacher=TeacherInfo("t", None, "f" * 64, "hf", "float32"),
        tokenizer=TokenizerInfo("t", "a" * 64, "e" * 64, 320, 0, 0, 1,
                                (FileInfo("tokenizer.json", 9602, "f" * 64),)),
        corpus=CorpusInfo(("c.jsonl",), "text", "train", "b" * 64, 3, 1),
        vocab_size=320, teacher_head_width=head_width, top_k=8, max_length=64,
        layout="document", add_special_tokens=add_special_tokens, shard_size=4,
        id_dtype="uint16", logprob_dtype="float16", capture_temperature=1.0,
        tail_temperatures=(2.0,), tail_mode="exact", settings_fingerprint="", complete=True,
        shards=(ShardInfo("shard-00000.parquet", 4, 100, 96, 0, 3, 1234, "c" * 64, "d" * 64),),
    ).with_fingerprint()


def version_1_form(manifest: CacheManifest) -> dict:
    """What kdpipe wrote before schema 2 for the same cache (no head width, BOS flag or
    mapping fingerprint; vocab_size was the teacher's head width)."""
    data = to_dict(manifest)
    for key in ("teacher_head_width", "add_special_tokens"):
        del data[key]
    del data["tokenizer"]["vocab_fingerprint"]
    data["schema_version"] = 1
    return data


def test_round_trip(tmp_path: Path) -> None:
    manifest = example_manifest()
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert manifest.num_targets == 96 and manifest.shard_layout.has_tempered_tails


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "upgrade kdpipe"),
    (lambda d: d.update(schema_version=0), "does not exist"),
    (lambda d: d.update(teacher_head_width=300), "smaller than vocab_size"),
    (lambda d: d.pop("top_k"), "missing field 'top_k'"),
    (lambda d: d.update(top_k="8"), "top_k: expected int"),
    (lambda d: d.update(surprise=1), "unknown field"),
    (lambda d: d.update(top_k=16), "edited by hand"),
    (lambda d: d["shards"][0].update(file="../../etc/passwd"), "plain name"),
    (lambda d: d["tokenizer"]["files"].append({"file": "../x", "bytes": 1, "sha256": "0"}),
     "tokenizer file name '../x' must be a plain name"),
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


def test_version_1_manifests_still_read(tmp_path: Path) -> None:
    """A cache written before schema 2 reads as the same cache: its softmax covered the whole
    head, it had no BOS, and its settings fingerprint (which resume compares) still holds."""
    current = example_manifest()
    (tmp_path / "manifest.json").write_text(json.dumps(version_1_form(current)))
    upgraded = read_manifest(tmp_path)
    assert upgraded.teacher_head_width == upgraded.vocab_size == 320
    assert upgraded.add_special_tokens is False and upgraded.tokenizer.vocab_fingerprint == ""
    assert upgraded.settings_fingerprint == current.settings_fingerprint
    assert upgraded.schema_version == MANIFEST_SCHEMA_VERSION
    # Without the mapping fingerprint, caches compare by their whole tokenizer file.
    assert same_mapping(upgraded, current)


def test_version_3_manifests_read_as_they_are(tmp_path: Path) -> None:
    """Before schema 4 no tokenizer file was recorded; the settings are the same."""
    current = example_manifest()
    data = to_dict(current)
    del data["tokenizer"]["files"]
    data["schema_version"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    older = read_manifest(tmp_path)
    assert older.tokenizer.files == () and older.schema_version == 3
    assert older.settings_fingerprint == current.settings_fingerprint


def test_new_settings_change_the_fingerprint_only_when_set() -> None:
    plain = example_manifest()
    assert example_manifest(head_width=384).settings_fingerprint != plain.settings_fingerprint
    assert example_manifest(add_special_tokens=True).settings_fingerprint != \
        plain.settings_fingerprint


def test_manifests_are_strict_json(tmp_path: Path) -> None:
    """A NaN would be written as a bare `NaN`, which strict JSON parsers reject."""
    broken = replace(example_manifest(), tail_temperatures=(float("nan"),))
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_manifest(tmp_path, broken)
    assert not list(tmp_path.iterdir())  # no half-written file either
