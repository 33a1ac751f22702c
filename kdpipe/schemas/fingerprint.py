"""Content fingerprints that tie a cache to the tokenizer, teacher and corpus that made it.

A student may only train on a cache whose tokenizer fingerprint equals its own: the same vocab
size is not enough (two BPE vocabularies of 32k ids assign different strings to the same id).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of each large file

# Fields of a tokenizer.json that configure batching, not the mapping from text to ids.
_RUNTIME_FIELDS = ("truncation", "padding")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over vocabulary, merges, normalisation and special tokens of a HF tokenizer.

    Accepts any object with the `transformers` tokenizer interface (duck-typed, so this module
    need not import transformers). Fast tokenizers hash their whole `tokenizer.json` minus the
    runtime padding/truncation settings; slow ones hash their vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for field in _RUNTIME_FIELDS:
            spec.pop(field, None)
        body: Any = spec
    else:
        body = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = {
        "special_tokens": sorted(str(t) for t in tokenizer.all_special_tokens),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(_canonical({"tokenizer": body, "specials": specials})).hexdigest()


def _sampled_file_hash(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= 3 * _SAMPLE:
            digest.update(f.read())
            return
        for offset in (0, size // 2, size - _SAMPLE):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))


def files_fingerprint(paths: Iterable[str | Path], root: str | Path | None = None) -> str:
    """sha256 over each file's name relative to `root`, size and start/middle/end bytes.

    Sampling keeps a 1 TB corpus or a 140 GB checkpoint quick to fingerprint on every re-run;
    the cache additionally records a hash of every shard's token ids, so a corpus edit that
    slipped past the sample is still caught when a shard is resumed.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = os.path.relpath(path, root) if root is not None else path.name
        digest.update(name.encode())
        _sampled_file_hash(path, digest)
    return digest.hexdigest()


def json_fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()
