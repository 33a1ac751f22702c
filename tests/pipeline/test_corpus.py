"""Corpus input: every format, folder/glob order, HF datasets, errors and bad documents."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kdpipe.pipeline import corpus
from kdpipe.pipeline.corpus import (
    CorpusStats,
    corpus_fingerprint,
    iter_documents,
    resolve_sources,
)
from kdpipe.schemas.errors import ConfigError


def write_jsonl(path: Path, texts: list[object], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def write_zst(path: Path, texts: list[str]) -> Path:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    # Two frames, the second written by a streaming writer (no content size in the header).
    half = len(data) // 2
    first = zstandard.ZstdCompressor().compress(data[:half])
    with path.open("wb") as f:
        f.write(first)
        with zstandard.ZstdCompressor().stream_writer(f, closefd=False) as w:
            w.write(data[half:])
    return path


def write_parquet(path: Path, texts: Sequence[str | None], field: str = "text",
                  row_group_size: int = 2) -> Path:
    table = pa.table({field: pa.array(texts, pa.string()), "n": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read_all(sources: list[str], **kwargs: object) -> list[str]:
    return list(iter_documents(sources, **kwargs))  # type: ignore[arg-type]


# ---- formats -------------------------------------------------------------------------------

def test_txt_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert read_all(resolve_sources([str(path)])) == ["line one\nline two\n"]


def test_jsonl(tmp_path: Path, jsonl_corpus: Path) -> None:
    expected = [json.loads(line)["text"] for line in jsonl_corpus.read_text().splitlines()]
    stats = CorpusStats()
    assert read_all(resolve_sources([str(jsonl_corpus)]), stats=stats) == expected
    assert stats == CorpusStats(documents_read=10, documents_skipped=0)


def test_jsonl_zst_streams_multiple_frames(tmp_path: Path) -> None:
    texts = [f"document {i} " * (i + 1) for i in range(50)]
    path = write_zst(tmp_path / "c.jsonl.zst", texts)
    assert read_all(resolve_sources([str(path)])) == texts


def test_corrupt_zst_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(b"not zstd at all" * 10)
    with pytest.raises(ConfigError, match=r"bad\.jsonl\.zst: corrupt zstd"):
        read_all([str(path)])


def test_parquet_across_row_groups(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(7)]
    path = write_parquet(tmp_path / "p.parquet", texts, field="content")
    assert pq.ParquetFile(path).num_row_groups == 4
    assert read_all(resolve_sources([str(path)]), text_field="content") == texts


def test_parquet_binary_column_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe", b"fine"], pa.binary())}), path)
    stats = CorpusStats()
    assert read_all([str(path)], stats=stats) == ["ok", "fine"]
    assert stats.documents_skipped == 1


# ---- folders, globs, order -----------------------------------------------------------------

@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".cache").mkdir()
    write_jsonl(root / "b" / "2.jsonl", ["b2"])
    write_jsonl(root / "a" / "1.jsonl", ["a1-x", "a1-y"])
    (root / "a" / "0.txt").write_text("a0", encoding="utf-8")
    write_parquet(root / "z.parquet", ["z"])
    write_zst(root / "b" / "3.jsonl.zst", ["b3"])
    write_jsonl(root / ".cache" / "hidden.jsonl", ["hidden"])
    (root / "README.md").write_text("not corpus", encoding="utf-8")
    return root


def test_folder_is_recursive_sorted_and_skips_hidden_and_other_formats(tree: Path) -> None:
    sources = resolve_sources([str(tree)])
    assert [Path(s).relative_to(tree).as_posix() for s in sources] == [
        "a/0.txt", "a/1.jsonl", "b/2.jsonl", "b/3.jsonl.zst", "z.parquet"]
    assert read_all(sources) == ["a0", "a1-x", "a1-y", "b2", "b3", "z"]


def test_glob_and_data_order(tree: Path) -> None:
    sources = resolve_sources([str(tree / "z.parquet"), str(tree / "**" / "*.jsonl")])
    assert [Path(s).name for s in sources] == ["z.parquet", "1.jsonl", "2.jsonl"]
    assert read_all(sources) == ["z", "a1-x", "a1-y", "b2"]


def test_duplicate_files_are_read_once(tree: Path) -> None:
    sources = resolve_sources([str(tree / "a" / "1.jsonl"), str(tree / "a")])
    assert [Path(s).name for s in sources] == ["1.jsonl", "0.txt"]


def test_two_runs_are_identical(tree: Path) -> None:
    first = read_all(resolve_sources([str(tree)]))
    assert read_all(resolve_sources([str(tree)])) == first


# ---- Hugging Face datasets -----------------------------------------------------------------

@pytest.fixture()
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail fast instead of retrying an unreachable hub for 20 s."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_unknown_name_becomes_hf_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "hub_unreachable", lambda: None)  # the hub answers
    assert resolve_sources(["roneneldan/TinyStories", "wikitext"]) == [
        "hf:roneneldan/TinyStories", "hf:wikitext"]


@pytest.fixture()
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hub and datasets caches of their own, empty."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path


def test_typo_fails_at_once_when_offline(empty_hf_cache: Path, offline_hub: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder-name typo is neither a path nor a cached dataset: refused with both readings,
    without asking the hub."""
    monkeypatch.setattr(corpus, "hub_unreachable", lambda: pytest.fail("asked the hub"))
    with pytest.raises(ConfigError, match=r"^--data corpus: no file or folder named 'corpus' "
                       r"here .*, and no dataset 'corpus' in the local Hugging Face cache "
                       r"\(the hub is offline: HF_HUB_OFFLINE") as info:
        resolve_sources(["corpus"])
    assert "\n" not in str(info.value)


