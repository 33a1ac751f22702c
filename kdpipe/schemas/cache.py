"""Read-only access to a finished cache: validated manifest, shard files, row-group iteration.

Both sides use this: `trainer/` streams row groups from it, `kdpipe inspect` and
`kdpipe verify` report on it. Nothing here writes to the cache, so any number of training runs
may read one cache at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import TOKENIZER_DIR, CacheManifest, ShardInfo, read_manifest
from kdpipe.schemas.shard import (
    FLOAT_COLUMNS,
    INPUT_IDS,
    NUM_TARGETS,
    SAMPLE_ID,
    TAIL_LOGMASS,
    TEACHER_NLL,
    check_shard_schema,
    invalid_values,
)


def tokens_digest(sample_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> str:
    """sha256 of sample ids and token ids: identifies a shard's input independent of encoding."""
    digest = hashlib.sha256()
    _update_tokens_digest(digest, sample_ids, sequences)
    return digest.hexdigest()


def _update_tokens_digest(digest: Any, sample_ids: Sequence[int],
                          sequences: Sequence[Sequence[int]]) -> None:
    for sample_id, ids in zip(sample_ids, sequences, strict=True):
        digest.update(np.int64(sample_id).tobytes())
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())


@dataclass(frozen=True)
class Cache:
    """An opened, validated cache folder."""

    root: Path
    manifest: CacheManifest

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.file

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer the cache was made with, saved in the cache (schema 2), or None."""
        path = self.root / TOKENIZER_DIR
        return path if path.is_dir() else None

    def iter_row_groups(
        self, columns: Sequence[str] | None = None, shards: Sequence[ShardInfo] | None = None
    ) -> Iterator[pa.Table]:
        """Yield the cache one Parquet row group at a time (64 sequences by default)."""
        for shard in shards if shards is not None else self.manifest.shards:
            parquet = pq.ParquetFile(self.shard_path(shard))
            for index in range(parquet.num_row_groups):
                yield parquet.read_row_group(index, columns=list(columns) if columns else None)

    def read_column(self, name: str) -> pa.ChunkedArray:
        """One per-sequence column of the whole cache (small: one value per sequence)."""
        return pa.chunked_array(
            [t.column(name).combine_chunks() for t in self.iter_row_groups([name])],
            type=self.manifest.shard_layout.schema().field(name).type,
        )

    def verify(self) -> list[str]:
        """Every fault found: missing or altered shards, wrong schema, row counts, values a
        cache must not hold (NaN, infinities: `shard.first_invalid`), stray files."""
        problems: list[str] = []
        listed = {s.file for s in self.manifest.shards}
        for shard in self.manifest.shards:
            path = self.shard_path(shard)
            if not path.is_file():
                problems.append(f"{shard.file}: missing")
                continue
            if path.stat().st_size != shard.bytes:
                problems.append(f"{shard.file}: {path.stat().st_size} bytes, manifest says "
                                f"{shard.bytes}")
            if sha256_file(path) != shard.sha256:
                problems.append(f"{shard.file}: sha256 differs from the manifest (corrupted or "
                                "modified)")
                continue
            try:
                check_shard_schema(path, self.manifest.shard_layout)
                problems.extend(self._check_rows(shard))
            except CacheFormatError as exc:
                problems.append(str(exc))
        for stray in sorted(self.root.glob("shard-*.parquet")):
            if stray.name not in listed:
                problems.append(f"{stray.name}: shard file not listed in the manifest")
        if not self.manifest.complete:
            problems.append("manifest is marked incomplete: re-run the same `kdpipe "
                            "cache-teacher` command to finish it")
        return problems

    def _check_rows(self, shard: ShardInfo) -> list[str]:
        """Row count, token hash and value ranges, one row group at a time."""
        parquet = pq.ParquetFile(self.shard_path(shard))
        wanted = (SAMPLE_ID, INPUT_IDS, NUM_TARGETS, *FLOAT_COLUMNS)
        names = [name for name in parquet.schema_arrow.names if name in wanted]
        digest, rows, invalid = hashlib.sha256(), 0, list[str]()
        for index in range(parquet.num_row_groups):
            table = parquet.read_row_group(index, columns=names)
            sample_ids = table.column(SAMPLE_ID).to_pylist()
            _update_tokens_digest(digest, sample_ids, table.column(INPUT_IDS).to_pylist())
            rows += len(sample_ids)
            invalid = invalid or invalid_values(table)  # the first faulty row group is enough
        problems = []
        if rows != shard.rows:
            problems.append(f"{shard.file}: {rows} rows, manifest says {shard.rows}")
        if digest.hexdigest() != shard.tokens_sha256:
            problems.append(f"{shard.file}: token ids differ from the manifest's tokens_sha256")
        problems += [f"{shard.file}: {line}; the teacher's output was not finite: re-create "
                     "the cache (see `kdpipe cache-teacher --dtype`)" for line in invalid]
        return problems


def open_cache(cache_dir: str | Path, require_complete: bool = True,
               check_shards: bool = True) -> Cache:
    """Open a cache for reading; checks the manifest and every shard's presence and schema.

    Checksums are not recomputed here (that reads every byte): `Cache.verify` does it, and
    reports instead of raising, so `kdpipe verify` opens with `check_shards=False`.
    """
    root = Path(cache_dir)
    manifest = read_manifest(root)
    if require_complete and not manifest.complete:
        raise CacheFormatError(
            f"{root}: the cache is incomplete (interrupted cache-teacher run); re-run the same "
            "`kdpipe cache-teacher` command to finish it"
        )
    for shard in manifest.shards if check_shards else ():
        path = root / shard.file
        if not path.is_file():
            raise CacheFormatError(f"{path}: listed in the manifest but missing; run "
                                   f"`kdpipe verify {root}`")
        check_shard_schema(path, manifest.shard_layout)
    return Cache(root=root, manifest=manifest)


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
    """What `kdpipe inspect` prints: provenance, size, the teacher's mean NLL per token and
    how much of its probability the top-k holds."""
    m = cache.manifest
    nll = cache.read_column(TEACHER_NLL).to_numpy()
    targets = cache.read_column(NUM_TARGETS).to_numpy()
    mean_nll = float((nll * targets).sum() / max(int(targets.sum()), 1))
    mass = topk_mass(cache)
    return {
        "cache": str(cache.root),
        "complete": m.complete,
        "teacher": m.teacher.name_or_path,
        "teacher_revision": m.teacher.revision or "-",
        "backend": m.teacher.backend,
        "tokenizer": m.tokenizer.name_or_path,
        "tokenizer_fingerprint": m.tokenizer.fingerprint[:16],
        "vocab_size": m.vocab_size,
        "teacher_head_width": m.teacher_head_width,
        "add_special_tokens": m.add_special_tokens,
        "top_k": m.top_k,
        "encoding": m.encoding,
        "cache_mode": m.cache_mode if m.cache_mode == "topk" else f"sampled (N={m.samples})",
        "layout": m.layout,
        "max_length": m.max_length,
        "tail_temperatures": ",".join(f"{t:g}" for t in m.tail_temperatures) or "-",
        "sequences": m.num_sequences,
        "tokens": m.num_tokens,
        "shards": len(m.shards),
        "bytes": m.num_bytes,
        "bytes_per_token": m.num_bytes / max(m.num_targets, 1),
        "bytes_per_entry": m.num_bytes / max(m.num_targets * m.top_k, 1),
        "teacher_nll": mean_nll,
        "topk_mass": "-" if mass is None else mass[0],
        "topk_mass_positions": "-" if mass is None else mass[1],
        "documents_skipped": m.corpus.documents_skipped,
    }
