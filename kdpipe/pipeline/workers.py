"""Many workers over one corpus: disjoint shard slices, per-worker manifest parts, one merge.

Shards are fixed groups of `shard_size` consecutive sample ids, so `--num-workers N
--worker-index i` gives worker i the shards whose index is i modulo N: every worker assembles
the whole sequence stream, tokenizing only its share of the corpus (`corpus_split`), but runs
the teacher only on its own shards. All workers write into the same folder: their shard files
never collide, and each records its
progress in `manifest.part-{i:03d}-of-{N:03d}.json` (a CacheManifest listing only its shards),
never in `manifest.json`. Any launcher works (one process per GPU, a SLURM array, Ray tasks):
nothing but the shared folder connects the workers.

When a worker finishes it checks whether all N parts are complete; the one that sees that
merges them into `manifest.json` (an exclusive lock file keeps two from merging at once, and
merging twice writes the same bytes). `kdpipe cache-teacher --merge --out DIR` merges
explicitly, e.g. when the parts were written on machines that cannot see each other's files
until later.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import replace
from pathlib import Path

from kdpipe.pipeline.corpus_split import remove_shares
from kdpipe.pipeline.dataset_card import write_dataset_card
from kdpipe.schemas.cache_verify import describe_files
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.manifest import (
    TOKENIZER_DIR,
    CacheManifest,
    ShardInfo,
    manifest_path,
    read_manifest,
    read_manifest_file,
    write_manifest,
)
from kdpipe.schemas.records import to_dict
from kdpipe.schemas.shard import shard_name

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^manifest\.part-(\d{3,})-of-(\d{3,})\.json$")
SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
MERGE_LOCK = ".merge.lock"
# Keys of a part's `extra`: which worker wrote it and how long the whole sequence stream was.
WORKER_KEY = "worker"  # "i/N"
STREAM_SHARDS_KEY = "stream_shards"
STREAM_SEQUENCES_KEY = "stream_sequences"
_PART_KEYS = (WORKER_KEY, STREAM_SHARDS_KEY, STREAM_SEQUENCES_KEY)


def part_name(worker_index: int, num_workers: int) -> str:
    return f"manifest.part-{worker_index:03d}-of-{num_workers:03d}.json"


def owns_shard(index: int, num_workers: int, worker_index: int) -> bool:
    """Whether shard `index` belongs to this worker's slice."""
    return index % num_workers == worker_index


def shard_index(file: str) -> int | None:
    """The index in a shard file name (`shard-00012.parquet` -> 12), else None."""
    match = SHARD_RE.match(file)
    return int(match.group(1)) if match else None


