"""Sequence building: both layouts against a naive reference, edge lengths, errors, streaming."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from kdpipe.pipeline.corpus import iter_documents
from kdpipe.pipeline.sequences import LAYOUTS, iter_sequences, special_affixes
from kdpipe.schemas.errors import ConfigError

from ..conftest import stdlib_texts
from ..families import family_tokenizer

DOCS = ["def f(x):\n    return x + 1\n", "import os", "a", "class A:\n    pass\n" * 5,
        "print('hello world')  # comment\n" * 3]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def reference_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def expected_document(tokenizer: Any, docs: list[str], max_length: int) -> list[list[int]]:
    out: list[list[int]] = []
    for text in docs:
        ids = reference_ids(tokenizer, text) + [tokenizer.eos_token_id]
        chunks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
        out.extend(c for c in chunks if len(c) >= 2)
    return out


def expected_packed(tokenizer: Any, docs: list[str], max_length: int) -> list[list[int]]:
    stream = [t for text in docs for t in reference_ids(tokenizer, text) + [tokenizer.eos_token_id]]
    blocks = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
    return [b for b in blocks if len(b) >= 2]


def build(docs: Any, tokenizer: Any, max_length: int, layout: str, **kw: Any) -> list[list[int]]:
    return [s.ids for s in iter_sequences(docs, tokenizer, max_length, layout, **kw)]


def test_layouts_are_the_manifest_layouts() -> None:
    assert set(LAYOUTS) == {"packed", "document"}


@pytest.mark.parametrize("max_length", [2, 3, 7, 16, 1000])
def test_document_layout_matches_reference(tokenizer: Any, max_length: int) -> None:
    got = build(DOCS, tokenizer, max_length, "document")
    assert got == expected_document(tokenizer, DOCS, max_length)
    assert all(2 <= len(s) <= max_length for s in got)


@pytest.mark.parametrize("max_length", [2, 3, 7, 16, 1000])
def test_packed_layout_matches_reference(tokenizer: Any, max_length: int) -> None:
    got = build(DOCS, tokenizer, max_length, "packed")
    assert got == expected_packed(tokenizer, DOCS, max_length)
    assert all(len(s) == max_length for s in got[:-1])
    total = sum(len(reference_ids(tokenizer, d)) + 1 for d in DOCS)
    kept = sum(map(len, got))
    assert kept == total or (kept == total - 1 and total % max_length == 1)


def test_document_boundaries(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    ids = reference_ids(tokenizer, DOCS[0])
    n = len(ids)
    # Tokens plus EOS fill exactly one sequence.
    assert build([DOCS[0]], tokenizer, n + 1, "document") == [ids + [eos]]
    # Exactly the document's token count: the lone EOS left over has no target and is dropped.
    assert build([DOCS[0]], tokenizer, n, "document") == [ids]
    # A one-token document still makes a sequence with its EOS; an empty one does not.
    one = reference_ids(tokenizer, "a")
    assert len(one) == 1
    assert build(["a", ""], tokenizer, 8, "document") == [one + [eos]]


def test_packed_remainder(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    ids = reference_ids(tokenizer, DOCS[0])
    n = len(ids)
    assert build([DOCS[0]], tokenizer, n + 1, "packed") == [ids + [eos]]
    assert build([DOCS[0]], tokenizer, n, "packed") == [ids]  # remainder [eos] dropped
    assert build([DOCS[0]], tokenizer, n + 5, "packed") == [ids + [eos]]  # short tail kept
    (a,) = reference_ids(tokenizer, "a")
    assert build(["a", "a"], tokenizer, 3, "packed") == [[a, eos, a]]  # then [eos]: dropped
    assert build(["a", "a", "a"], tokenizer, 4, "packed") == [[a, eos, a, eos], [a, eos]]


def test_no_eos_tokenizer(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.eos_token = None
    assert tok.eos_token_id is None
    ids = reference_ids(tok, DOCS[0])
    assert build([DOCS[0], "a"], tok, len(ids), "document") == [ids]  # "a" alone: no target
    with pytest.raises(ConfigError, match=r"^--pack: the tokenizer has no EOS token"):
        build(DOCS, tok, 8, "packed")


@pytest.mark.parametrize("max_length", [1, 0, -4])
def test_max_length_below_two(tokenizer: Any, max_length: int) -> None:
    with pytest.raises(ConfigError, match=rf"^--max-length {max_length}: "):
        iter_sequences(DOCS, tokenizer, max_length, "document")


def test_unknown_layout(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match=r"layout 'padded': unknown; expected one of packed"):
        iter_sequences(DOCS, tokenizer, 8, "padded")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_and_batch_size_independent(tokenizer: Any, layout: str) -> None:
    docs = DOCS * 7
    first = build(docs, tokenizer, 9, layout)
    assert build(docs, tokenizer, 9, layout) == first
    assert build(iter(docs), tokenizer, 9, layout, batch_size=1) == first
    assert build(docs, tokenizer, 9, layout, batch_size=4) == first


def test_truncation_in_tokenizer_json_is_ignored(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.backend_tokenizer.enable_truncation(4)
    untruncated = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert build(DOCS, tok, 16, "document") == expected_document(untruncated, DOCS, 16)
    assert tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is untouched


def test_no_overlong_sequence_warning(tiny_tokenizer_dir: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    n = len(reference_ids(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), DOCS[3]))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.model_max_length = 4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = build([DOCS[3]], tok, 8, "document")
    assert n > 4 and sum(map(len, got)) == n + 1
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]


class SlowLike:
    """A tokenizer without a Rust backend: exercises the generic `tokenizer(...)` path."""

    is_fast = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        assert set(kwargs) == {"add_special_tokens", "verbose"} and not kwargs["verbose"]
        return self.inner(texts, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slow_tokenizer_path(tokenizer: Any, layout: str) -> None:
    assert build(DOCS, SlowLike(tokenizer), 7, layout) == build(DOCS, tokenizer, 7, layout)


def test_streams_without_materialising(tokenizer: Any) -> None:
    def endless() -> Iterator[str]:
        for i in itertools.count():
            yield f"document number {i}\n"

    for layout in LAYOUTS:
        first = list(itertools.islice(iter_sequences(endless(), tokenizer, 8, layout,
                                                     batch_size=16), 50))
        assert len(first) == 50


def test_from_corpus_files(tokenizer: Any, jsonl_corpus: Path) -> None:
    docs = list(iter_documents([str(jsonl_corpus)]))
    got = build(iter_documents([str(jsonl_corpus)]), tokenizer, 128, "document")
    assert got == expected_document(tokenizer, docs, 128)


# --- special tokens: encode as the tokenizer's own encoding does ------------------------------


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Llama-3-like: the post-processor puts <|begin_of_text|> before every text."""
    out = tmp_path_factory.mktemp("llama-tokenizer")
    family_tokenizer("llama", stdlib_texts(), out)
    return AutoTokenizer.from_pretrained(out)


