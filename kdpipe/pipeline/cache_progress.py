"""How far `kdpipe cache-teacher` is through its corpus, in documents, with a total and an ETA.

The teacher works in tokens, but the number of tokens is only known once the whole corpus is
tokenized. The number of documents is known up front, cheaply, for local files
(`corpus.count_documents`: a line count, Parquet metadata), so progress is counted in corpus
documents, and a thread counts the total while the stage starts. Each shard records how many
documents were finished — every sequence of theirs in it or an earlier shard — or skipped when
it was cut; the teacher's tokens within a shard move the count towards that mark. A document
counts once its last sequence is done, so the count never runs ahead of the teacher (a corpus
of one huge document shows 0/1 until the end, with its tokens per second).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

from kdpipe.pipeline.corpus import CorpusStats, count_documents
from kdpipe.progress import Progress

T = TypeVar("T")  # a shard's sequences: token id lists, or sequences with their targets


class DocumentCount(threading.Thread):
    """Counts the corpus's documents in the background; `total` is None until done, or when
    the corpus cannot be counted cheaply (`count_documents`)."""

    def __init__(self, sources: Sequence[str]) -> None:
        super().__init__(name="corpus-count", daemon=True)  # never holds up the process's exit
        self.sources = list(sources)
        self.total: int | None = None
        self.start()

    def run(self) -> None:
        self.total = count_documents(self.sources)


class DocumentsDone:
    """Where the sequence stream stands in the corpus: documents whose sequences have all
    been yielded (`iter_sequences(on_done=add)`) plus those the reader skipped (`stats`)."""

    def __init__(self, stats: CorpusStats) -> None:
        self.stats, self.finished = stats, 0

    def add(self, n: int) -> None:
        self.finished += n

    @property
    def position(self) -> int:
        return self.finished + self.stats.documents_skipped


def with_documents_done(shards: Iterator[tuple[list[int], list[T]]], done: DocumentsDone
                        ) -> Iterator[tuple[list[int], list[T], int]]:
    """Each shard with `done.position` when it was cut. Runs in the thread that reads the
    corpus, so the counters are read where they are written."""
    for sample_ids, seqs in shards:
        yield sample_ids, seqs, done.position


class CacheProgress:
    """cache-teacher's progress: `start_shard` at each shard, `update(tokens)` as the teacher
    computes them (a shard kept from an earlier run, or another worker's, only starts: the
    next one finishes it). A bar or a periodic status line, as `kdpipe.progress.Progress`.
    """

    def __init__(self, count: DocumentCount, done: DocumentsDone, progress: bool) -> None:
        self.count, self._done = count, done
        self.bar = Progress("cache-teacher", unit="doc", progress=progress)
        self._start = self._end = 0  # documents before and after the current shard
        self._shard_tokens = self._done_tokens = self._tokens = 0
        self._started = time.perf_counter()
        self._counted = False  # the count's result is on the bar

    def start_shard(self, documents_end: int, tokens: int) -> None:
        """The next shard ends after `documents_end` documents and holds `tokens` tokens."""
        self._advance_to(self._end)  # the shard before is done
        self._start, self._end = self._end, documents_end
        self._shard_tokens, self._done_tokens = max(tokens, 1), 0

    def update(self, tokens: int) -> None:
        """The teacher computed `tokens` more tokens of the current shard."""
        self._done_tokens += tokens
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self.bar.set_postfix(tok_s=f"{self._tokens / elapsed:,.0f}")
        share = min(1.0, self._done_tokens / self._shard_tokens)
        self._advance_to(self._start + int(share * (self._end - self._start)))

    def _advance_to(self, documents: int) -> None:
        if not self._counted and not self.count.is_alive():
            self._counted = True
            self.bar.set_total(self.count.total)
        if documents > self.bar.n:
            self.bar.update(documents - self.bar.n)

    def close(self) -> None:
        """After the whole stream: every document is done (the last one after the marks)."""
        self._advance_to(self._done.position)
        self.bar.close()
