"""Verified reads: a shard's sha256 is checked against the manifest before a process first
decodes any of it.

Parquet does not notice a flipped byte inside a data page: pyarrow decodes it as another
value (a changed `topk_ids` entry) and training goes on. So every reader of a cache
(`build_index`, the loader's `RowGroupReader`, `Cache.iter_row_groups`) calls `check_shard`
before its first row group. A shard is hashed once per process: the result is remembered by
(path, size, modification time, expected digest), so the loader's threads and a second
index over the same cache cost a `stat` each. Hashing runs at ~1.5 GB/s per core, next to
which a training run is long; `--no-verify-reads` skips it for caches already checked with
`kdpipe verify`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import MANIFEST_NAME, ShardInfo

HASH_THREADS = 4  # shards hashed at once when an index first opens a whole cache

# (resolved path, size, mtime_ns, expected sha256) of every shard this process has checked
_verified: set[tuple[str, int, int, str]] = set()


def check_shard(root: Path, shard: ShardInfo) -> None:
    """Raise CacheFormatError unless `root / shard.file` has the size and sha256 the manifest
    records; free after the first success in this process (until the file changes).

    Thread-safe: two threads checking one shard at once only hash it twice.
    """
    path = root / shard.file
    stat = os.stat(path)
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, shard.sha256)
    if key in _verified:
        return
    if stat.st_size != shard.bytes or sha256_file(path) != shard.sha256:
        raise CacheFormatError(
            f"cache shard {path} does not match its checksum in {MANIFEST_NAME} (corrupted "
            f"or edited); run `kdpipe verify {root}`, or re-create the cache")
    _verified.add(key)


def check_shards(root: Path, shards: Sequence[ShardInfo]) -> None:
    """`check_shard` for many shards, a few at a time; raises for the first faulty one in
    `shards` order."""
    if len(shards) == 1:  # the loader opening one more shard: no pool needed
        check_shard(root, shards[0])
        return
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        futures = [pool.submit(check_shard, root, shard) for shard in shards]
        try:
            for future in futures:
                future.result()
        finally:  # after a fault, hash no further shard
            for future in futures:
                future.cancel()
