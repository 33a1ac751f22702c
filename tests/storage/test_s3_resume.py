"""The commit protocol on an object store: a worker killed while uploading a shard, then
resumed, leaves the same cache as a run never interrupted; two students read one remote
cache at once and leave it unchanged; workers commit their own parts and one merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.storage import Store

from .conftest import snapshot

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of kdpipe's catches it."""


def config(teacher: Path, data: Path, out: str, **overrides: object) -> CacheTeacherConfig:
    settings: dict[str, object] = dict(teacher=str(teacher), data=(str(data),), out=out,
                                       top_k=8, max_length=48, shard_size=2, batch_size=4,
                                       progress=False)
    settings.update(overrides)
    return CacheTeacherConfig(**settings)  # type: ignore[arg-type]


def content(fs: s3fs.S3FileSystem, url: str) -> dict[str, tuple[int, str]]:
    """The objects that make the cache (`cache_config.json` records --out, so it differs)."""
    return {n: v for n, v in snapshot(fs, url).items() if n != "cache_config.json"}


def test_killed_mid_upload_then_resumed_equals_uninterrupted(
        tiny_teacher_dir: Path, corpus_file: Path, fs: s3fs.S3FileSystem, bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache_teacher(config(tiny_teacher_dir, corpus_file, f"{bucket}/whole"))

    real_put = Store.put_file
    shards_put = []

    def dies_on_third_shard(self: Store, local: Path, name: str) -> None:
        if name.startswith("shard-"):
            shards_put.append(name)
            if len(shards_put) == 3:  # half the object lands, then the process is gone
                self.put_bytes(local.read_bytes()[: local.stat().st_size // 2], name)
                raise Killed
        real_put(self, local, name)

    monkeypatch.setattr(Store, "put_file", dies_on_third_shard)
    with pytest.raises(Killed):
        cache_teacher(config(tiny_teacher_dir, corpus_file, f"{bucket}/resumed"))
    monkeypatch.setattr(Store, "put_file", real_put)

    torn = json.loads(fs.cat_file(f"{bucket}/resumed/manifest.json"))
    assert not torn["complete"] and [s["file"] for s in torn["shards"]] == shards_put[:2]
    assert fs.exists(f"{bucket}/resumed/{shards_put[2]}")  # the torn object, listed nowhere

    cache_teacher(config(tiny_teacher_dir, corpus_file, f"{bucket}/resumed"))
    assert content(fs, f"{bucket}/resumed") == content(fs, f"{bucket}/whole")


def test_two_students_read_one_remote_cache_at_once(
        tiny_teacher_dir: Path, corpus_file: Path, fs: s3fs.S3FileSystem, bucket: str,
        tmp_path: Path) -> None:
    cache = f"{bucket}/cache"
    manifest = cache_teacher(config(tiny_teacher_dir, corpus_file, cache))
    before = snapshot(fs, cache)
    student = tmp_path / "student.json"
    student.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": True}))
    node_cache = tmp_path / "node-cache"  # shared by both: filled by whichever comes first
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(
        [sys.executable, "-m", "kdpipe", "train-student", "--cache", cache, "--student-config",
         str(student), "--out", str(tmp_path / f"run{i}"), "--epochs", "2", "--batch-size",
         "4", "--local-cache", str(node_cache), "--no-progress", "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
    finals = [{k: v for k, v in json.loads((tmp_path / f"run{i}" / "final_metrics.json")
                                          .read_text()).items()
               if k not in ("run_dir", "train_tokens_per_s")} for i in range(2)]
    assert finals[0] == finals[1]  # same data, same seed
    assert snapshot(fs, cache) == before
    assert sorted(p.name for p in (node_cache / "shards").iterdir()) == sorted(
        f"{s.sha256}.parquet" for s in manifest.shards)  # whole, verified, no temporaries


def test_workers_commit_parts_and_the_last_merges(
        tiny_teacher_dir: Path, corpus_file: Path, fs: s3fs.S3FileSystem,
        bucket: str) -> None:
    cache_teacher(config(tiny_teacher_dir, corpus_file, f"{bucket}/single"))
    out = f"{bucket}/workers"
    first = cache_teacher(config(tiny_teacher_dir, corpus_file, out, num_workers=2,
                                 worker_index=0))
    assert first.extra["worker"] == "0/2" and not fs.exists(f"{out}/manifest.json")
    merged = cache_teacher(config(tiny_teacher_dir, corpus_file, out, num_workers=2,
                                  worker_index=1))
    assert merged.complete
    single = json.loads(fs.cat_file(f"{bucket}/single/manifest.json"))
    assert [s.sha256 for s in merged.shards] == [s["sha256"] for s in single["shards"]]
    # merging again, as a second worker finishing at the same moment would: the same bytes
    again = cache_teacher(config(tiny_teacher_dir, corpus_file, out, merge=True,
                                 num_workers=2))
    assert again == merged


def test_an_altered_shard_in_the_store_is_never_read(
        tiny_teacher_dir: Path, corpus_file: Path, fs: s3fs.S3FileSystem, bucket: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flipped byte in a listed shard stops a reader, streamed or through --local-cache
    (where no copy is kept); the writer's resume recomputes the shard."""
    from ..conftest import run_cli

    cache = f"{bucket}/cache"
    manifest = cache_teacher(config(tiny_teacher_dir, corpus_file, cache))
    shard = manifest.shards[1]
    data = bytearray(fs.cat_file(f"{cache}/{shard.file}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{cache}/{shard.file}", bytes(data))
    node_cache = tmp_path / "node-cache"
    for extra in ([], ["--local-cache", str(node_cache)]):
        code, _, err = run_cli(["build-curriculum", "--cache", cache, "--source", "length",
                                "--out", str(tmp_path / "c.parquet"), *extra], capsys)
        assert code == 2 and f"{cache}/{shard.file} does not match its checksum" in err, err
    assert not (node_cache / "shards" / f"{shard.sha256}.parquet").exists()
    code, out, err = run_cli(["verify", cache], capsys)
    assert code == 1 and shard.file in err

    resumed = cache_teacher(config(tiny_teacher_dir, corpus_file, cache))
    assert resumed.shards == manifest.shards
    assert fs.cat_file(f"{cache}/{shard.file}") != bytes(data)
    assert run_cli(["verify", cache], capsys)[0] == 0
