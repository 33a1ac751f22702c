"""Each of N teacher workers tokenizes only its share of the corpus (docs/distributed.md).

The sequence stream — and so every `sample_id` and shard — is a function of the corpus's
documents in order. Workers split the corpus, not the stream:

1. **Shares from metadata alone.** The local files are laid end to end by size, and share j
   is bytes [j·W/N, (j+1)·W/N) of that total W: a `.jsonl` file is cut into byte ranges (a
   line belongs to the share its first byte falls in), a `.parquet` file into row ranges (row
   r sits at byte r·size/rows), and a `.txt` or `.jsonl.zst` file, which cannot be entered
   midway, goes whole to the share its first byte falls in. Only file sizes and Parquet
   footers are read, so every worker computes the same plan.
2. **Each share is tokenized once.** A worker reads and tokenizes its own share first, and
   writes each document's token ids (and, for conversations, their target flags) to
   `.corpus-shares/share-{j:05d}-of-{N:05d}.parquet` in `--out`, with a JSON record of the
   share's corpus counters written after it (a share counts as done only then). Token ids
   cost at most 4 bytes a token, a few percent of what the cache stores per token.
3. **Every worker assembles the whole stream** from the shares in order — reading the files
   of the shares others tokenized — and cuts it with the same code a single worker uses
   (`sequences.sequences_of_ids`, `sequences.conversation_sequences`), so packing across
   share boundaries, sample ids and shards are those of one worker, bit for bit.

A share another worker is tokenizing is waited for: the worker holds a claim file
(`share-….claim`, created exclusively) whose modification time it renews every
`HEARTBEAT_S`. A share nobody claims — its worker has not started, as in a SLURM array run a
few at a time — is tokenized by whoever needs it first, and so is a share whose claim has not
been renewed for `STALE_S` or names a process of this machine that no longer runs (its worker
died). The result does not depend on who tokenized what. The merge removes the folder.

A corpus with a Hugging Face dataset among its sources cannot be split without reading it:
every worker then reads the whole corpus, as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from kdpipe.pipeline.corpus import HF_PREFIX, CorpusStats, Source, SourceSlice, source_name
from kdpipe.pipeline.sequences import TokenSequence
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.fingerprint import json_fingerprint
from kdpipe.schemas.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

SHARES_DIR = ".corpus-shares"  # hidden: `datasets` and shard globs never see it
HEARTBEAT_S = 5.0  # how often a worker tokenizing a share renews its claim
STALE_S = 60.0  # a claim not renewed for this long belongs to a worker that died
POLL_S = 0.5  # how often a waiting worker looks for a share
_ROWS_PER_GROUP = 1024  # documents per Parquet row group of a share file
_IDS, _TARGETS = "ids", "targets"
_FORMAT = 1  # of the share files: a kdpipe that writes them otherwise never reads these

Share = list[Source]  # the sources and slices one worker reads, in corpus order
Item = Any  # a document's token ids (list[int]), or a conversation (TokenSequence)


def _size_and_rows(source: str) -> tuple[int, int | None]:
    """(bytes, Parquet rows or None) of a local source. Raises ConfigError when unreadable."""
    try:
        size = os.path.getsize(source)
        if not source.lower().endswith(".parquet"):
            return size, None
        import pyarrow.parquet as pq

        return size, pq.ParquetFile(source).metadata.num_rows
    except (OSError, ValueError) as exc:  # pyarrow's errors are one of the two
        raise ConfigError(f"--data {source}: cannot read it ({exc}); check the file") from exc


def plan_shares(sources: Sequence[str], num_shares: int) -> list[Share] | None:
    """Split `sources` (from `resolve_sources`) into `num_shares` contiguous shares of about
    equal bytes, in corpus order; None when a source is a Hugging Face dataset (it cannot be
    split without reading it).

    Reading the shares one after another reads every document once, in the order reading
    `sources` does. A share may be empty (more workers than splittable pieces). Raises
    ConfigError for a file that cannot be read.
    """
    if any(s.startswith(HF_PREFIX) for s in sources):
        return None
    sizes = [_size_and_rows(s) for s in sources]
    total = sum(size for size, _ in sizes)
    bounds = [total * j // num_shares for j in range(num_shares + 1)]
    shares: list[Share] = [[] for _ in range(num_shares)]
    offset = 0
    for source, (size, rows) in zip(sources, sizes, strict=True):
        if source.lower().endswith(".jsonl") or rows:
            for j in range(num_shares):
                piece = _slice(source, size, rows, max(bounds[j] - offset, 0),
                               min(bounds[j + 1] - offset, size))
                if piece is not None:
                    shares[j].append(piece)
        else:
            # Indivisible (.txt, .jsonl.zst, a Parquet file without rows): whole, in the share
            # its first byte falls in (an empty file at the very end: the last share).
            owner = next((j for j in range(num_shares) if offset < bounds[j + 1]),
                         num_shares - 1)
            shares[owner].append(source)
        offset += size
    return shares


def _slice(source: str, size: int, rows: int | None, lo: int, hi: int) -> SourceSlice | None:
    """The part of a .jsonl (`rows` None) or .parquet file in its bytes [lo, hi), if any."""
    if hi <= lo:
        return None
    if rows is None:
        return SourceSlice(source, lo, hi)
    # Row r sits at byte r·size/rows: the rows of [lo, hi) start at ceil(lo·rows/size).
    start, stop = -(-lo * rows // size), -(-hi * rows // size)
    return SourceSlice(source, start, stop) if stop > start else None


def _share_name(index: int, count: int) -> str:
    return f"share-{index:05d}-of-{count:05d}"


def remove_shares(out: Path) -> None:
    """Delete the token-id files the workers shared (after the merge: no one reads them)."""
    shutil.rmtree(Path(out) / SHARES_DIR, ignore_errors=True)


class _Claim:
    """An exclusive claim on tokenizing one share, renewed by a thread while held."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="share-claim", daemon=True)

    @classmethod
    def take(cls, path: Path) -> _Claim | None:
        """The claim, or None when another worker holds it."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        claim = cls(path)
        claim._thread.start()
        return claim

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return  # taken over as stale: the other worker's result is the same

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def _holder_gone(claim: Path) -> bool:
    """Whether the claim names a process of this host that no longer runs (a crashed run of
    this worker, re-run): no need to wait STALE_S for it."""
    try:
        host, pid = claim.read_text(encoding="utf-8").split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # unreadable, half-written, or another user's process
        return False
    return False


class SharedCorpus:
    """The shares (`plan_shares`) of one corpus, kept in `out`, as worker `worker_index` sees
    them.

    `tokenize(share, stats)` reads and tokenizes one share, yielding its items (a document's
    ids, or a conversation's sequence) and counting into `stats`; `conversations` says which.
    `key` identifies everything else that decides the items (the cache's settings
    fingerprint). `flags` name the options to check when the corpus holds no document.
    """

    def __init__(self, out: Path, shares: list[Share], worker_index: int, key: str,
                 tokenize: Callable[[Share, CorpusStats], Iterable[Item]],
                 conversations: bool, flags: str) -> None:
        self.folder = Path(out) / SHARES_DIR
        self.shares, self.worker_index = shares, worker_index
        self.tokenize, self.conversations, self.flags = tokenize, conversations, flags
        # The plan by source position, not path: workers may name the corpus differently
        # (another working folder), as the corpus fingerprint in the settings allows.
        order = {name: i for i, name in enumerate(dict.fromkeys(
            source_name(p) for share in shares for p in share))}
        plan = [[[order[source_name(p)], p.start, p.stop] if isinstance(p, SourceSlice)
                 else [order[p]] for p in share] for share in shares]
        self.key = json_fingerprint({"format": _FORMAT, "settings": key, "shares": plan})
        self.tokenized: list[int] = []  # the shares this worker tokenized itself

    def _path(self, index: int, suffix: str) -> Path:
        return self.folder / (_share_name(index, len(self.shares)) + suffix)

    def _record(self, index: int) -> dict[str, Any] | None:
        """The share's completion record when it is done with this key."""
        try:
            record = json.loads(self._path(index, ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != self.key:
            return None
        data = self._path(index, ".parquet")
        return record if data.is_file() and data.stat().st_size == record.get("bytes") else None

    def _produce(self, index: int) -> bool:
        """Tokenize share `index` unless another worker holds its claim; True when done."""
        claim = _Claim.take(self._path(index, ".claim"))
        if claim is None:
            return False
        try:
            if self._record(index) is None:  # finished between our look and our claim
                self._write(index)
                self.tokenized.append(index)
        finally:
            claim.release()
        return True

    def _write(self, index: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        stats = CorpusStats()
        columns = {_IDS: pa.list_(pa.int32())}
        if self.conversations:
            columns[_TARGETS] = pa.list_(pa.bool_())
        schema = pa.schema(columns)
        path = self._path(index, ".parquet")
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            batch: list[Item] = []
            for item in self.tokenize(self.shares[index], stats):
                batch.append(item)
                if len(batch) == _ROWS_PER_GROUP:
                    writer.write_table(self._table(batch, schema))
                    batch = []
            if batch:
                writer.write_table(self._table(batch, schema))
        atomic_write_json(self._path(index, ".json"), {
            "key": self.key, "bytes": path.stat().st_size, "stats": asdict(stats)})
        log.info("tokenized corpus share %d of shares 0..%d (%d documents)", index,
                 len(self.shares) - 1, stats.documents_read)

    def _table(self, items: list[Item], schema: Any) -> Any:
        import pyarrow as pa

        if not self.conversations:
            return pa.table({_IDS: items}, schema=schema)
        return pa.table({_IDS: [s.ids for s in items], _TARGETS: [s.targets for s in items]},
                        schema=schema)

    def _ensure(self, index: int) -> dict[str, Any]:
        """The share's record, once it is done: tokenized here, or by another worker that is
        alive (a claim renewed within STALE_S)."""
        claim = self._path(index, ".claim")
        seen: tuple[float, float] | None = None  # (the claim's mtime, when we first saw it)
        waited = False
        while (record := self._record(index)) is None:
            if self._produce(index):
                continue
            try:
                mtime = claim.stat().st_mtime
            except FileNotFoundError:
                continue  # released just now
            now = time.monotonic()
            if seen is None or seen[0] != mtime:
                seen = (mtime, now)  # renewed: its worker is alive (clocks may differ)
            if now - seen[1] > STALE_S or _holder_gone(claim):
                log.warning("corpus share %d: the worker that claimed it (%s) stopped; "
                            "tokenizing it here", index + 1, claim)
                claim.unlink(missing_ok=True)
                continue
            if not waited:
                log.info("waiting for another worker to tokenize corpus share %d of shares 0..%d",
                         index, len(self.shares) - 1)
                waited = True
            time.sleep(POLL_S)
        return record

    def items(self, stats: CorpusStats) -> Iterator[Item]:
        """Every item of the corpus in order, counting the corpus's documents into `stats`
        as one worker reading it all would. This worker's own share is tokenized first.
        Raises ConfigError, after the last share, when the corpus held no document."""
        import pyarrow.parquet as pq

        self.folder.mkdir(parents=True, exist_ok=True)
        if self._record(self.worker_index) is None:
            self._produce(self.worker_index)  # if another worker has it, it is waited for later
        for index in range(len(self.shares)):
            record = self._ensure(index)
            share = CorpusStats(**{f.name: int(record["stats"][f.name])
                                   for f in fields(CorpusStats)})
            for f in fields(CorpusStats):
                setattr(stats, f.name, getattr(stats, f.name) + getattr(share, f.name))
            reader = pq.ParquetFile(self._path(index, ".parquet"))
            for batch in reader.iter_batches(batch_size=_ROWS_PER_GROUP):
                ids = batch.column(_IDS).to_pylist()
                if not self.conversations:
                    yield from ids
                    continue
                for seq, targets in zip(ids, batch.column(_TARGETS).to_pylist(), strict=True):
                    yield TokenSequence(seq, targets)
        if stats.documents_read == 0:  # one share may hold none, the corpus may not
            sources = list(dict.fromkeys(source_name(p) for share in self.shares for p in share))
            more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
            raise ConfigError(f"--data: empty corpus (0 documents, {stats.documents_skipped} "
                              f"skipped) in {', '.join(sources[:3])}{more}; check --data and "
                              f"{self.flags}")

