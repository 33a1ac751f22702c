"""When a tokenizer may stand for a cache's: the same id ↔ token mapping, not the same file.

A student never tokenizes text: it trains on the token ids stored in the cache. So a student's
tokenizer is compatible with a cache when every *real* id (0 .. vocab_size - 1, the ids the
tokenizer can produce) maps to the same token string and the same ids are special tokens.
How text is split into tokens (normaliser, pre-tokenizer, a `continuing_subword_prefix` of ""
or null) does not change a single cached id, so such differences are reported as a warning,
never refused. The same tokenizer.json loaded through another model class is the common case:
transformers rebuilds a Qwen2 tokenizer with an NFC normaliser and its own pre-tokenizer.

Duck-typed over the `transformers` tokenizer interface, so this module needs no transformers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Parts of a tokenizer.json that change how text is split or decoded, not which string an id
# stands for (`model` also holds the vocabulary; only its other settings are compared).
_PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
_MAPPING_KEYS = ("vocab", "merges")


def real_vocab_size(tokenizer: Any) -> int:
    """Ids a tokenizer can produce: 1 + its largest id, added tokens included.

    This is the support of every cached distribution; rows of a model's output head beyond it
    are padding (Qwen2.5: 151,665 real ids, 151,936 or 152,064 head rows).
    """
    largest = max(tokenizer.get_vocab().values(), default=-1)
    return max(len(tokenizer), int(largest) + 1)


def id_tokens(tokenizer: Any, vocab_size: int) -> list[str | None]:
    """The token string of every id 0 .. vocab_size - 1 (None where an id has none)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return [None if t is None else str(t) for t in tokens]


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of special tokens: the named ones (BOS, EOS, PAD, ...) and added tokens marked
    special (chat markers). Text containing them is never split, and decoding can skip them."""
    found = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found |= {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
    return sorted(found)


def vocab_fingerprint(tokenizer: Any, vocab_size: int) -> str:
    """sha256 of the id ↔ token mapping over `vocab_size` ids and of the special ids."""
    body = {"tokens": id_tokens(tokenizer, vocab_size), "special_ids": special_ids(tokenizer)}
    canonical = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class VocabComparison:
    """How a candidate tokenizer relates to a reference one over the reference's real ids."""

    mismatch: str | None  # the first difference that changes ids' meaning, or None
    cosmetic: tuple[str, ...]  # pipeline parts that differ without changing the mapping
    roles: tuple[str, ...]  # BOS/EOS/PAD ids that differ (e.g. an instruct teacher's EOS)


def _show(token: str | None) -> str:
    return "no token" if token is None else repr(token)


def compare_vocab(reference: Any, candidate: Any, vocab_size: int,
                  names: tuple[str, str] = ("the reference", "this one")) -> VocabComparison:
    """Compare `candidate` with `reference` over ids 0 .. vocab_size - 1.

    `mismatch` names the first id whose token differs, with both strings, or the special ids
    only one side has; `names` are how messages call the two tokenizers. A candidate with
    *more* ids than the reference is compatible: ids past `vocab_size` never occur.
    """
    ours_name, theirs_name = names
    mismatch = None
    if real_vocab_size(candidate) < vocab_size:
        mismatch = (f"{theirs_name} has {real_vocab_size(candidate)} ids, {ours_name} "
                    f"{vocab_size}")
    else:
        ours, theirs = id_tokens(reference, vocab_size), id_tokens(candidate, vocab_size)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b),
                     None)
        if first is not None:
            mismatch = (f"id {first} is {_show(ours[first])} in {ours_name} but "
                        f"{_show(theirs[first])} in {theirs_name}")
    if mismatch is None:
        ref_special = {i for i in special_ids(reference) if i < vocab_size}
        cand_special = {i for i in special_ids(candidate) if i < vocab_size}
        if ref_special != cand_special:
            only_ref, only_cand = sorted(ref_special - cand_special), sorted(cand_special
                                                                             - ref_special)
            mismatch = (f"the special ids differ (only in {ours_name}: {only_ref or 'none'}; "
                        f"only in {theirs_name}: {only_cand or 'none'})")
    roles = tuple(f"{role} {getattr(reference, f'{role}_token_id', None)} -> "
                  f"{getattr(candidate, f'{role}_token_id', None)}"
                  for role in ("bos", "eos", "pad")
                  if getattr(reference, f"{role}_token_id", None)
                  != getattr(candidate, f"{role}_token_id", None))
    return VocabComparison(mismatch, _pipeline_differences(reference, candidate), roles)


def _pipeline_differences(reference: Any, candidate: Any) -> tuple[str, ...]:
    """Names of the tokenizer.json parts that differ (fast tokenizers only)."""
    specs = []
    for tokenizer in (reference, candidate):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return ()
        specs.append(json.loads(backend.to_str()))
    ours, theirs = specs
    differ = [part for part in _PIPELINE_PARTS if ours.get(part) != theirs.get(part)]
    model_settings = [{k: v for k, v in (spec.get("model") or {}).items()
                       if k not in _MAPPING_KEYS} for spec in specs]
    if model_settings[0] != model_settings[1]:
        differ.append("model settings")
    return tuple(differ)