def test_typo_fails_at_once_when_hub_unreachable(empty_hf_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "hub_unreachable", lambda: "https://hub is unreachable: DNS")
    with pytest.raises(ConfigError, match=r"no dataset 'org/corpus' in the local Hugging Face "
                       r"cache \(https://hub is unreachable: DNS\)"):
        resolve_sources(["org/corpus"])


def test_cached_dataset_is_used_offline(empty_hf_cache: Path, offline_hub: None) -> None:
    (empty_hf_cache / "hub" / "datasets--org--corpus").mkdir(parents=True)
    (empty_hf_cache / "datasets" / "wikitext").mkdir(parents=True)
    assert resolve_sources(["org/corpus", "wikitext"]) == ["hf:org/corpus", "hf:wikitext"]


def test_offline_typo_fails_at_once_from_the_command_line(tmp_path: Path) -> None:
    """`--data corpus` (a folder-name typo) with the hub offline: one line naming both
    readings, before any model is loaded, in a real process with the environment set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "kdpipe", "cache-teacher", "--teacher",
                           "no-such-teacher", "--data", "corpus", "--out", "cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2, done.stderr
    assert errors == [
        f"kdpipe: error: --data corpus: no file or folder named 'corpus' here ({tmp_path}), "
        "and no dataset 'corpus' in the local Hugging Face cache (the hub is offline: "
        "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); check the path, or go online to load "
        "the dataset"], done.stderr
    assert not (tmp_path / "cache").exists()


def test_unanswered_probe_gives_up_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that hangs (a name lookup, a black-holed address) costs the timeout only."""
    import threading
    import urllib.request

    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> None:
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    try:
        assert "did not answer within 0.1 s" in (corpus.hub_unreachable(timeout=0.1) or "")
    finally:
        release.set()


def test_hf_dataset_from_local_folder(tmp_path: Path, offline_hub: None) -> None:
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_parquet(folder / "train.parquet", ["first", "", "second"], field="body")
    stats = CorpusStats()
    docs = read_all(["hf:" + str(folder)], text_field="body", split="train", stats=stats)
    assert docs == ["first", "second"]
    assert stats == CorpusStats(documents_read=2, documents_skipped=1)
    assert read_all(["hf:" + str(folder)], text_field="body", split=None) == docs


def test_hf_dataset_missing_field(tmp_path: Path, offline_hub: None) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ["x"], field="content")
    with pytest.raises(ConfigError, match=r"--text-field text: dataset .*ds has no field 'text'"):
        read_all(["hf:" + str(folder)])


def test_hf_unknown_name_and_split(tmp_path: Path, offline_hub: None) -> None:
    with pytest.raises(ConfigError, match=r"^--data no-such/dataset: not a file or folder"):
        read_all(["hf:no-such/dataset"])
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ["x"])
    with pytest.raises(ConfigError, match=r"split 'validation'") as info:
        read_all(["hf:" + str(folder)], split="validation")
    assert "\n" not in str(info.value)


def test_hf_fingerprint_follows_content(tmp_path: Path, offline_hub: None) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ["x"])
    first = corpus_fingerprint(["hf:" + str(folder)], "text", "train")
    assert corpus_fingerprint(["hf:" + str(folder)], "text", "train") == first
    write_jsonl(folder / "train.jsonl", ["y"])
    assert corpus_fingerprint(["hf:" + str(folder)], "text", "train") != first
    with pytest.raises(ConfigError, match="--data no-such/dataset"):
        corpus_fingerprint(["hf:no-such/dataset"], "text", "train")


# ---- fingerprint ---------------------------------------------------------------------------

