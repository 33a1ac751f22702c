"""All three stages, `inspect` and `verify` against s3:// URLs on a local S3 server.

The cache made into the store is compared with one made into a local folder from the same
corpus: the same shards, byte for byte, listed by equal manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import s3fs

from kdpipe.schemas.manifest import read_manifest

from ..conftest import run_cli
from .conftest import snapshot

pytestmark = pytest.mark.slow

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "tie_word_embeddings": True}


def cache_args(teacher: Path, data: str, out: str) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--data", data, "--out", out,
            "--top-k", "8", "--max-length", "48", "--shard-size", "2", "--batch-size", "4",
            "--no-progress"]


def test_three_stages_inspect_and_verify_on_s3(
        tiny_teacher_dir: Path, corpus_file: Path, fs: s3fs.S3FileSystem, bucket: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fs.put_file(str(corpus_file), f"{bucket}/corpus/corpus.jsonl")
    cache = f"{bucket}/cache"
    code, _, err = run_cli(cache_args(tiny_teacher_dir, f"{bucket}/corpus/corpus.jsonl", cache),
                           capsys)
    assert code == 0, err
    local = tmp_path / "local-cache"
    assert run_cli(cache_args(tiny_teacher_dir, str(corpus_file), str(local)), capsys)[0] == 0

    stored = snapshot(fs, cache)
    remote = json.loads(fs.cat_file(f"{cache}/manifest.json"))
    expected = read_manifest(local)
    assert [s["sha256"] for s in remote["shards"]] == [s.sha256 for s in expected.shards]
    assert remote["settings_fingerprint"] == expected.settings_fingerprint
    assert len(expected.shards) >= 3
    assert {"manifest.json", "README.md", "cache_config.json"} <= set(stored)
    assert not [n for n in stored if ".tmp-" in n]

    code, out, err = run_cli(["inspect", cache, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["cache"] == cache
    assert json.loads(out)["sequences"] == expected.num_sequences
    code, out, err = run_cli(["verify", cache], capsys)
    assert code == 0 and out.startswith("ok:"), err

    curriculum = f"{bucket}/curricula/teacher-nll.parquet"
    code, _, err = run_cli(["build-curriculum", "--cache", cache, "--source", "teacher",
                            "--metric", "nll", "--out", curriculum], capsys)
    assert code == 0, err
    code, out, err = run_cli(["inspect", curriculum], capsys)
    assert code == 0 and "nll" in out, err

    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    code, out, err = run_cli(["train-student", "--cache", cache, "--student-config", str(student),
                              "--out", str(tmp_path / "planned"), "--dry-run"], capsys)
    assert code == 0 and "memory per process" in out, err  # the plan reads the manifest only
    assert not (tmp_path / "planned").exists()
    node_cache = tmp_path / "node-cache"
    code, _, err = run_cli(["train-student", "--cache", cache, "--student-config", str(student),
                            "--out", str(tmp_path / "run"), "--curriculum", curriculum,
                            "--eval-cache", cache, "--epochs", "1", "--batch-size", "4",
                            "--local-cache", str(node_cache), "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (node_cache / "shards").iterdir()) == sorted(
        f"{s.sha256}.parquet" for s in expected.shards)
    code, out, err = run_cli(["evaluate", "--student", str(tmp_path / "run" / "final"),
                              "--cache", cache, "--no-progress"], capsys)
    assert code == 0, err
    assert snapshot(fs, cache) == stored  # readers never write


def test_a_url_is_never_a_local_folder(tiny_teacher_dir: Path, corpus_file: Path,
                                       bucket: str, tmp_path: Path, monkeypatch:
                                       pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--out s3://...` once made a local folder named `s3:`."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(cache_args(tiny_teacher_dir, str(corpus_file), f"{bucket}/c"),
                           capsys)
    assert code == 0, err
    assert not (tmp_path / "s3:").exists()


def test_loader_worker_processes_stream_a_remote_cache(
        tiny_teacher_dir: Path, corpus_file: Path, bucket: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--loader-workers decodes in forked processes, where s3fs must not be reused."""
    cache = f"{bucket}/cache"
    assert run_cli(cache_args(tiny_teacher_dir, str(corpus_file), cache), capsys)[0] == 0
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    losses = []
    for workers in ("0", "1"):
        out = tmp_path / f"run-{workers}"
        code, _, err = run_cli(["train-student", "--cache", cache, "--student-config",
                                str(student), "--out", str(out), "--epochs", "1",
                                "--batch-size", "4", "--loader-workers", workers,
                                "--no-progress"], capsys)
        assert code == 0, err
        losses.append([json.loads(line)["loss"] for line in
                       (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line])
    assert losses[0] == losses[1] and losses[0]
