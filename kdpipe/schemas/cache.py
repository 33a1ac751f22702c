"""Read-only access to a finished cache: validated manifest, shard files, row-group iteration.

Both sides use this: `trainer/` streams row groups from it, `kdpipe inspect` and
`kdpipe verify` report on it. Nothing here writes to the cache, so any number of training runs
may read one cache at once. A cache at a URL is read through `remote_cache.RemoteShards`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas import shard_checksum
from kdpipe.schemas.cache_verify import tokenizer_file_problems, verify_cache
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.manifest import (
    MANIFEST_NAME,
    TOKENIZER_DIR,
    CacheManifest,
    ShardInfo,
    read_manifest,
)
from kdpipe.schemas.remote_cache import RemoteShards, local_folder
from kdpipe.schemas.shard import NUM_TARGETS, TAIL_LOGMASS, TEACHER_NLL, check_shard_schema
from kdpipe.schemas.storage import Store, location, store_errors


@dataclass(frozen=True)
class Cache:
    """An opened, validated cache folder.

    verify_reads: check each shard's sha256 before this process first reads it
    (`shard_checksum`); False for caches already checked with `kdpipe verify`.
    remote: where the shards are when the cache is a URL; `root` is then a node-local
    folder holding only copies of the manifest and the tokenizer.
    """

    root: Path
    manifest: CacheManifest
    verify_reads: bool = True
    remote: RemoteShards | None = None

    @property
    def location(self) -> str:
        """The cache as the user named it: its folder or its URL."""
        return self.remote.store.url if self.remote is not None else str(self.root)

    def shard_path(self, shard: ShardInfo) -> str:
        """The shard's path or URL, for messages."""
        return self.remote.url(shard) if self.remote is not None else str(self.root / shard.file)

    def open_shard(self, shard: ShardInfo) -> pq.ParquetFile:
        """The shard as a Parquet file: local, or streamed with read-ahead (a remote cache;
        its verified local copy with --local-cache, the next shard fetched meanwhile)."""
        if self.remote is None:
            return pq.ParquetFile(self.root / shard.file)
        shards = self.manifest.shards
        at = next(i for i, s in enumerate(shards) if s.file == shard.file)
        self.remote.prefetch(shards[at + 1 : at + 2])
        with self.reading(shard):  # the footer is read here
            # pre_buffer: one coalesced read per row group instead of one per column chunk
            return pq.ParquetFile(self.remote.open(shard), pre_buffer=True)

    @contextmanager
    def reading(self, shard: ShardInfo) -> Iterator[None]:
        """Read `shard` inside this: a store failing mid-read (after its library's retries)
        raises one StorageError naming the shard's URL and the reason, not the library's
        traceback. Nothing for a local cache, whose errors keep their own handling."""
        if self.remote is None:
            yield
            return
        with store_errors(self.remote.store, reading=self.shard_path(shard)):
            yield

    def check_shards(self, shards: Sequence[ShardInfo]) -> None:
        """Raise CacheFormatError naming the first of `shards` whose bytes differ from the
        manifest's checksum (once per shard and process, or per node with a --local-cache;
        nothing with `verify_reads` off)."""
        if self.remote is not None:
            if self.verify_reads or self.remote.local_cache is not None:
                with ThreadPoolExecutor(max_workers=shard_checksum.HASH_THREADS) as pool:
                    list(pool.map(self.remote.check, shards))  # raises the first fault
        elif self.verify_reads:
            shard_checksum.check_shards(self.root, shards)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer the cache was made with, saved in the cache (schema 2), or None."""
        path = self.root / TOKENIZER_DIR
        return path if path.is_dir() else None

    def checked_tokenizer_dir(self) -> Path | None:
        """`tokenizer_dir`, its files first checked against `tokenizer.files` (schema 4) when
        `verify_reads` is on, as shards are before they are read.

        Raises CacheFormatError naming the first file that is missing, unlisted or altered.
        """
        folder = self.tokenizer_dir
        if folder is not None and self.verify_reads:
            problems = tokenizer_file_problems(self.root, self.manifest)
            if problems:
                raise CacheFormatError(
                    f"cache {self.location}: {problems[0]}; run `kdpipe verify "
                    f"{self.location}`, or re-create the cache")
        return folder

    def iter_row_groups(
        self, columns: Sequence[str] | None = None, shards: Sequence[ShardInfo] | None = None
    ) -> Iterator[pa.Table]:
        """Yield the cache one Parquet row group at a time (64 sequences by default)."""
        for shard in shards if shards is not None else self.manifest.shards:
            self.check_shards([shard])
            parquet = self.open_shard(shard)
            for index in range(parquet.num_row_groups):
                with self.reading(shard):
                    table = parquet.read_row_group(index,
                                                   columns=list(columns) if columns else None)
                yield table

    def read_column(self, name: str) -> pa.ChunkedArray:
        """One per-sequence column of the whole cache (small: one value per sequence)."""
        return pa.chunked_array(
            [t.column(name).combine_chunks() for t in self.iter_row_groups([name])],
            type=self.manifest.shard_layout.schema().field(name).type,
        )

    def verify(self) -> list[str]:
        """Every fault found: missing or altered shards, manifest fields the shards
        contradict, values a cache must not hold, stray files (`cache_verify`). A remote
        cache is first downloaded whole, every object under its URL, into `root`."""
        if self.remote is not None:
            self.remote.mirror(self.root)
        return verify_cache(self.root, self.manifest)


def open_cache(cache_dir: str | Path, require_complete: bool = True,
               check_shards: bool = True, verify_reads: bool = True,
               local_cache: str | Path | None = None, flag: str = "--cache") -> Cache:
    """Open a cache for reading; checks the manifest and every shard's presence and schema.

    `cache_dir` is a folder or a URL (`storage.location`); `local_cache`, a node-local folder
    that keeps verified copies of a remote cache's shards (`remote_cache`).
    Checksums are not computed here (that reads every byte) but before a shard is first read
    (`verify_reads`, see `Cache`). `Cache.verify` checks everything and reports instead of
    raising, so `kdpipe verify` opens with `check_shards=False`.
    """
    where = location(cache_dir, flag)
    if isinstance(where, Store):
        return _open_remote(where, require_complete, check_shards, verify_reads,
                            Path(local_cache) if local_cache is not None else None)
    root = where
    manifest = read_manifest(root)
    _check_complete(str(root), manifest, require_complete)
    for shard in manifest.shards if check_shards else ():
        path = root / shard.file
        if not path.is_file():
            raise CacheFormatError(f"{path}: listed in the manifest but missing; run "
                                   f"`kdpipe verify {root}`")
        check_shard_schema(path, manifest.shard_layout)
    return Cache(root=root, manifest=manifest, verify_reads=verify_reads)


def _check_complete(name: str, manifest: CacheManifest, require_complete: bool) -> None:
    if require_complete and not manifest.complete:
        raise CacheFormatError(
            f"{name}: the cache is incomplete (interrupted cache-teacher run); re-run the same "
            "`kdpipe cache-teacher` command to finish it"
        )


def _open_remote(store: Store, require_complete: bool, check_shards: bool,
                 verify_reads: bool, local_cache: Path | None) -> Cache:
    """`open_cache` of a URL: the manifest and tokenizer copied into a local folder, the
    shards listed and their schemas read from the store."""
    listing = store.files()
    if MANIFEST_NAME not in listing:
        if not listing:
            store.check_bucket("--cache")  # a missing bucket says so
        raise FileNotFoundError(
            f"{store.url}/{MANIFEST_NAME} not found: {store.url} is not a kdpipe cache (or not "
            f"finished: a reader trusts only a cache's manifest); run `kdpipe cache-teacher "
            f"--out {store.url}` first")
    folder = local_folder(store, local_cache)
    store.get_file(MANIFEST_NAME, folder / MANIFEST_NAME)  # renamed in: others may read it
    manifest = read_manifest(folder)
    _check_complete(store.url, manifest, require_complete)
    remote = RemoteShards(store=store, local_cache=local_cache)
    remote.fetch_tokenizer(manifest, folder)
    cache = Cache(root=folder, manifest=manifest, verify_reads=verify_reads, remote=remote)
    for shard in manifest.shards if check_shards else ():
        if shard.file not in listing:
            raise CacheFormatError(f"{cache.shard_path(shard)}: listed in the manifest but "
                                   f"missing; run `kdpipe verify {store.url}`")
        with remote.store.open(shard.file) as stream:
            check_shard_schema(cache.shard_path(shard), manifest.shard_layout, stream)
    return cache




TOPK_MASS_POSITIONS = 1_000_000  # target positions `topk_mass` reads at most


def topk_mass(cache: Cache, positions: int = TOPK_MASS_POSITIONS) -> tuple[float, int] | None:
    """(mean teacher probability inside the cached top-k, positions read), from the first
    `positions` target positions; None for a sampled cache (it has no tail column).

    The share a top-k + tail loss cannot describe id by id: docs/benchmarks.md ("Cache
    quality") measured students 5.7% worse than online KD when it was ~0.6.
    """
    if cache.manifest.cache_mode != "topk":
        return None
    total, seen = 0.0, 0
    for table in cache.iter_row_groups([TAIL_LOGMASS]):
        tail = table.column(TAIL_LOGMASS).combine_chunks().flatten().to_numpy()
        total += float((1.0 - np.exp(tail.astype(np.float64))).sum())
        seen += int(tail.size)
        if seen >= positions:
            break
    return total / max(seen, 1), seen


def summarize(cache: Cache) -> dict[str, object]:
    """What `kdpipe inspect` prints: provenance, size, target tokens against all tokens, the
    teacher's mean NLL per target token and how much of its probability the top-k holds."""
    m = cache.manifest
    nll = cache.read_column(TEACHER_NLL).to_numpy()
    targets = cache.read_column(NUM_TARGETS).to_numpy()
    mean_nll = float((nll * targets).sum() / max(int(targets.sum()), 1))
    mass = topk_mass(cache)
    return {
        "cache": cache.location,
        "complete": m.complete,
        "teacher": m.teacher.name_or_path,
        "teacher_revision": m.teacher.revision or "-",
        "backend": m.teacher.backend,
        "tokenizer": m.tokenizer.name_or_path,
        "tokenizer_fingerprint": m.tokenizer.fingerprint[:16],
        # what compatibility depends on: the id <-> token mapping and the special ids
        "tokenizer_vocab_fingerprint": m.tokenizer.vocab_fingerprint[:16] or None,
        "bos_token_id": m.tokenizer.bos_token_id,
        "eos_token_id": m.tokenizer.eos_token_id,
        "pad_token_id": m.tokenizer.pad_token_id,
        "vocab_size": m.vocab_size,
        "teacher_head_width": m.teacher_head_width,
        "add_special_tokens": m.add_special_tokens,
        "top_k": m.top_k,
        "encoding": m.encoding,
        "cache_mode": m.cache_mode if m.cache_mode == "topk" else f"sampled (N={m.samples})",
        "layout": m.layout,
        "max_length": m.max_length,
        "tail_temperatures": ",".join(f"{t:g}" for t in m.tail_temperatures) or "-",
        "format": m.corpus.format,
        "train_on": m.train_on,
        "sequences": m.num_sequences,
        "tokens": m.num_tokens,
        # positions with a teacher target: all but each sequence's last, or the masked ones
        "target_tokens": m.num_targets,
        "target_fraction": m.num_targets / max(m.num_tokens, 1),
        "shards": len(m.shards),
        "bytes": m.num_bytes,
        "bytes_per_token": m.num_bytes / max(m.num_targets, 1),
        "bytes_per_entry": m.num_bytes / max(m.num_targets * m.top_k, 1),
        "teacher_nll": mean_nll,
        "topk_mass": "-" if mass is None else mass[0],
        "topk_mass_positions": "-" if mass is None else mass[1],
        "documents_skipped": m.corpus.documents_skipped,
    }
