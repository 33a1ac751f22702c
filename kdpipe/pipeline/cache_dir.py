"""The cache folder's life cycle: resume it, refuse to clobber it, record progress in it.

`cache-teacher` writes into `--out` only what it owns (shards, manifest or a worker's manifest
part, `cache_config.json`, the tokenizer folder, the dataset card): a re-run with the same
settings keeps every intact shard, other settings are refused unless `--overwrite`, and a
folder holding anything else is never touched.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdpipe.pipeline import workers
from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.pipeline.corpus_split import SHARES_DIR, remove_shares
from kdpipe.schemas.cache_verify import tokenizer_file_problems, tokens_digest
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json, remove_stale_temp_files, sha256_file
from kdpipe.schemas.manifest import (
    DATASET_CARD_NAME,
    MANIFEST_NAME,
    TOKENIZER_DIR,
    CacheManifest,
    ShardInfo,
    manifest_path,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

CACHE_CONFIG_NAME = "cache_config.json"


def previous_manifest(cfg: CacheTeacherConfig, draft: CacheManifest) -> CacheManifest | None:
    """The existing cache's manifest if we may resume it; refuses to clobber anything else."""
    out = cfg.out_dir
    if not out.exists() or not any(out.iterdir()):
        return None
    if not manifest_path(out).is_file():
        if cfg.num_workers > 1 and not _foreign_files(out):
            return None  # other workers' files, or a folder they are just filling
        if workers.part_files(out) and not _foreign_files(out):
            if cfg.overwrite:
                return None
            raise ConfigError(f"--out {out} holds an unfinished multi-worker cache (manifest "
                              "parts, no manifest.json): finish it with its --num-workers, "
                              f"merge it with `kdpipe cache-teacher --merge --out {out}`, or "
                              "pass --overwrite")
        raise ConfigError(f"--out {out} is a non-empty folder that is not a kdpipe cache; "
                          "choose an empty or new folder")
    previous = read_manifest(out)
    if previous.settings_fingerprint == draft.settings_fingerprint:
        return previous
    if cfg.overwrite:
        log.warning("--overwrite: replacing the cache in %s", out)
        return None
    raise ConfigError(f"--out {out} holds a cache made with different settings "
                      f"({_changed_settings(previous, draft)}); re-run with the cache's values "
                      "to finish it, pass --overwrite to replace it, or choose another --out")


def _changed_settings(old: CacheManifest, new: CacheManifest) -> str:
    """'name: cached value -> this run's value' for each setting that differs."""
    before, after = old.settings(), new.settings()

    def show(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{k}: {show(before.get(k))} -> {show(after[k])}"
                     for k in sorted(after) if before.get(k) != after[k])


def resumable_shards(cfg: CacheTeacherConfig, draft: CacheManifest,
                      previous: CacheManifest | None) -> dict[str, ShardInfo] | None:
    """Recorded shards a re-run may keep (each re-checked before use); None: start afresh.

    A worker resumes from its own part, and from a merged manifest with the same settings.
    """
    if cfg.num_workers == 1:
        return {s.file: s for s in previous.shards} if previous is not None else None
    part = workers.read_part(cfg.out_dir, cfg.worker_index, cfg.num_workers)
    if part is not None and part.settings_fingerprint != draft.settings_fingerprint:
        if not cfg.overwrite:
            raise ConfigError(f"--out {cfg.out}: worker {cfg.worker_index}'s part was made with "
                              f"different settings ({_changed_settings(part, draft)}); pass "
                              "--overwrite to redo it or choose another --out")
        part = None
    if part is None and previous is None:
        return None
    recorded = [*(previous.shards if previous is not None else ()),
                *(part.shards if part is not None else ())]
    return {s.file: s for s in recorded
            if (index := workers.shard_index(s.file)) is not None
            and workers.owns_shard(index, cfg.num_workers, cfg.worker_index)}


def _foreign_files(out: Path) -> list[str]:
    """Names in `out` that no kdpipe cache-teacher run writes."""
    ours = {MANIFEST_NAME, CACHE_CONFIG_NAME, TOKENIZER_DIR, DATASET_CARD_NAME,
            workers.MERGE_LOCK, SHARES_DIR}
    return [p.name for p in out.iterdir()
            if p.name not in ours and not workers.SHARD_RE.match(p.name)
            and not workers.PART_RE.match(p.name) and ".tmp-" not in p.name]


def prepare_out(cfg: CacheTeacherConfig, draft: CacheManifest, fresh: bool) -> None:
    """Create --out and clear what this run replaces (a worker touches only its own files)."""
    out = cfg.out_dir
    if cfg.num_workers == 1:
        if fresh:
            _clear_cache_files(out)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
    else:
        if fresh:
            workers.clear_worker_files(out, cfg.worker_index, cfg.num_workers)
        out.mkdir(parents=True, exist_ok=True)
        workers.remove_worker_temp_files(out, cfg.worker_index, cfg.num_workers)
        stale = manifest_path(out)  # a merged manifest of other settings (--overwrite)
        if stale.is_file() and read_manifest(out).settings_fingerprint != \
                draft.settings_fingerprint:
            stale.unlink(missing_ok=True)
    if cfg.num_workers == 1 or cfg.worker_index == 0:
        atomic_write_json(out / CACHE_CONFIG_NAME, config_json(cfg))


def record_progress(cfg: CacheTeacherConfig, manifest: CacheManifest) -> None:
    """Persist progress: the manifest itself, or a worker's part (never manifest.json)."""
    if cfg.num_workers == 1:
        write_manifest(cfg.out_dir, manifest)
    else:
        workers.write_part(cfg.out_dir, cfg.worker_index, cfg.num_workers, manifest)


def files_intact(out: Path, manifest: CacheManifest) -> bool:
    """Whether every shard and the tokenizer's files are as `manifest` records them, and
    it records the tokenizer's files (a cache of schema 3 or older does not: a re-run records
    them, keeping every shard)."""
    return (bool(manifest.tokenizer.files) and not tokenizer_file_problems(out, manifest)
            and all((out / s.file).is_file() and sha256_file(out / s.file) == s.sha256
                    for s in manifest.shards))


def reusable_shard(out: Path, recorded: ShardInfo | None, sample_ids: list[int],
                    seqs: list[list[int]]) -> ShardInfo | None:
    """The recorded shard if its file is intact and holds exactly these sequences."""
    if recorded is None:
        return None
    if recorded.tokens_sha256 != tokens_digest(sample_ids, seqs):
        raise ConfigError(f"{out / recorded.file}: the corpus changed since this cache was "
                          "started; pass --overwrite to rebuild it")
    path = out / recorded.file
    if path.is_file() and sha256_file(path) == recorded.sha256:
        return recorded
    log.warning("%s is missing or corrupt; recomputing it", path)
    return None


def _clear_cache_files(out: Path) -> None:
    """Remove what a previous kdpipe cache left (only our own files)."""
    if not out.is_dir():
        return
    for path in [*out.glob("shard-*.parquet"), *out.glob("manifest.part-*-of-*.json"),
                 out / MANIFEST_NAME, out / CACHE_CONFIG_NAME, out / workers.MERGE_LOCK,
                 out / DATASET_CARD_NAME]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    remove_shares(out)


def config_json(cfg: CacheTeacherConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["out"] = str(cfg.out)
    if cfg.num_workers > 1:
        del data["worker_index"]  # written once for all workers
    return data
