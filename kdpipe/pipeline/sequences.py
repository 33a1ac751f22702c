"""Turn a stream of documents into the token sequences the teacher scores.

Two layouts (recorded in the manifest as `layout`):

* `document` (default): each document, followed by EOS when the tokenizer has one, is cut into
  consecutive chunks of at most `max_length` tokens. A sequence never spans two documents, so
  a per-sample difficulty score describes one document.
* `packed` (`--pack`, pretraining style): all documents joined with EOS after each, cut into
  blocks of exactly `max_length` (the last block may be shorter). No padding is wasted.

Special tokens (`add_special_tokens`, the default): a document is encoded as the tokenizer's
own encoding does, with the ids its post-processor adds before the text (a BOS for Llama,
Gemma, Mistral; nothing for GPT-2, Qwen) and after it. A teacher then scores text in the form
it was trained on, and the first real token of a document has a teacher target (position 0,
the BOS, predicts it). In the document layout every chunk of a long document starts with those
prefix ids too, since each chunk is a sequence the teacher reads from its start; the packed
layout keeps each document's own BOS where the document begins.

Chunks shorter than 2 tokens are dropped: a sequence needs at least one next-token target.
The consumer numbers sequences in yielded order (`sample_id = index`), so everything here is
deterministic, and streaming: memory is one tokenizer batch plus one document's tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.manifest import LAYOUTS

__all__ = ["LAYOUTS", "iter_sequences", "iter_token_ids"]


def _fast_backend(tokenizer: Any) -> Any | None:
    """A private copy of a fast tokenizer's Rust backend without truncation or padding.

    A tokenizer.json may carry truncation/padding settings; they would silently cut documents.
    Copying keeps the caller's tokenizer untouched. Calling the backend directly also skips
    transformers' "sequence longer than the model's max length" warning, which means nothing
    here since we chunk the ids ourselves.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _encoder(tokenizer: Any, add_special_tokens: bool) -> Callable[[list[str]], list[list[int]]]:
    """A function encoding a batch of texts to ids (through the Rust backend when fast)."""
    backend = _fast_backend(tokenizer)
    # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets we never use.
    encode_fast = getattr(backend, "encode_batch_fast", getattr(backend, "encode_batch", None))

    def encode(texts: list[str]) -> list[list[int]]:
        if encode_fast is not None:
            return [e.ids for e in encode_fast(texts, add_special_tokens=add_special_tokens)]
        out = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    return encode


_AFFIX_PROBES = ("a", "Hello world", "x = 1")


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer's own encoding adds before and after a text.

    Read off the tokenizer by encoding probe texts with and without special tokens, so any
    post-processor (template, BOS-only, BOS + EOS) is covered without knowing its type.
    """
    plain_encode, full_encode = _encoder(tokenizer, False), _encoder(tokenizer, True)
    found = set()
    for probe, plain, full in zip(_AFFIX_PROBES, plain_encode(list(_AFFIX_PROBES)),
                                  full_encode(list(_AFFIX_PROBES)), strict=True):
        start = next((i for i in range(len(full) - len(plain) + 1)
                      if full[i:i + len(plain)] == plain), None)
        if not plain or start is None:
            raise ConfigError(f"the tokenizer's encoding of {probe!r} with special tokens does "
                              "not contain its encoding without them; pass "
                              "--no-add-special-tokens to encode documents without them")
        found.add((tuple(full[:start]), tuple(full[start + len(plain):])))
    if len(found) != 1:
        raise ConfigError("the tokenizer adds different special tokens to different texts; pass "
                          "--no-add-special-tokens to encode documents without them")
    prefix, suffix = found.pop()
    return list(prefix), list(suffix)


def iter_token_ids(documents: Iterable[str], tokenizer: Any,
                   batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, tokenized `batch_size` at a time."""
    encode = _encoder(tokenizer, False)

    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def _chunks(ids: list[int], prefix: list[int], max_length: int) -> Iterator[list[int]]:
    """`prefix` + consecutive pieces of `ids`, each sequence at most `max_length` tokens.

    With a prefix (BOS), a last piece of one token (often the EOS) would be predicted from the
    prefix alone, which teaches a wrong end ([BOS, EOS]); it takes one token of the piece
    before instead, so the document keeps its EOS target. Without a prefix that would only
    trade one target for another. Any other continuation piece of one token is dropped.
    """
    room = max_length - len(prefix)
    starts = list(range(0, len(ids), room))
    if prefix and len(starts) > 1 and len(ids) - starts[-1] == 1 and room >= 3:
        starts[-1] -= 1
    for start, stop in zip(starts, [*starts[1:], len(ids)], strict=True):
        piece = ids[start:stop]
        if len(prefix) + len(piece) >= 2 and (start == 0 or len(piece) >= 2):
            yield prefix + piece


