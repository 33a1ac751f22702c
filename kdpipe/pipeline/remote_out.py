"""`cache-teacher` into a URL, and a corpus read from URLs.

An object store has no atomic rename, so a cache at a URL is committed in an order that
needs none (docs/cache-format.md, "Caches in object storage"):

1. The stage runs unchanged in a node-local folder (`--local-cache`, or a temporary one).
2. `pull` first brings in what the store holds: the manifest, the worker parts, the small
   files, and every shard a manifest or this worker's part lists, each downloaded with its
   sha256 checked against that record (a shard that fails is recomputed). Unlisted shard
   objects are not trusted, and are overwritten when their shard is written again.
3. After every recorded shard, `push` uploads each file that changed: the shards and small
   files first, each written once under its final name and read back to check its sha256
   (`Store.put_file`), then the manifest or the worker's part last. A reader trusts only what
   the manifest lists, so whatever a crash leaves behind in the store is either listed and
   verified, or ignored and rewritten by the resume.
4. Workers each push their own shards and part; the one that sees every part complete pulls
   the others' and merges. Two workers merging at once write the same bytes (a merge is a
   function of the parts), so no lock is needed in the store.

Only files kdpipe owns are written or removed; a URL holding anything else is refused, as a
non-empty local folder is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdpipe.pipeline import workers
from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.pipeline.cache_dir import CACHE_CONFIG_NAME
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json, sha256_file
from kdpipe.schemas.manifest import (
    DATASET_CARD_NAME,
    MANIFEST_NAME,
    TOKENIZER_DIR,
    CacheManifest,
    read_manifest_file,
)
from kdpipe.schemas.storage import Store, is_url, location, node_folder

log = logging.getLogger(__name__)

_SMALL = (CACHE_CONFIG_NAME, DATASET_CARD_NAME)


def _ours(name: str) -> bool:
    """Whether `name` (relative to the cache) is a file cache-teacher writes."""
    if ".tmp-" in name:
        return False
    return (name in (MANIFEST_NAME, *_SMALL) or name.startswith(TOKENIZER_DIR + "/")
            or workers.SHARD_RE.match(name) is not None
            or workers.PART_RE.match(name) is not None)


@dataclass
class RemoteOut:
    """The store a cache is committed to and the local folder it is written in."""

    store: Store
    staging: Path
    worker: tuple[int, int]  # (index, count)
    # name -> sha256 of the object the store holds, as checked on pull or written by push
    stored: dict[str, str] = field(default_factory=dict)
    # (size, mtime_ns) -> sha256 of local files already hashed
    _hashed: dict[tuple[str, int, int], str] = field(default_factory=dict)

    def _owned(self, name: str) -> bool:
        """A file this worker writes (one worker: every file of the cache)."""
        index, count = self.worker
        if count == 1:
            return True
        if (shard := workers.shard_index(name.rsplit("/", 1)[-1])) is not None:
            return workers.owns_shard(shard, count, index)
        part = workers.PART_RE.match(name)
        if part is not None:
            return (int(part.group(1)), int(part.group(2))) == (index, count)
        return True  # the tokenizer, config and card: every worker writes the same bytes

    def pull(self, everything: bool = False) -> None:
        """Bring this worker's files from the store into the staging folder (`everything`:
        every worker's, for a merge); listed shards are checked against their records."""
        listing = self.store.files()
        foreign = sorted(n for n in listing if not _ours(n))
        if foreign:
            raise ConfigError(f"--out {self.store.url} holds files that are not a kdpipe "
                              f"cache's ({', '.join(foreign[:3])}); choose an empty or new URL")
        wanted = [n for n in listing if not workers.SHARD_RE.match(n)
                  and (everything or self._owned(n))]
        for path in _cache_files(self.staging):  # the store is the truth: drop what it lacks
            if path.relative_to(self.staging).as_posix() not in listing:
                path.unlink()
        for name in wanted:
            self.store.get_file(name, self.staging / name)
        records = {}
        for name in wanted:
            if name == MANIFEST_NAME or workers.PART_RE.match(name):
                manifest = read_manifest_file(self.staging / name)
                records.update({s.file: s.sha256 for s in manifest.shards})
        for name, sha in sorted(records.items()):
            if name in listing and (everything or self._owned(name)):
                local = self.staging / name  # kept from an earlier run on this node, or not
                kept = local.is_file() and self._sha(local) == sha
                if kept or self.store.get_file(name, local, sha256=sha):
                    self.stored[name] = sha
                else:
                    log.warning("%s/%s does not match its recorded checksum; recomputing it",
                                self.store.url, name)
        for name in wanted:
            self.stored[name] = self._sha(self.staging / name)

    def _sha(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashed:
            self._hashed[key] = sha256_file(path)
        return self._hashed[key]

    def _record_url(self) -> None:
        """`cache_config.json` records --out as given, not the local folder written in."""
        path = self.staging / CACHE_CONFIG_NAME
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("out") != self.store.url:
                atomic_write_json(path, {**data, "out": self.store.url})

    def push(self) -> None:
        """Upload every changed file of the staging folder, the manifest or part last;
        remove from the store the files of ours this run removed locally (a fresh start)."""
        self._record_url()
        local = {p.relative_to(self.staging).as_posix(): p for p in _cache_files(self.staging)}
        last = [n for n in local if n == MANIFEST_NAME or workers.PART_RE.match(n)]
        for name in [*sorted(set(local) - set(last)), *sorted(last)]:
            sha = self._sha(local[name])
            if self.stored.get(name) != sha:
                self.store.put_file(local[name], name)
                self.stored[name] = sha
        for name in sorted(set(self.stored) - set(local)):
            if self._owned(name):
                self.store.remove(name)
                del self.stored[name]


def _cache_files(staging: Path) -> list[Path]:
    """The files of the cache in the staging folder: not temporaries, locks, or a run's
    hidden working files (the workers' tokenized corpus shares, `.corpus-shares/`, which
    stay on the node: workers writing to a URL do not share them)."""
    return [p for p in staging.rglob("*") if p.is_file() and _ours(
        p.relative_to(staging).as_posix())]


def open_remote_out(cfg: CacheTeacherConfig) -> RemoteOut | None:
    """The `RemoteOut` of a URL --out (its bucket checked, its files pulled), else None."""
    where = location(cfg.out, "--out")
    if isinstance(where, Path):
        return None
    where.check_bucket("--out")
    worker = (0, 1) if cfg.merge else (cfg.worker_index, cfg.num_workers)
    remote = RemoteOut(store=where, staging=node_folder(where, cfg.local_cache, "out"),
                       worker=worker)
    remote.pull(everything=cfg.merge)
    return remote


def run_into(cfg: CacheTeacherConfig,
             stage: Callable[[CacheTeacherConfig, Callable[[], None]], CacheManifest]
             ) -> CacheManifest:
    """Run `stage(cfg, commit)` in the staging folder of a URL --out (`commit` pushes what
    is finished), or on --out itself when it is a folder."""
    remote = open_remote_out(cfg)
    if remote is None:
        return stage(cfg, lambda: None)
    log.info("--out %s: writing in %s, uploading each finished file", cfg.out, remote.staging)
    try:
        manifest = stage(replace(cfg, out=str(remote.staging)), remote.push)
        remote.push()
        if cfg.num_workers > 1 and workers.is_part(manifest):
            manifest = _merge_if_done(cfg, remote) or manifest
        return manifest
    finally:
        if cfg.local_cache is None:  # a temporary folder: the store holds everything
            shutil.rmtree(remote.staging, ignore_errors=True)


def _merge_if_done(cfg: CacheTeacherConfig, remote: RemoteOut) -> CacheManifest | None:
    """The last worker to finish merges: pull every part, and when all are complete every
    shard (checked), merge and push the manifest."""
    count = cfg.num_workers
    parts = {n for n in remote.store.files() if workers.PART_RE.match(n)}
    for i in range(count):
        name = workers.part_name(i, count)
        if name not in parts:
            return None
        remote.store.get_file(name, remote.staging / name)
        if not read_manifest_file(remote.staging / name).complete:
            return None
    remote.pull(everything=True)
    merged = workers.try_merge(remote.staging, count)
    if merged is not None:
        remote.push()
    return merged


def fetch_data(data: Sequence[str], folder: Path) -> tuple[str, ...]:
    """`--data` with each URL replaced by a local copy in `folder`: a file, every file under
    a folder URL, or the files a glob URL matches. A copy keeps its base name, which is what
    the corpus fingerprint records, so a resume from fresh copies is recognised."""
    local: list[str] = []
    for value in data:
        if not is_url(value):
            local.append(value)
            continue
        where = location(value, "--data")
        if isinstance(where, Path):
            local.append(str(where))
            continue
        target = folder / hashlib.sha256(value.encode()).hexdigest()[:12]
        names = _data_files(where)
        if not names:
            raise ConfigError(f"--data {value}: no such file, folder or matching objects")
        for path, name in names:
            _fetch(where, path, target / name)
        local.append(str(target / names[0][1]) if len(names) == 1 and
                     names[0][1] == where.root.rsplit("/", 1)[-1] else str(target))
    return tuple(local)


def _data_files(where: Store) -> list[tuple[str, str]]:
    """(path in the store, local name) of the files a --data URL names."""
    fs = where.fs
    if any(c in where.root for c in "*?["):
        return [(p, p.rsplit("/", 1)[-1]) for p in sorted(fs.glob(where.root))
                if fs.isfile(p)]
    if fs.isfile(where.root):
        return [(where.root, where.root.rsplit("/", 1)[-1])]
    return [(p, p[len(where.root) + 1:]) for p in sorted(fs.find(where.root))]


def _fetch(where: Store, path: str, dest: Path) -> None:
    root = Store(url=where.url, protocol=where.protocol, root=path.rsplit("/", 1)[0])
    root.get_file(path.rsplit("/", 1)[-1], dest)