def test_fingerprint_depends_on_content_order_and_field(tree: Path, tmp_path: Path) -> None:
    a, b = str(tree / "a" / "1.jsonl"), str(tree / "b" / "2.jsonl")
    base = corpus_fingerprint([a, b], "text", "train")
    assert corpus_fingerprint([a, b], "text", "test") == base  # split is for hub datasets only
    assert corpus_fingerprint([b, a], "text", "train") != base  # order changes sample ids
    assert corpus_fingerprint([a, b], "body", "train") != base
    write_jsonl(Path(b), ["changed"])
    assert corpus_fingerprint([a, b], "text", "train") != base


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "pattern"), [
    ([], r"^--data: no corpus given"),
    (["missing.jsonl"], r"^--data missing\.jsonl: file not found"),
    (["./nowhere"], r"^--data \./nowhere: file not found"),
    (["a/b/c"], r"^--data a/b/c: file not found"),
])
def test_resolve_errors(data: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        resolve_sources(data)


def test_resolve_errors_on_disk(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: folder holds no supported files"):
        resolve_sources([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match=r"pattern matches no files"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(ConfigError, match=r"data\.csv: unsupported file format"):
        resolve_sources([str(tmp_path / "data.csv")])
    with pytest.raises(ConfigError, match=r"pattern holds no supported files"):
        resolve_sources([str(tmp_path / "*.csv")])


def test_empty_corpus(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", ["", "   \n"])
    with pytest.raises(ConfigError, match=r"^--data: empty corpus \(0 documents, 2 skipped\)"):
        read_all([str(path)])


def test_missing_text_field_in_every_jsonl_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", ["x", "y"], field="content")
    with pytest.raises(ConfigError) as info:
        read_all([str(path)])
    message = str(info.value)
    assert message.startswith("--text-field text: ") and "c.jsonl" in message
    assert "fields: content, id" in message and "pass --text-field" in message


def test_wrong_text_field_fails_early_in_a_big_file(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "_FIELD_PROBE", 3)
    path = write_jsonl(tmp_path / "c.jsonl", [f"x{i}" for i in range(10)], field="content")
    stats = CorpusStats()
    with pytest.raises(ConfigError, match="--text-field text"):
        read_all([str(path)], stats=stats)
    assert stats.documents_skipped < 3  # stopped at the probe, not at the end of the file


def test_missing_text_field_in_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", ["x"], field="body")
    with pytest.raises(ConfigError, match=r"--text-field text: .*p\.parquet has no field 'text'"):
        read_all([str(path)])


def test_non_text_parquet_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", ["x"])
    with pytest.raises(ConfigError, match=r"column 'n' of .*p\.parquet is int64, not text"):
        read_all([str(path)], text_field="n")


def test_vanished_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gone\.jsonl: file not found"):
        read_all([str(tmp_path / "gone.jsonl")])


# ---- bad documents -------------------------------------------------------------------------

@pytest.fixture()
def dirty(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',  # not JSON
        "{\"text\": \"caf\u00e9\"}".encode("latin-1"),  # not UTF-8
        json.dumps({"text": 42}).encode(),  # not a string
        json.dumps({"text": "   "}).encode(),  # whitespace only
        json.dumps({"other": "no text field"}).encode(),
        b"",  # a blank line is not a record
        json.dumps(["a", "list"]).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "good two"}).encode(),
    ]
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_documents_are_skipped_counted_and_summarised(
        dirty: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes(b"ok \xff\xfe")
    (tmp_path / "blank.txt").write_text(" \n\t", encoding="utf-8")
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="kdpipe.pipeline.corpus"):
        docs = read_all([str(dirty), str(bad_txt), str(tmp_path / "blank.txt")], stats=stats)
    assert docs == ["good one", "good two"]
    assert stats == CorpusStats(documents_read=2, documents_skipped=9)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("skipped 9 of 11 documents")
    assert "dirty.jsonl line 2" in warnings[0] and "--strict" in warnings[0]


@pytest.mark.parametrize(("line", "reason"), [
    (2, "not valid JSON"), (3, "not valid UTF-8"), (4, "is not a string"), (5, "empty"),
    (6, "no field 'text'"), (8, "not a JSON object"), (9, "not valid UTF-8"),
])
def test_strict_raises_on_first_bad_document(dirty: Path, line: int, reason: str) -> None:
    lines = dirty.read_bytes().split(b"\n")
    dirty.write_bytes(b"\n".join([lines[0], lines[line - 1], lines[-2]]) + b"\n")
    with pytest.raises(ConfigError, match=rf"^--strict: .*dirty\.jsonl line 2: .*{reason}"):
        read_all([str(dirty)], strict=True)


def test_strict_txt_and_parquet(tmp_path: Path) -> None:
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes(b"ok \xff")
    with pytest.raises(ConfigError, match=r"^--strict: .*bad\.txt byte 3: not valid UTF-8"):
        read_all([str(bad_txt)], strict=True)
    path = write_parquet(tmp_path / "p.parquet", ["a", "b", None, "c"])
    with pytest.raises(ConfigError, match=r"^--strict: .*p\.parquet row 3: field 'text' is null"):
        read_all([str(path)], strict=True)
    assert read_all([str(path)]) == ["a", "b", "c"]


def test_bom_is_not_part_of_the_text(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x"}).encode() + b"\n")
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbfy")
    assert read_all([str(path), str(txt)], strict=True) == ["x", "y"]


def test_stops_early_without_reading_everything(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [f"d{i}" for i in range(100)])
    stats = CorpusStats()
    assert list(itertools.islice(iter_documents([str(path)], stats=stats), 3)) == ["d0", "d1", "d2"]
    assert stats.documents_read == 3
