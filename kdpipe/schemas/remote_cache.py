"""Reading a cache from an object store: streamed shards, or a node-local read-through cache.

`open_cache` (cache.py) gives a cache at a URL a `RemoteShards`. It trusts only what the
store's `manifest.json` lists. Without a local cache each shard is streamed from the store
with read-ahead (`Store.open`) and its sha256 is checked once per process, by streaming it
once before its first read. With `--local-cache DIR`, each shard is downloaded once per node
into `DIR/shards/<sha256>.parquet`, its checksum checked as it lands, and read from there:
the next epoch, and every other student on the node, read local disk and hash nothing. A file
there is complete and verified by construction: it is renamed to its checksum's name only
after the check, so two processes filling the folder at once at worst download a shard twice.

The manifest and the saved tokenizer (a few MB) are copied into a local folder of their own
(`DIR/caches/<hash of the URL>/`, or a temporary folder), the tokenizer's files checked
against the manifest as a local cache's are.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.manifest import (
    MANIFEST_NAME,
    TOKENIZER_DIR,
    CacheManifest,
    ShardInfo,
    read_manifest_file,
)
from kdpipe.schemas.storage import Store, location, node_folder

log = logging.getLogger(__name__)

PREFETCH_SHARDS = 1  # shards downloaded ahead of the one being read (--local-cache)

# (url, expected sha256) of every streamed shard this process has checked
_verified: set[tuple[str, str]] = set()


def local_folder(store: Store, local_cache: Path | None) -> Path:
    """Where the manifest and tokenizer of the cache at `store` are copied on this node."""
    return node_folder(store, local_cache, "caches")


@dataclass
class RemoteShards:
    """The shards of a cache at `store`, read through `local_cache` when one is given."""

    store: Store
    local_cache: Path | None
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _pending: dict[str, Future[Path]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)

    def _in_this_process(self) -> None:
        """Forget the prefetch pool of a parent process: its threads do not survive a fork
        (the loader's worker processes), and a lock it held would never be released."""
        if self._pid != os.getpid():
            self._pid, self._pool, self._pending = os.getpid(), None, {}
            self._lock = threading.Lock()

    def url(self, shard: ShardInfo) -> str:
        return f"{self.store.url}/{shard.file}"

    def _local_path(self, shard: ShardInfo) -> Path:
        assert self.local_cache is not None
        return self.local_cache / "shards" / f"{shard.sha256}.parquet"

    def _fetch(self, shard: ShardInfo) -> Path:
        """The shard's verified copy on this node, downloaded first when it is not there."""
        path = self._local_path(shard)
        if path.is_file():  # named by its checksum only after the check: nothing to redo
            return path
        log.info("fetching %s into %s", self.url(shard), path.parent)
        if not self.store.get_file(shard.file, path, sha256=shard.sha256):
            raise _mismatch(self.url(shard), self.store.url)
        return path

    def fetch(self, shard: ShardInfo) -> Path:
        """`_fetch`, joining a prefetch of the same shard in flight."""
        self._in_this_process()
        with self._lock:
            pending = self._pending.pop(shard.file, None)
        return pending.result() if pending is not None else self._fetch(shard)

    def prefetch(self, shards: Sequence[ShardInfo]) -> None:
        """Start downloading `shards` in the background (--local-cache only)."""
        if self.local_cache is None:
            return
        self._in_this_process()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
            for shard in shards:
                if shard.file not in self._pending and not self._local_path(shard).is_file():
                    self._pending[shard.file] = self._pool.submit(self._fetch, shard)

    def check(self, shard: ShardInfo) -> None:
        """Raise CacheFormatError unless the shard's bytes have the manifest's sha256: once per
        node with a local cache (the download checks it), else once per process."""
        if self.local_cache is not None:
            self.fetch(shard)
            return
        key = (self.url(shard), shard.sha256)
        if key in _verified:
            return
        if self.store.sha256(shard.file) != shard.sha256:
            raise _mismatch(self.url(shard), self.store.url)
        _verified.add(key)

    def open(self, shard: ShardInfo) -> Path | IO[bytes]:
        """What `pq.ParquetFile` reads the shard from: its local copy, or a stream."""
        if self.local_cache is not None:
            return self.fetch(shard)
        return self.store.open(shard.file)

    def fetch_tokenizer(self, manifest: CacheManifest, folder: Path) -> None:
        """Copy `tokenizer/` into `folder` (the files the manifest lists, or for a schema 2 or
        3 cache every object under it)."""
        listed = [f.file for f in manifest.tokenizer.files]
        names = listed or [n.split("/", 1)[1] for n in self.store.files()
                           if n.startswith(TOKENIZER_DIR + "/")]
        target = folder / TOKENIZER_DIR
        for name in names:
            self.store.get_file(f"{TOKENIZER_DIR}/{name}", target / name)
        for path in target.iterdir() if target.is_dir() else ():  # from an earlier copy
            if path.is_file() and path.name not in names and ".tmp-" not in path.name:
                path.unlink()

    def mirror(self, folder: Path) -> None:
        """Download every object of the cache into `folder` under its own name (for
        `kdpipe verify`, which reads every byte anyway and also looks for stray files); a
        file left in `folder` by an earlier mirror that the store no longer holds goes."""
        listing = self.store.files()
        for name in sorted(listing):
            self.store.get_file(name, folder / name)
        for path in folder.rglob("*"):
            if path.is_file() and path.relative_to(folder).as_posix() not in listing:
                path.unlink()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _mismatch(url: str, cache_url: str) -> CacheFormatError:
    return CacheFormatError(
        f"cache shard {url} does not match its checksum in {MANIFEST_NAME} (corrupted or "
        f"edited); run `kdpipe verify {cache_url}`, or re-create the cache")



def read_remote_manifest(url: str, flag: str = "--cache") -> CacheManifest:
    """The validated manifest of the cache at `url`, without opening the cache."""
    store = location(url, flag)
    assert isinstance(store, Store), "read_remote_manifest() takes a URL"
    with tempfile.TemporaryDirectory(prefix="kdpipe-manifest-") as folder:
        path = Path(folder) / MANIFEST_NAME
        path.write_bytes(store.read_bytes(MANIFEST_NAME))
        return read_manifest_file(path)
