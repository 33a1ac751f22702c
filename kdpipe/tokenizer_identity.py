"""Load tokenizers and decide whether one may stand for a cache's (both stages use this).

The rule is `schemas.vocab`'s: the same token string for every real id and the same special
ids. A cache keeps the tokenizer it was made with (`CACHE/tokenizer/`, schema 2), so a
mismatch can be named id by id, and a student run needs nothing but the cache.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from kdpipe.hf_errors import refusal_reason, refusals
from kdpipe.schemas.cache import Cache
from kdpipe.schemas.cache_verify import describe_files
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.fingerprint import tokenizer_fingerprint
from kdpipe.schemas.manifest import TOKENIZER_DIR, FileInfo, TokenizerInfo
from kdpipe.schemas.vocab import compare_vocab, real_vocab_size, vocab_fingerprint

log = logging.getLogger(__name__)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool, flag: str) -> Any:
    """AutoTokenizer by path or hub name; `flag` names the option in error messages."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except refusals() as exc:  # KeyError: JSON of another shape; a config it refuses
        raise ConfigError(f"{flag} {name_or_path}: cannot load a tokenizer "
                          f"({refusal_reason(exc)})") from exc


def save_tokenizer(tokenizer: Any, cache_dir: Path) -> tuple[FileInfo, ...]:
    """Save `tokenizer` as CACHE/tokenizer/, replacing a copy of another tokenizer; returns
    what the manifest records of its files (`tokenizer.files`: name, size, sha256).

    Atomic: a temporary folder is renamed into place, so a crash leaves the old folder or the
    new one, and workers of one cache (which all save the same tokenizer) may race. The
    folder gets the permissions of any other (the umask's), so that other users of a shared
    cache can read it.
    """
    final = cache_dir / TOKENIZER_DIR
    wanted = tokenizer_fingerprint(tokenizer)
    if final.is_dir():
        with contextlib.suppress(ConfigError):
            if tokenizer_fingerprint(load_tokenizer(final, False, "cache tokenizer")) == wanted:
                with contextlib.suppress(OSError):  # kdpipe before schema 4 made it 0700
                    final.chmod(cache_dir.stat().st_mode & 0o777)
                return describe_files(final)
    # Unique names: workers on several machines may share the folder (and a process id).
    tmp = cache_dir / f".{TOKENIZER_DIR}.tmp-{uuid.uuid4().hex}"
    trash = cache_dir / f".{TOKENIZER_DIR}.old.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        tokenizer.save_pretrained(tmp)
        if final.is_dir():
            final.rename(trash)
        tmp.rename(final)
    except OSError:
        if not final.is_dir():  # not another worker's rename winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
    return describe_files(final)


def describe(name_or_path: str, tokenizer: Any, vocab_size: int) -> TokenizerInfo:
    """What the manifest records of `tokenizer`, its mapping taken over `vocab_size` ids."""
    return TokenizerInfo(
        name_or_path=name_or_path, fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_fingerprint=vocab_fingerprint(tokenizer, vocab_size), size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def cache_tokenizer(cache: Cache, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer `cache` was made with, or None when it can no longer be found.

    Schema 2 caches keep it in CACHE/tokenizer/ (its files checked against the manifest from
    schema 4 on, `Cache.checked_tokenizer_dir`, and its mapping against the manifest's
    fingerprint); for older caches, the tokenizer the manifest names, if it still loads with
    the recorded fingerprint.
    """
    recorded = cache.manifest.tokenizer
    folder = cache.checked_tokenizer_dir()
    if folder is not None:
        tokenizer = load_tokenizer(folder, trust_remote_code, "cache tokenizer")
        found = vocab_fingerprint(tokenizer, cache.manifest.vocab_size)
        if recorded.vocab_fingerprint and found != recorded.vocab_fingerprint:
            raise CacheFormatError(f"{folder}: does not map ids as the manifest records "
                                   "(modified?); re-create the cache")
        return tokenizer
    try:
        tokenizer = load_tokenizer(recorded.name_or_path, trust_remote_code, "cache tokenizer")
    except ConfigError:
        return None
    return tokenizer if tokenizer_fingerprint(tokenizer) == recorded.fingerprint else None


def check_compatible(candidate: Any, cache: Cache, what: str,
                     trust_remote_code: bool = False) -> None:
    """Refuse `candidate` unless it maps the cache's ids as the cache's tokenizer does.

    `what` names the candidate in messages ("the student's tokenizer (runs/s1)"). A mapping
    that agrees but a tokenizer.json that does not (normaliser, pre-tokenizer, BOS/EOS roles)
    costs one warning line: the cached ids mean the same tokens either way.
    """
    recorded = cache.manifest.tokenizer
    same_mapping = (bool(recorded.vocab_fingerprint) and recorded.vocab_fingerprint
                    == vocab_fingerprint(candidate, cache.manifest.vocab_size))
    if same_mapping and tokenizer_fingerprint(candidate) == recorded.fingerprint:
        return
    reference = cache_tokenizer(cache, trust_remote_code)
    if reference is None:  # a schema 1 cache whose tokenizer is gone: whole-file identity only
        if tokenizer_fingerprint(candidate) == recorded.fingerprint:
            return
        raise ConfigError(
            f"tokenizer mismatch: {what} is not the tokenizer cache {cache.location} was made with "
            f"({recorded.name_or_path}, which cannot be loaded to compare id by id); pass "
            "--tokenizer with the teacher's tokenizer, or re-cache")
    comparison = compare_vocab(reference, candidate, real_vocab_size(reference),
                               ("the cache's tokenizer", what))
    if comparison.mismatch is not None:
        raise ConfigError(
            f"tokenizer mismatch: {what} does not map ids as cache {cache.location}'s tokenizer "
            f"({recorded.name_or_path}) does ({comparison.mismatch}); a student must share the "
            "teacher's id-to-token mapping (pass --tokenizer, or re-cache with the student's "
            "tokenizer)")
    differences = [*comparison.cosmetic, *comparison.roles]
    if differences:
        log.warning("%s differs from cache %s's tokenizer in %s; it maps every id to the same "
                    "token, so training on the cache is unaffected", what, cache.location,
                    ", ".join(differences))