def part_files(out: Path) -> dict[tuple[int, int], Path]:
    """Every manifest part in `out`, keyed by (worker_index, num_workers)."""
    found = {}
    for path in out.glob("manifest.part-*-of-*.json"):
        match = PART_RE.match(path.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def is_part(manifest: CacheManifest) -> bool:
    """Whether a manifest is one worker's part rather than the merged cache."""
    return WORKER_KEY in manifest.extra


def read_part(out: Path, worker_index: int, num_workers: int) -> CacheManifest | None:
    path = out / part_name(worker_index, num_workers)
    return read_manifest_file(path) if path.is_file() else None


def write_part(out: Path, worker_index: int, num_workers: int, manifest: CacheManifest) -> None:
    """Replace this worker's part atomically (its own file: no other worker writes it)."""
    atomic_write_json(out / part_name(worker_index, num_workers), to_dict(manifest))


def finished_part(manifest: CacheManifest, worker_index: int, num_workers: int,
                  stream_shards: int, stream_sequences: int) -> CacheManifest:
    """This worker's part, complete, with what the merge checks coverage against."""
    extra = {**manifest.extra, WORKER_KEY: f"{worker_index}/{num_workers}",
             STREAM_SHARDS_KEY: str(stream_shards), STREAM_SEQUENCES_KEY: str(stream_sequences)}
    return replace(manifest, complete=True, extra=extra)


def clear_worker_files(out: Path, worker_index: int, num_workers: int) -> None:
    """Remove this worker's own shards and part (a fresh start); others' files stay."""
    if not out.is_dir():
        return
    for path in out.glob("shard-*.parquet"):
        index = shard_index(path.name)
        if index is not None and owns_shard(index, num_workers, worker_index):
            path.unlink(missing_ok=True)
    (out / part_name(worker_index, num_workers)).unlink(missing_ok=True)


def remove_worker_temp_files(out: Path, worker_index: int, num_workers: int) -> int:
    """Delete temporaries a crashed run of this worker left; never another worker's."""
    removed = 0
    own_part = part_name(worker_index, num_workers)
    for tmp in out.glob(".*.tmp-*"):
        target = tmp.name[1:].rsplit(".tmp-", 1)[0]
        index = shard_index(target)
        if target == own_part or (index is not None
                                  and owns_shard(index, num_workers, worker_index)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _listed(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _check_parts(out: Path, parts: list[CacheManifest]) -> list[ShardInfo]:
    """Raise ConfigError unless the parts form one cache; returns all shards in order."""
    num_workers = len(parts)
    first = parts[0]
    for i, part in enumerate(parts):
        if part.settings_fingerprint != first.settings_fingerprint:
            old, new = first.settings(), part.settings()
            changed = sorted(k for k in new if old.get(k) != new[k])
            raise ConfigError(f"--merge: worker {i}'s part in {out} was made with other "
                              f"settings than worker 0's ({', '.join(changed)}); re-run that "
                              "worker with the same options as the others")
        if part.extra.get(WORKER_KEY) != f"{i}/{num_workers}":
            raise ConfigError(f"--merge: {part_name(i, num_workers)} says it is worker "
                              f"{part.extra.get(WORKER_KEY)!r}; re-run worker {i}")
        if (part.extra.get(STREAM_SHARDS_KEY), part.extra.get(STREAM_SEQUENCES_KEY),
                part.corpus) != (first.extra.get(STREAM_SHARDS_KEY),
                                 first.extra.get(STREAM_SEQUENCES_KEY), first.corpus):
            raise ConfigError(f"--merge: workers 0 and {i} read different sequence streams "
                              "(shard or document counts differ); was the corpus changed "
                              "between their runs? Re-run them with --overwrite")
    owner: dict[str, int] = {}
    for i, part in enumerate(parts):
        for shard in part.shards:
            index = shard_index(shard.file)
            if index is None or not owns_shard(index, num_workers, i):
                raise ConfigError(f"--merge: worker {i}'s part lists {shard.file}, which is "
                                  f"not in its slice of {num_workers}; re-run worker {i} "
                                  "with --overwrite")
            if shard.file in owner:
                raise ConfigError(f"--merge: {shard.file} is listed by workers "
                                  f"{owner[shard.file]} and {i}")
            owner[shard.file] = i
    stream_shards = int(first.extra[STREAM_SHARDS_KEY])
    expected = {shard_name(j) for j in range(stream_shards)}
    missing = [j for j in range(stream_shards) if shard_name(j) not in owner]
    if missing or set(owner) - expected:
        raise ConfigError(f"--merge: the parts do not cover the {stream_shards} shards exactly "
                          f"(missing: {_listed(missing) or 'none'}); re-run the workers that "
                          "own them")
    shards = sorted((s for part in parts for s in part.shards), key=lambda s: s.file)
    next_id = 0
    for shard in shards:
        if shard.first_sample_id != next_id or shard.last_sample_id < shard.first_sample_id:
            raise ConfigError(f"--merge: {shard.file} starts at sample {shard.first_sample_id}, "
                              f"expected {next_id}; the parts were made from different streams")
        next_id = shard.last_sample_id + 1
        path = out / shard.file
        if not path.is_file() or path.stat().st_size != shard.bytes:
            raise ConfigError(f"--merge: {path} is missing or has another size than its part "
                              f"records; re-run worker {owner[shard.file]}")
    if next_id != int(first.extra[STREAM_SEQUENCES_KEY]):
        raise ConfigError(f"--merge: the shards hold {next_id} sequences, the stream "
                          f"{first.extra[STREAM_SEQUENCES_KEY]}")
    return shards


def merge_parts(out: Path, num_workers: int | None = None) -> CacheManifest:
    """Merge the N complete parts in `out` into `manifest.json`; idempotent.

    With `num_workers` None the parts in the folder decide N (they must agree). Checks that
    the parts share one settings fingerprint, list disjoint shards from their own slices and
    together cover the whole sequence stream with contiguous sample ids.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out}: folder not found; nothing to merge")
    found = part_files(out)
    counts = sorted({n for _, n in found})
    if num_workers is None:
        if not counts:
            if manifest_path(out).is_file() and read_manifest(out).complete:
                return read_manifest(out)  # merged before and the parts were removed
            raise ConfigError(f"--merge: {out} holds no manifest parts "
                              "(manifest.part-*-of-*.json); run the workers (--num-workers N "
                              "--worker-index I) first")
        if len(counts) > 1:
            raise ConfigError(f"--merge: {out} holds parts of runs with different "
                              f"--num-workers ({', '.join(map(str, counts))}); pass "
                              "--num-workers N to choose one")
        num_workers = counts[0]
    missing = [i for i in range(num_workers) if (i, num_workers) not in found]
    if missing:
        raise ConfigError(f"--merge: {out} lacks the parts of worker(s) {_listed(missing)} of "
                          f"{num_workers}; run them (--num-workers {num_workers} "
                          "--worker-index I) first")
    parts = [read_manifest_file(found[(i, num_workers)]) for i in range(num_workers)]
    unfinished = [i for i, part in enumerate(parts) if not part.complete]
    if unfinished:
        raise ConfigError(f"--merge: worker(s) {_listed(unfinished)} of {num_workers} have not "
                          "finished; re-run them with the same command to complete them")
    shards = _check_parts(out, parts)
    extra = {k: v for k, v in parts[0].extra.items() if k not in _PART_KEYS}
    # The tokenizer folder as it stands: every worker saved the same tokenizer (the settings
    # fingerprint holds its fingerprint), the last one to finish is the copy on disk.
    folder = out / TOKENIZER_DIR
    tokenizer = replace(parts[0].tokenizer, files=describe_files(folder)
                        if folder.is_dir() else ())
    merged = replace(parts[0], tokenizer=tokenizer, shards=tuple(shards), complete=True,
                     extra={**extra, "num_workers": str(num_workers)})
    write_manifest(out, merged)
    write_dataset_card(out, merged)
    remove_shares(out)  # the corpus shares' token ids: every worker has read them
    log.info("merged %d worker parts into %s (%d shards, %d sequences)", num_workers,
             manifest_path(out), len(merged.shards), merged.num_sequences)
    return merged


def try_merge(out: Path, num_workers: int) -> CacheManifest | None:
    """Merge if every part is complete and no other worker is merging; else None.

    Each worker writes its complete part before calling this, so the last one to finish
    always sees all parts complete. The lock file is created exclusively (O_EXCL), so two
    workers finishing together do not write `manifest.json` at the same time.
    """
    for i in range(num_workers):
        part = read_part(out, i, num_workers)
        if part is None or not part.complete:
            return None
    lock = out / MERGE_LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        log.info("another worker is merging %s; if none is (a crash left %s), run "
                 "`kdpipe cache-teacher --merge --out %s`", out, lock, out)
        return None
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return merge_parts(out, num_workers)
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)
