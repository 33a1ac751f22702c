"""Turn a stream of documents into the token sequences the teacher scores.

Each sequence is a `TokenSequence`: its ids, which positions are training targets (None:
every one, as for plain text) and the lengths of the documents packed into it.

Two layouts (recorded in the manifest as `layout`):

* `document` (default): each document, followed by EOS when the tokenizer has one, is cut into
  consecutive chunks of at most `max_length` tokens. A sequence never spans two documents, so
  a per-sample difficulty score describes one document.
* `packed` (`--pack`, pretraining style): all documents joined with EOS after each, cut into
  blocks of exactly `max_length` (the last block may be shorter). No padding is wasted. A
  block records the lengths of the documents in it; a document cut at a block's end goes on
  as the first segment of the next block.

Conversations (`conversation_sequences`, docs/chat-data.md) are never cut: one per sequence
in the document layout, whole conversations packed greedily into sequences of at most
`max_length` tokens in the packed layout.

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

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.manifest import LAYOUTS

__all__ = ["LAYOUTS", "TokenSequence", "conversation_sequences", "iter_sequences",
           "iter_token_ids", "sequences_of_ids"]


@dataclass(frozen=True)
class TokenSequence:
    """One sequence for the teacher.

    `ids`: 2..max_length token ids. `targets`: one flag per position, `targets[t]` True when
    position t (which predicts token t + 1) is a training target; the last position predicts
    nothing in the sequence and is always False. None: every position is a target (plain
    text). `segments`: the lengths of the documents in the sequence, in order, summing to
    `len(ids)`, in the packed layout; None in the document layout (one document).
    """

    ids: list[int]
    targets: list[bool] | None = None
    segments: list[int] | None = None

    def position_mask(self) -> np.ndarray:
        """(len(ids) - 1,) bool: the positions the cache stores teacher targets for. A packed
        document's last position would predict the next document's first token, so it is
        never one."""
        mask = (np.ones(len(self.ids) - 1, dtype=bool) if self.targets is None
                else np.asarray(self.targets[:-1], dtype=bool))
        if self.segments is not None:
            mask[np.cumsum(self.segments[:-1], dtype=np.int64) - 1] = False
        return mask


def fast_backend(tokenizer: Any) -> Any | None:
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
    backend = fast_backend(tokenizer)
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


def _chunks(ids: list[int], prefix: list[int], max_length: int) -> Iterator[TokenSequence]:
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
            yield TokenSequence(prefix + piece)


def _take(lengths: deque[int], count: int) -> list[int]:
    """Pop segment lengths summing to `count` from the front of `lengths`, splitting the last
    one taken when it runs past (its rest stays in front, the next block's first segment)."""
    taken: list[int] = []
    while count:
        length = lengths.popleft()
        if length > count:
            lengths.appendleft(length - count)
            length = count
        taken.append(length)
        count -= length
    return taken


def _packed(documents: Iterable[list[int]], max_length: int, done: Callable[[int], None]
            ) -> Iterator[TokenSequence]:
    buffer: list[int] = []
    lengths: deque[int] = deque()  # of the documents (or their rests) in the buffer, in order
    for ids in documents:
        buffer.extend(ids)
        lengths.append(len(ids))
        if len(buffer) < max_length:
            continue
        # Cut every full block before trimming once: a 1M-token document costs O(n), not O(n²).
        full = len(buffer) - len(buffer) % max_length
        pending = len(lengths)
        for start in range(0, full, max_length):
            yield TokenSequence(buffer[start:start + max_length],
                                segments=_take(lengths, max_length))
        done(pending - len(lengths))  # documents wholly cut out; a rest left behind is not
        buffer = buffer[full:]
    if len(buffer) >= 2:
        yield TokenSequence(buffer, segments=list(lengths))
    done(len(lengths))


def document_end(tokenizer: Any, suffix: list[int]) -> list[int]:
    """The ids that end every document: the tokenizer's own `suffix` when it ends with EOS (or
    there is no EOS), else the suffix followed by EOS, so a student learns where documents
    end."""
    eos = tokenizer.eos_token_id
    return suffix if (suffix and suffix[-1] == eos) or eos is None else [*suffix, eos]


def check_max_length(max_length: int, prefix: list[int]) -> None:
    """Raise ConfigError unless sequences of `max_length` hold `prefix` and 2 more tokens."""
    if max_length < 2:
        raise ConfigError(f"--max-length {max_length}: a sequence needs at least 2 tokens "
                          f"(one input, one target); pass --max-length 2 or more")
    if len(prefix) + 2 > max_length:
        raise ConfigError(f"--max-length {max_length}: the tokenizer starts every sequence "
                          f"with {len(prefix)} special token(s), leaving room for fewer than 2 "
                          "tokens of text; raise --max-length")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: unknown; expected one of {', '.join(LAYOUTS)}")


def iter_sequences(documents: Iterable[str], tokenizer: Any, max_length: int, layout: str,
                   batch_size: int = 256, add_special_tokens: bool = True,
                   on_done: Callable[[int], None] | None = None) -> Iterator[TokenSequence]:
    """Yield sequences of 2..max_length tokens from plain-text `documents`, in a fixed order;
    every position is a target (`targets` None).

    `tokenizer` is a Hugging Face tokenizer (fast ones are batched through their Rust backend).
    `add_special_tokens`: start (and end) documents as the tokenizer's own encoding does.
    `on_done(n)`: n more documents have had every sequence of theirs yielded (for progress;
    called by the generator before it yields the next sequence).
    Raises ConfigError for a `max_length` below 2 (or too short for the tokenizer's prefix),
    an unknown layout, or `packed` without an EOS token.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: must be at least 1")
    return sequences_of_ids(iter_token_ids(documents, tokenizer, batch_size), tokenizer,
                            max_length, layout, add_special_tokens, on_done)


def sequences_of_ids(token_ids: Iterable[list[int]], tokenizer: Any, max_length: int,
                     layout: str, add_special_tokens: bool = True,
                     on_done: Callable[[int], None] | None = None) -> Iterator[TokenSequence]:
    """`iter_sequences` of documents already tokenized: `token_ids` are each document's ids
    without special tokens (`iter_token_ids`), in order. Same sequences, same errors."""
    check_max_length(max_length, [])
    check_layout(layout)
    if layout == "packed" and tokenizer.eos_token_id is None:
        raise ConfigError("--pack: the tokenizer has no EOS token to separate packed documents; "
                          "drop --pack to keep one document per sequence, or set an EOS token")
    prefix, suffix = special_affixes(tokenizer) if add_special_tokens else ([], [])
    check_max_length(max_length, prefix)
    end = document_end(tokenizer, suffix)
    return _generate(token_ids, max_length, layout, prefix, end, on_done or (lambda n: None))


def _generate(token_ids: Iterable[list[int]], max_length: int, layout: str, prefix: list[int],
              end: list[int], done: Callable[[int], None]) -> Iterator[TokenSequence]:
    if layout == "packed":
        yield from _packed((prefix + ids + end for ids in token_ids), max_length, done)
        return
    for ids in token_ids:
        yield from _chunks(ids + end, prefix, max_length)
        done(1)


def conversation_sequences(conversations: Iterable[TokenSequence], max_length: int,
                           layout: str, on_done: Callable[[int], None] | None = None
                           ) -> Iterator[TokenSequence]:
    """Sequences of whole conversations (each at most `max_length` tokens, with targets).

    `document`: each conversation is one sequence, as given. `packed`: conversations joined
    in order while they fit in `max_length` tokens, never split; `segments` records their
    lengths and each keeps its targets (its last position, which would predict the next
    conversation's first token, stays no target). `on_done(n)`: as in `iter_sequences`.
    Raises ConfigError for an unknown layout.
    """
    check_layout(layout)
    done = on_done or (lambda n: None)
    if layout == "document":
        return _one_each(conversations, done)
    return _pack_whole(conversations, max_length, done)


def _one_each(conversations: Iterable[TokenSequence], done: Callable[[int], None]
              ) -> Iterator[TokenSequence]:
    for conversation in conversations:
        done(1)
        yield conversation


def _pack_whole(conversations: Iterable[TokenSequence], max_length: int,
                done: Callable[[int], None]) -> Iterator[TokenSequence]:
    ids: list[int] = []
    targets: list[bool] = []
    lengths: list[int] = []
    for conversation in conversations:
        assert conversation.targets is not None and len(conversation.ids) <= max_length
        if len(ids) + len(conversation.ids) > max_length:
            done(len(lengths))
            yield TokenSequence(ids, targets, lengths)
            ids, targets, lengths = [], [], []
        ids += conversation.ids
        targets += conversation.targets
        lengths.append(len(conversation.ids))
    if ids:
        done(len(lengths))
        yield TokenSequence(ids, targets, lengths)
