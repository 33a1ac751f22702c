"""Turn a stream of documents into the token sequences the teacher scores.

Two layouts (recorded in the manifest as `layout`):

* `document` (default): each document, followed by EOS when the tokenizer has one, is cut into
  consecutive chunks of at most `max_length` tokens. A sequence never spans two documents, so
  a per-sample difficulty score describes one document.
* `packed` (`--pack`, pretraining style): all documents joined with EOS after each, cut into
  blocks of exactly `max_length` (the last block may be shorter). No padding is wasted.

Chunks shorter than 2 tokens are dropped: a sequence needs at least one next-token target.
The consumer numbers sequences in yielded order (`sample_id = index`), so everything here is
deterministic, and streaming: memory is one tokenizer batch plus one document's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


def iter_token_ids(documents: Iterable[str], tokenizer: Any,
                   batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, tokenized `batch_size` at a time."""
    backend = _fast_backend(tokenizer)
    # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets we never use.
    encode_fast = getattr(backend, "encode_batch_fast", getattr(backend, "encode_batch", None))

    def encode(texts: list[str]) -> list[list[int]]:
        if encode_fast is not None:
            return [e.ids for e in encode_fast(texts, add_special_tokens=False)]
        out = tokenizer(texts, add_special_tokens=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def _chunks(ids: list[int], max_length: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), max_length):
        chunk = ids[start:start + max_length]
        if len(chunk) >= 2:
            yield chunk


def _packed(token_ids: Iterable[list[int]], eos: int, max_length: int) -> Iterator[list[int]]:
    buffer: list[int] = []
    for ids in token_ids:
        buffer.extend(ids)
        buffer.append(eos)
        if len(buffer) < max_length:
            continue
        # Cut every full block before trimming once: a 1M-token document costs O(n), not O(n²).
        full = len(buffer) - len(buffer) % max_length
        for start in range(0, full, max_length):
            yield buffer[start:start + max_length]
        buffer = buffer[full:]
    if len(buffer) >= 2:
        yield buffer


def iter_sequences(documents: Iterable[str], tokenizer: Any, max_length: int, layout: str,
                   batch_size: int = 256) -> Iterator[list[int]]:
    """Yield token-id sequences of 2..max_length tokens from `documents`, in a fixed order.

    `tokenizer` is a Hugging Face tokenizer (fast ones are batched through their Rust backend).
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
    return _generate(documents, tokenizer, max_length, layout, batch_size, eos)


def _generate(documents: Iterable[str], tokenizer: Any, max_length: int, layout: str,
              batch_size: int, eos: int | None) -> Iterator[list[int]]:
    token_ids = iter_token_ids(documents, tokenizer, batch_size)
    if layout == "packed":
        assert eos is not None  # checked by iter_sequences
        yield from _packed(token_ids, eos, max_length)
        return
    for ids in token_ids:
        if eos is not None:
            ids.append(eos)
        yield from _chunks(ids, max_length)
