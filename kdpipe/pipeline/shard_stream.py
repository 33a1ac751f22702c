"""The sequence stream cut into shards, produced ahead in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def shard_groups(sequences: Iterable[T], shard_size: int) -> Iterator[tuple[list[int], list[T]]]:
    """Group the sequence stream into shards; sample_id is the position in the stream."""
    ids: list[int] = []
    seqs: list[T] = []
    for sample_id, seq in enumerate(sequences):
        ids.append(sample_id)
        seqs.append(seq)
        if len(seqs) == shard_size:
            yield ids, seqs
            ids, seqs = [], []
    if seqs:
        yield ids, seqs


def in_background(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce `items` in a thread (reading and tokenizing overlap the teacher's work)."""
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():  # give up once the consumer has gone away
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # re-raised in the consumer's thread
            put(("error", exc))

    thread = threading.Thread(target=produce, name="corpus-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
