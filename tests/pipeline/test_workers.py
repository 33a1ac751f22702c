"""Many workers, one cache: disjoint slices, parts, merge (automatic and explicit), resume."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from kdpipe.pipeline import cache_stage
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.pipeline.workers import MERGE_LOCK, is_part, merge_parts, part_name
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import CacheManifest, read_manifest

from .conftest import run_cli, small_config


@pytest.fixture()
def single(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path
           ) -> tuple[CacheTeacherConfig, CacheManifest]:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "single", shard_size=4)
    return cfg, cache_teacher(cfg)


def content(out: Path, manifest: CacheManifest) -> list[tuple[str, str, int, int, str]]:
    """What must not depend on how many workers made a cache: files, bytes, ids, hashes."""
    assert [sha256_file(out / s.file) for s in manifest.shards] == \
        [s.sha256 for s in manifest.shards]
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == \
        [s.file for s in manifest.shards]
    return [(s.file, s.sha256, s.first_sample_id, s.last_sample_id, s.tokens_sha256)
            for s in manifest.shards]


def test_two_workers_in_turn_equal_one(single: tuple[CacheTeacherConfig, CacheManifest],
                                       tmp_path: Path) -> None:
    cfg, reference = single
    assert len(reference.shards) >= 5
    workers = replace(cfg, out=tmp_path / "two", num_workers=2)

    first = cache_teacher(replace(workers, worker_index=0))
    assert is_part(first) and first.complete
    assert [s.file for s in first.shards] == [s.file for s in reference.shards[::2]]
    assert not (workers.out / "manifest.json").exists()  # never while a part is missing
    assert (workers.out / part_name(0, 2)).is_file()

    merged = cache_teacher(replace(workers, worker_index=1))  # the last one merges
    assert not is_part(merged) and merged.complete
    assert merged.settings_fingerprint == reference.settings_fingerprint
    assert merged.corpus == reference.corpus
    assert content(workers.out, merged) == content(cfg.out, reference)
    assert read_manifest(workers.out) == merged and not (workers.out / MERGE_LOCK).exists()
    assert open_cache(workers.out).verify() == []
    # The tokenizer's files and the dataset card as one worker would have them.
    assert merged.tokenizer == reference.tokenizer
    assert (workers.out / "README.md").read_text() == (cfg.out / "README.md").read_text()
    # Merging again (explicitly, or by a re-run worker) is harmless and changes nothing.
    before = (workers.out / "manifest.json").read_bytes()
    assert merge_parts(workers.out) == merged
    assert cache_teacher(replace(workers, worker_index=0)) == merged
    assert (workers.out / "manifest.json").read_bytes() == before


def test_concurrent_workers_equal_one(single: tuple[CacheTeacherConfig, CacheManifest],
                                      tmp_path: Path) -> None:
    cfg, reference = single
    workers = replace(cfg, out=tmp_path / "two", num_workers=2)
    results: dict[int, CacheManifest] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = cache_teacher(replace(workers, worker_index=index))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    merged = read_manifest(workers.out)
    assert merged.complete and any(not is_part(m) for m in results.values())
    assert content(workers.out, merged) == content(cfg.out, reference)
    assert open_cache(workers.out).verify() == []


def test_a_worker_resumes_its_own_slice(single: tuple[CacheTeacherConfig, CacheManifest],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    cfg, reference = single
    workers = replace(cfg, out=tmp_path / "two", num_workers=2)
    cache_teacher(replace(workers, worker_index=0))
    real_write = cache_stage.write_shard
    calls = {"n": 0}

    def crash_on_second(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_stage, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(replace(workers, worker_index=1))
    assert not (workers.out / "manifest.json").exists()
    with pytest.raises(ConfigError, match=r"worker\(s\) 1 of 2 have not finished"):
        merge_parts(workers.out)

    monkeypatch.setattr(cache_stage, "write_shard", real_write)
    computed: list[int] = []
    real_run = cache_stage._run_teacher

    def counting_run(model: object, seqs: list[list[int]], *args: object) -> object:
        computed.append(len(seqs))
        return real_run(model, seqs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_stage, "_run_teacher", counting_run)
    merged = cache_teacher(replace(workers, worker_index=1))
    assert len(computed) == len(reference.shards[1::2]) - 1  # its finished shard was kept
    assert content(workers.out, merged) == content(cfg.out, reference)


def test_merge_refuses_what_is_not_one_cache(tiny_teacher_dir: Path, small_corpus: Path,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "three"
    workers = small_config(tiny_teacher_dir, small_corpus, out, shard_size=4, num_workers=3)
    cache_teacher(replace(workers, worker_index=0))
    code, _, err = run_cli(["cache-teacher", "--merge", "--out", str(out)], capsys)
    assert code == 2 and "lacks the parts of worker(s) 1, 2 of 3" in err
    cache_teacher(replace(workers, worker_index=2))
    other = replace(workers, worker_index=1, top_k=4)  # a worker run with other options
    with pytest.raises(ConfigError, match=r"worker 1's part .* other settings .*top_k"):
        cache_teacher(other)  # completes its part, but the automatic merge refuses ...
    with pytest.raises(ConfigError, match=r"worker 1's part .* other settings .*top_k"):
        merge_parts(out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(ConfigError, match=r"worker 1's part was made with different settings"):
        cache_teacher(replace(workers, worker_index=1))
    cache_teacher(replace(workers, worker_index=1, overwrite=True))  # ... until it is redone
    assert read_manifest(out).complete and open_cache(out).verify() == []
    code, stdout, _ = run_cli(["cache-teacher", "--merge", "--out", str(out)], capsys)
    assert code == 0 and "cache ready" in stdout

    part = out / part_name(2, 3)
    data = json.loads(part.read_text())
    data["shards"] = data["shards"][:-1]  # a part that lost a shard
    part.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="do not cover"):
        merge_parts(out)


def test_worker_flags_are_checked(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    base = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(small_corpus),
            "--out", str(out)]
    code, _, err = run_cli(base + ["--num-workers", "2", "--worker-index", "2"], capsys)
    assert code == 2 and "--worker-index must be in 0..1" in err
    code, _, err = run_cli(["cache-teacher", "--out", str(out)], capsys)
    assert code == 2 and "--teacher is required" in err
    assert not out.exists()
    code, _, err = run_cli(["cache-teacher", "--merge", "--out", str(out)], capsys)
    assert code == 2 and "nothing to merge" in err


def test_a_single_run_does_not_clobber_unfinished_workers(tiny_teacher_dir: Path,
                                                          small_corpus: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "two"
    cfg = small_config(tiny_teacher_dir, small_corpus, out, shard_size=4)
    cache_teacher(replace(cfg, num_workers=2, worker_index=0))
    with pytest.raises(ConfigError, match="unfinished multi-worker cache"):
        cache_teacher(cfg)
    assert (out / part_name(0, 2)).is_file()
    manifest = cache_teacher(replace(cfg, overwrite=True))
    assert not list(out.glob("manifest.part-*")) and open_cache(out).verify() == []
    assert manifest.complete and not is_part(manifest)