def with_suffix_eos(tokenizer: Any, tmp_path: Path) -> Any:
    """A T5-like variant whose post-processor also appends EOS after the text."""
    eos = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tok.eos_token_id)])
    return tok


def test_documents_start_with_the_tokenizers_bos(bos_tokenizer: Any) -> None:
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    full = [list(bos_tokenizer(d)["input_ids"]) for d in DOCS]  # the tokenizer's own encoding
    assert all(ids[0] == bos for ids in full)
    # document: the tokenizer's encoding + EOS, every chunk starting with the BOS
    rebalanced = 0
    for max_length in range(3, 12):
        expected = []
        for ids in full:
            body = ids[1:] + [eos]
            room = max_length - 1
            starts = list(range(0, len(body), room))
            if len(starts) > 1 and len(body) - starts[-1] == 1 and room >= 3:
                starts[-1] -= 1  # no last piece [EOS] alone: it takes a token from before
                rebalanced += 1
            stops = [*starts[1:], len(body)]
            expected += [[bos] + body[a:b] for a, b in zip(starts, stops, strict=True)
                         if a == 0 or b - a >= 2]
        got = build(DOCS, bos_tokenizer, max_length, "document")
        assert got == expected, max_length
        # Every document keeps its EOS target, and no sequence is [BOS, EOS].
        assert sum(s[-1] == eos for s in got) == len(DOCS) or room < 3
        assert [bos, eos] not in got or room < 3
    assert rebalanced  # the case occurs in this corpus
    # packed: each document keeps its BOS where it begins
    stream = [t for ids in full for t in ids + [eos]]
    got = build(DOCS, bos_tokenizer, max_length, "packed")
    assert got == [b for b in (stream[i:i + max_length]
                               for i in range(0, len(stream), max_length)) if len(b) >= 2]
    assert sum(s.count(bos) for s in got) == len(DOCS)


def test_no_add_special_tokens_encodes_the_text_alone(bos_tokenizer: Any) -> None:
    got = build(DOCS, bos_tokenizer, 1000, "document", add_special_tokens=False)
    assert got == expected_document(bos_tokenizer, DOCS, 1000)
    assert bos_tokenizer.bos_token_id not in {s[0] for s in got}


def test_suffix_eos_is_not_doubled(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok = with_suffix_eos(plain, tmp_path)
    assert special_affixes(tok) == ([], [tok.eos_token_id])
    assert build(DOCS, tok, 16, "document") == expected_document(plain, DOCS, 16)


def test_prefix_leaves_room_for_a_target(bos_tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="--max-length 2: the tokenizer starts every sequence"):
        iter_sequences(DOCS, bos_tokenizer, 2, "document")
    assert all(len(s) == 3 for s in build(DOCS, bos_tokenizer, 3, "packed")[:-1])


# --- what each sequence says beyond its ids -------------------------------------------------


def expected_segments(lengths: list[int], max_length: int) -> list[list[int]]:
    """Documents of `lengths` tokens cut into blocks of `max_length`: each block's pieces."""
    blocks: list[list[int]] = [[]]
    room = max_length
    for length in lengths:
        while length:
            if not room:
                blocks.append([])
                room = max_length
            piece = min(length, room)
            blocks[-1].append(piece)
            length, room = length - piece, room - piece
    return [b for b in blocks if sum(b) >= 2]


@pytest.mark.parametrize("max_length", [2, 3, 7, 16, 1000])
def test_packed_blocks_record_their_documents(tokenizer: Any, max_length: int) -> None:
    got = list(iter_sequences(DOCS, tokenizer, max_length, "packed"))
    lengths = [len(reference_ids(tokenizer, d)) + 1 for d in DOCS]
    assert [s.segments for s in got] == expected_segments(lengths, max_length)
    assert all(sum(s.segments or []) == len(s.ids) and s.targets is None for s in got)


def test_document_chunks_are_one_document_each(tokenizer: Any) -> None:
    got = list(iter_sequences(DOCS, tokenizer, 7, "document"))
    assert all(s.segments is None and s.targets is None for s in got)
