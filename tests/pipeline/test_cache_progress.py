"""cache-teacher's progress: documents counted up front, the count moved by the teacher's work."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from kdpipe import progress as progress_module
from kdpipe.pipeline import cache_stage
from kdpipe.pipeline.cache_progress import CacheProgress, DocumentCount, DocumentsDone
from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.pipeline.corpus import CorpusStats, count_documents, iter_documents
from kdpipe.pipeline.sequences import iter_sequences

from .conftest import small_config


class CountedFirst(DocumentCount):
    """The count runs beside the stage; a test waits for it to know what the bar shows."""

    def __init__(self, sources: list[str]) -> None:
        super().__init__(sources)
        self.join()


def test_count_is_what_the_reader_reads_or_skips(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n  \n{"text": ""}\nnot json\n{"other": 1}\n'
                     '{"text": "two"}', encoding="utf-8")  # no final newline
    txt = tmp_path / "b.txt"
    txt.write_text("a whole file is one document", encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["x", None, "", "y"]}), parquet, row_group_size=2)
    sources = [str(jsonl), str(txt), str(parquet)]
    stats = CorpusStats()
    assert len(list(iter_documents(sources, stats=stats))) == 5
    assert count_documents(sources) == stats.documents_read + stats.documents_skipped == 10


def test_count_is_unknown_where_it_is_not_cheap(tmp_path: Path) -> None:
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(b"")
    assert count_documents([str(zst)]) is None  # needs decompressing
    assert count_documents(["hf:owner/name"]) is None  # needs downloading
    assert count_documents([str(tmp_path / "gone.jsonl")]) is None  # the reader says why


@pytest.mark.parametrize("layout", ["document", "packed"])
def test_a_document_is_done_once_its_last_sequence_is_out(tiny_tokenizer_dir: Path,
                                                         layout: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = ["def f(x):\n    return x\n" * 6, "a", "import os", "class A:\n    pass\n" * 9]
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]  # + EOS
    ends = [sum(lengths[:i + 1]) for i in range(len(texts))]  # packed: where each one ends
    done: list[int] = []
    before = [(sum(done), seq) for seq in iter_sequences(texts, tokenizer, 16, layout,
                                                        on_done=done.append)]
    assert sum(done) == len(texts)
    emitted = 0
    for finished, seq in before:  # a document counts only once every token of it is out
        assert finished <= sum(end <= emitted for end in ends)
        emitted += len(seq.ids)
    assert [finished for finished, _ in before] == sorted(finished for finished, _ in before)
    assert len({finished for finished, _ in before}) > 2  # and it does move along


def test_documents_advance_with_the_teachers_tokens(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(12)),
                      encoding="utf-8")
    done = DocumentsDone(CorpusStats())
    progress = CacheProgress(CountedFirst([str(corpus)]), done, progress=False)
    progress.start_shard(4, tokens=100)  # documents 0-3
    progress.update(50)
    assert (progress.bar.n, progress.bar.total) == (2, 12)
    progress.update(50)
    assert progress.bar.n == 4
    progress.start_shard(9, tokens=30)  # kept from an earlier run: no tokens computed
    progress.start_shard(12, tokens=30)
    assert progress.bar.n == 9
    done.add(12)  # the last document finished after the last shard was cut
    progress.close()
    assert progress.bar.n == 12


def test_cache_teacher_logs_documents_against_the_counted_total(
        tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)  # a status line at every update
    monkeypatch.setattr(cache_stage, "DocumentCount", CountedFirst)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        cache_teacher(small_config(tiny_teacher_dir, small_corpus, tmp_path / "cache",
                                   device="cpu", progress=False))
    lines = [r.getMessage() for r in caplog.records]
    assert all(line.startswith("cache-teacher: doc ") and "/6 (" in line and "tok_s" in line
               for line in lines), lines
    counts = [int(line.split()[2].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and len(set(counts)) > 3  # moves with the work, not at once
    assert lines[-1].startswith("cache-teacher: doc 6/6 (100%)")
