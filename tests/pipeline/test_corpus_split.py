"""Workers tokenize only their share of the corpus, and still make one worker's cache.

The split is cut from file sizes and Parquet footers; reading the shares in order must read
every document once, as reading the corpus does (same texts, same line and row numbers). The
sequence stream a worker assembles from the shares, and the merged cache, must equal one
worker's bit for bit: plain text and conversations, document and packed layouts.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from transformers import AutoTokenizer

from kdpipe.pipeline import corpus_split
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.pipeline.corpus import (
    CorpusStats,
    Field,
    Skips,
    SourceSlice,
    iter_documents,
    iter_records,
    resolve_sources,
)
from kdpipe.pipeline.corpus_split import SHARES_DIR, SharedCorpus, plan_shares
from kdpipe.pipeline.inputs import cache_sequences, resolve_reading
from kdpipe.pipeline.sequences import TokenSequence
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import CacheManifest, read_manifest

from ..conftest import stdlib_texts
from ..families import Family
from .chat_helpers import config, make_tokenizer, write_jsonl
from .chat_templates import CHATML
from .conftest import small_config


def excerpts(count: int, longest: int = 900) -> list[str]:
    """`count` consecutive pieces of standard library source, of varied lengths."""
    source = "".join(stdlib_texts())
    starts = [sum(40 + 97 * j % longest for j in range(i)) for i in range(count + 1)]
    assert starts[-1] <= len(source)
    return [source[a:b] for a, b in zip(starts, starts[1:], strict=False)]


def mixed_corpus(folder: Path) -> list[str]:
    """Every local format, with blank lines, bad lines, empty files, long and short
    documents."""
    folder.mkdir()
    texts = excerpts(40)
    lines = [json.dumps({"text": t}) for t in texts[:20]]
    lines[3:3] = ["", "not json", json.dumps({"other": 1})]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text(texts[20], encoding="utf-8")
    pq.write_table(pa.table({"text": texts[21:35]}), folder / "c.parquet", row_group_size=3)
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[35:]).encode()))
    (folder / "e.jsonl").write_text(json.dumps({"text": "last, no newline"}), encoding="utf-8")
    for empty in ("b0.txt", "f.txt", "f.jsonl"):  # in the middle and at the very end
        (folder / empty).write_text("")
    return resolve_sources([str(folder)])


@pytest.mark.parametrize("num_shares", [1, 2, 3, 4, 7, 50])
def test_shares_read_every_document_once_in_order(tmp_path: Path, num_shares: int) -> None:
    sources = mixed_corpus(tmp_path / "corpus")
    whole_stats = CorpusStats()
    whole = list(iter_documents(sources, stats=whole_stats))
    shares = plan_shares(sources, num_shares)
    assert shares is not None and len(shares) == num_shares
    parts: list[str] = []
    stats = CorpusStats()
    for share in shares:
        parts += iter_documents(share, stats=stats, allow_empty=True)
    assert parts == whole
    assert stats == whole_stats  # the bad lines are skipped once, in their own share
    # Whole files stay whole; a slice is a byte range of a .jsonl, rows of a .parquet.
    pieces = [p for share in shares for p in share]
    assert sum(p == str(tmp_path / "corpus" / "b.txt") for p in pieces) == 1
    assert sum(p == str(tmp_path / "corpus" / "d.jsonl.zst") for p in pieces) == 1
    for piece in pieces:
        assert not isinstance(piece, SourceSlice) or piece.source.endswith((".jsonl", ".parquet"))


def test_slices_name_lines_and_rows_as_the_whole_file_does(tmp_path: Path) -> None:
    sources = mixed_corpus(tmp_path / "corpus")
    field = [Field("text")]

    def records(pieces: list[Any]) -> list[tuple[str, str]]:
        skip = Skips(CorpusStats(), strict=False)
        return [(where, r["text"]) for p in pieces for where, r in iter_records(p, field, None,
                                                                                 skip)]

    tabular = [s for s in sources if not s.endswith(".txt")]
    shares = plan_shares(tabular, 5)
    assert shares is not None
    assert records([p for share in shares for p in share]) == records(tabular)


def test_a_slice_boundary_on_a_line_start(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "aaaa"}, {"text": "bb"}, {"text": "c"}])
    first = len(path.read_bytes().split(b"\n")[0]) + 1  # byte where line 2 starts
    size = path.stat().st_size
    for cut in range(size + 1):
        halves = [SourceSlice(str(path), 0, cut), SourceSlice(str(path), cut, size)]
        texts = [t for half in halves for t in iter_documents([half], allow_empty=True)]
        assert texts == ["aaaa", "bb", "c"], cut
    assert list(iter_documents([SourceSlice(str(path), first, first + 1)])) == ["bb"]


def test_a_wrong_field_is_refused_and_a_few_dirty_rows_are_not(tmp_path: Path) -> None:
    # The first rows lack the field, the rest have it: skipped, in any number of shares.
    rows = [{"other": i} for i in range(5)] + [{"text": f"row {i}"} for i in range(40)]
    dirty = write_jsonl(tmp_path / "dirty.jsonl", rows)
    whole = list(iter_documents([str(dirty)]))
    for num_shares in (2, 9):
        shares = plan_shares([str(dirty)], num_shares)
        assert shares is not None
        assert [t for share in shares for t in iter_documents(share, allow_empty=True)] == whole
    # A file that never has it: the share at its start says so, as reading it whole does.
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"other": i} for i in range(2000)])
    shares = plan_shares([str(wrong)], 2)
    assert shares is not None
    with pytest.raises(ConfigError, match="has no field 'text'"):
        list(iter_documents(shares[0], allow_empty=True))
    with pytest.raises(ConfigError, match="has no field 'text'"):
        list(iter_documents([str(wrong)]))


def test_a_dataset_is_not_split(tmp_path: Path) -> None:
    assert plan_shares(["hf:someone/dataset"], 4) is None


# ---- who tokenizes what --------------------------------------------------------------------


def counting(tokenized: list[tuple[str, int]], name: str
             ) -> Callable[[list[Any], CorpusStats], Iterator[list[int]]]:
    """A tokenizer stand-in recording (worker, documents) per call: ids are text lengths."""
    def tokenize(share: list[Any], stats: CorpusStats) -> Iterator[list[int]]:
        texts = list(iter_documents(share, stats=stats, allow_empty=True))
        tokenized.append((name, len(texts)))
        return iter([[len(t), 1] for t in texts])

    return tokenize


def test_each_worker_tokenizes_its_own_share_only(tmp_path: Path) -> None:
    sources = mixed_corpus(tmp_path / "corpus")
    shares = plan_shares(sources, 4)
    assert shares is not None
    tokenized: list[tuple[str, int]] = []
    workers = [SharedCorpus(tmp_path / "out", shares, i, "key", counting(tokenized, f"w{i}"),
                            conversations=False, flags="--text-field") for i in range(4)]
    streams = [w.items(CorpusStats()) for w in workers]
    firsts = [next(s) for s in streams]  # all started: each has tokenized its own share
    results = [[first, *s] for first, s in zip(firsts, streams, strict=True)]
    whole = [[len(t), 1] for t in iter_documents(sources)]
    assert all(r == whole for r in results)
    assert [w.tokenized for w in workers] == [[0], [1], [2], [3]]
    assert sorted(name for name, _ in tokenized) == ["w0", "w1", "w2", "w3"]
    assert sum(n for _, n in tokenized) == len(whole)  # the corpus once, not 4 times


def test_a_worker_run_alone_tokenizes_the_shares_no_one_claimed(tmp_path: Path) -> None:
    sources = mixed_corpus(tmp_path / "corpus")
    shares = plan_shares(sources, 3)
    assert shares is not None
    tokenized: list[tuple[str, int]] = []
    first = SharedCorpus(tmp_path / "out", shares, 1, "key", counting(tokenized, "w1"),
                         conversations=False, flags="--text-field")
    stats = CorpusStats()
    assert len(list(first.items(stats))) == stats.documents_read
    assert first.tokenized == [1, 0, 2]  # its own first, then the others in order
    later = SharedCorpus(tmp_path / "out", shares, 0, "key", counting(tokenized, "w0"),
                         conversations=False, flags="--text-field")
    list(later.items(CorpusStats()))
    assert later.tokenized == []  # everything was there
    other = SharedCorpus(tmp_path / "out", shares, 0, "other settings",
                         counting(tokenized, "w0"), conversations=False, flags="--text-field")
    list(other.items(CorpusStats()))
    assert other.tokenized == [0, 1, 2]  # files of other settings are never read


def test_more_workers_than_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    shares = plan_shares([str(path)], 8)
    assert shares is not None and len(shares) == 8  # most hold no line start
    for index in (0, 7):  # a worker whose share has a document, one whose has none
        shared = SharedCorpus(tmp_path / "out", shares, index, "key", counting([], "w"),
                              conversations=False, flags="--text-field")
        assert list(shared.items(CorpusStats())) == [[3, 1], [3, 1]]


def test_a_live_claim_is_waited_for_and_a_dead_one_taken_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    monkeypatch.setattr(corpus_split, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(corpus_split, "POLL_S", 0.02)
    monkeypatch.setattr(corpus_split, "STALE_S", 0.5)
    sources = mixed_corpus(tmp_path / "corpus")
    shares = plan_shares(sources, 2)
    assert shares is not None
    tokenized: list[tuple[str, int]] = []
    slow_tokenize = counting(tokenized, "w1")

    def slow(share: list[Any], stats: CorpusStats) -> Iterator[list[int]]:
        time.sleep(1.0)  # longer than STALE_S: only the renewed claim keeps the share
        return slow_tokenize(share, stats)

    out = tmp_path / "out"
    busy = SharedCorpus(out, shares, 1, "key", slow, conversations=False, flags="")
    worker = threading.Thread(target=lambda: list(busy.items(CorpusStats())))
    worker.start()
    while not (out / SHARES_DIR / "share-00001-of-00002.claim").exists():
        time.sleep(0.01)
    waiting = SharedCorpus(out, shares, 0, "key", counting(tokenized, "w0"),
                           conversations=False, flags="")
    assert len(list(waiting.items(CorpusStats()))) > 0
    worker.join()
    assert waiting.tokenized == [0] and busy.tokenized == [1]

    # A worker that died holding a claim: its claim is never renewed.
    shutil.rmtree(out)
    (out / SHARES_DIR).mkdir(parents=True)
    (out / SHARES_DIR / "share-00001-of-00002.claim").write_text("gone 1\n")
    alone = SharedCorpus(out, shares, 0, "key", counting(tokenized, "w0"),
                         conversations=False, flags="")
    with caplog.at_level("WARNING"):
        list(alone.items(CorpusStats()))
    assert alone.tokenized == [0, 1] and "stopped; tokenizing it here" in caplog.text


def test_a_claim_of_a_process_that_is_gone_is_taken_over_at_once(tmp_path: Path) -> None:
    sources = mixed_corpus(tmp_path / "corpus")
    shares = plan_shares(sources, 2)
    assert shares is not None
    (tmp_path / "out" / SHARES_DIR).mkdir(parents=True)
    finished = subprocess.Popen(["true"])  # a crashed run: its pid no longer runs
    finished.wait()
    (tmp_path / "out" / SHARES_DIR / "share-00000-of-00002.claim").write_text(
        f"{socket.gethostname()} {finished.pid}\n")
    started = time.monotonic()
    shared = SharedCorpus(tmp_path / "out", shares, 1, "key", counting([], "w1"),
                          conversations=False, flags="")
    list(shared.items(CorpusStats()))
    assert shared.tokenized == [1, 0] and time.monotonic() - started < corpus_split.STALE_S


def test_an_empty_corpus_is_refused_once_all_shares_are_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["not json"] * 8)
    shares = plan_shares([str(path)], 3)
    assert shares is not None
    shared = SharedCorpus(tmp_path / "out", shares, 0, "key", counting([], "w0"),
                          conversations=False, flags="--text-field")
    with pytest.raises(ConfigError, match=r"empty corpus \(0 documents, 8 skipped\) in .*bad"):
        list(shared.items(CorpusStats()))


# ---- the stream and the cache equal one worker's -------------------------------------------


def stream(cfg: CacheTeacherConfig, tokenizer: Any) -> tuple[list[TokenSequence], CorpusStats]:
    sources = resolve_sources(cfg.data)
    stats = CorpusStats()
    reading = resolve_reading(cfg, sources, tokenizer)
    return list(cache_sequences(cfg, reading, sources, tokenizer, stats, key="k")), stats


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("num_workers", [2, 4])
def test_conversation_stream_equals_one_workers(tmp_path: Path, pack: bool,
                                                num_workers: int) -> None:
    chatml = make_tokenizer("qwen2", tmp_path / "qwen2", CHATML)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": " ".join(["Answer."] * (i % 7 + 1))}]}
            for i in range(30)]
    rows[5] = {"messages": "not a conversation"}
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = config(data, max_length=64, pack=pack)
    single, single_stats = stream(cfg, chatml)
    for index in range(num_workers):
        worker = replace(cfg, num_workers=num_workers, worker_index=index, out=tmp_path / "w")
        sequences, stats = stream(worker, chatml)
        assert sequences == single and stats == single_stats
    assert len(list((tmp_path / "w" / SHARES_DIR).glob("*.parquet"))) == num_workers


def content(out: Path, manifest: CacheManifest) -> list[tuple[str, str, int, int, str]]:
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == \
        [s.file for s in manifest.shards]
    assert [sha256_file(out / s.file) for s in manifest.shards] == \
        [s.sha256 for s in manifest.shards]
    return [(s.file, s.sha256, s.first_sample_id, s.last_sample_id, s.tokens_sha256)
            for s in manifest.shards]


def run_workers(cfg: CacheTeacherConfig, num_workers: int) -> dict[int, CacheManifest]:
    """All workers at once, one thread each, as one launcher would start them."""
    results: dict[int, CacheManifest] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = cache_teacher(replace(cfg, num_workers=num_workers,
                                                   worker_index=index))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize(("num_workers", "pack"), [(3, False), (4, True)])
def test_merged_cache_equals_one_workers(tiny_teacher_dir: Path, tmp_path: Path,
                                         num_workers: int, pack: bool) -> None:
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in excerpts(24, 500)),
                    encoding="utf-8")
    cfg = small_config(tiny_teacher_dir, data, tmp_path / "single", shard_size=4, pack=pack,
                       max_length=40)
    reference = cache_teacher(cfg)
    assert len(reference.shards) > 2 * num_workers
    workers = replace(cfg, out=tmp_path / "workers")
    run_workers(workers, num_workers)
    merged = read_manifest(workers.out)
    assert merged.complete and merged.corpus == reference.corpus
    assert content(workers.out, merged) == content(cfg.out, reference)
    assert not (workers.out / SHARES_DIR).exists()  # the merge removed the shares


def test_merged_chat_cache_equals_one_workers(model_family: Callable[[str], Family],
                                              tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(model_family("qwen2").teacher, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(teacher)
    rows = [{"messages": [{"role": "user", "content": text[:30]},
                          {"role": "assistant", "content": text[30:]}]}
            for text in excerpts(20, 120)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = small_config(teacher, data, tmp_path / "single", shard_size=3, max_length=96,
                       pack=True)
    reference = cache_teacher(cfg)
    workers = replace(cfg, out=tmp_path / "workers")
    results = run_workers(workers, 2)
    merged = next(m for m in results.values() if "worker" not in m.extra)
    assert merged.corpus == reference.corpus
    assert content(workers.out, merged) == content(cfg.out, reference)