def _packed(documents: Iterable[list[int]], max_length: int, done: Callable[[int], None]
            ) -> Iterator[list[int]]:
    buffer: list[int] = []
    ends: list[int] = []  # where each document with tokens still in `buffer` ends in it
    for ids in documents:
        buffer.extend(ids)
        ends.append(len(buffer))
        if len(buffer) < max_length:
            continue
        # Cut every full block before trimming once: a 1M-token document costs O(n), not O(n²).
        full = len(buffer) - len(buffer) % max_length
        for start in range(0, full, max_length):
            yield buffer[start:start + max_length]
        finished = bisect.bisect_right(ends, full)
        done(finished)
        ends = [e - full for e in ends[finished:]]
        buffer = buffer[full:]
    if len(buffer) >= 2:
        yield buffer
    done(len(ends))


def iter_sequences(documents: Iterable[str], tokenizer: Any, max_length: int, layout: str,
                   batch_size: int = 256, add_special_tokens: bool = True,
                   on_done: Callable[[int], None] | None = None) -> Iterator[list[int]]:
    """Yield token-id sequences of 2..max_length tokens from `documents`, in a fixed order.

    `tokenizer` is a Hugging Face tokenizer (fast ones are batched through their Rust backend).
    `add_special_tokens`: start (and end) documents as the tokenizer's own encoding does.
    `on_done(n)`: n more documents have had every sequence of theirs yielded (for progress;
    called by the generator before it yields the next sequence).
    """
    if max_length < 2:
        raise ConfigError(f"--max-length {max_length}: a sequence needs at least 2 tokens "
                          f"(one input, one target); pass --max-length 2 or more")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: unknown; expected one of {', '.join(LAYOUTS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: must be at least 1")
    eos = tokenizer.eos_token_id
    if layout == "packed" and eos is None:
        raise ConfigError("--pack: the tokenizer has no EOS token to separate packed documents; "
                          "drop --pack to keep one document per sequence, or set an EOS token")
    prefix, suffix = special_affixes(tokenizer) if add_special_tokens else ([], [])
    if len(prefix) + 2 > max_length:
        raise ConfigError(f"--max-length {max_length}: the tokenizer starts every sequence "
                          f"with {len(prefix)} special token(s), leaving room for fewer than 2 "
                          "tokens of text; raise --max-length")
    # Every document ends with EOS, so a student learns where documents end: the tokenizer's
    # own suffix when it ends with EOS, else the suffix followed by EOS.
    end = suffix if (suffix and suffix[-1] == eos) or eos is None else [*suffix, eos]
    return _generate(documents, tokenizer, max_length, layout, batch_size, prefix, end,
                     on_done or (lambda n: None))


def _generate(documents: Iterable[str], tokenizer: Any, max_length: int, layout: str,
              batch_size: int, prefix: list[int], end: list[int], done: Callable[[int], None]
              ) -> Iterator[list[int]]:
    token_ids = iter_token_ids(documents, tokenizer, batch_size)
    if layout == "packed":
        yield from _packed((prefix + ids + end for ids in token_ids), max_length, done)
        return
    for ids in token_ids:
        yield from _chunks(ids + end, prefix, max_length)
        done(1)
