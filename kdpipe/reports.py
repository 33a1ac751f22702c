"""`kdpipe inspect` and `kdpipe verify`: read-only reports on the files the stages write.

Not a stage: they read caches (`schemas.cache`) and curricula (`curriculum.cli`), write
nothing, and are registered by `kdpipe/cli.py` beside the stages' commands.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated

import typer

from kdpipe.schemas.errors import ConfigError, KdpipeError

if TYPE_CHECKING:  # pyarrow and numpy load only when a command needs them
    from kdpipe.schemas.cache import Cache


def inspect(
    paths: Annotated[list[str], typer.Argument(
        help="A cache folder or URL, or one curriculum file (two: also their rank "
        "correlation).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarise a cache (teacher, tokenizer, k, sequences, bytes/token, teacher NLL) or a
    curriculum (source, metric, score quantiles; with two, Spearman's rank correlation).

    Shard checksums are not checked here (that reads every byte): `kdpipe verify` does."""
    from kdpipe.schemas.cache import open_cache, summarize
    from kdpipe.schemas.curriculum import is_curriculum_file

    if any(is_curriculum_file(p, "kdpipe inspect") for p in paths):
        from kdpipe.curriculum.cli import inspect_curricula

        for line in inspect_curricula(paths, as_json):
            typer.echo(line)
        return
    if len(paths) != 1:
        raise ConfigError("kdpipe inspect takes one cache folder (or one or two curriculum "
                          "files)")
    summary = summarize(open_cache(paths[0], require_complete=False, verify_reads=False,
                                   flag="kdpipe inspect"))
    if as_json:  # strict JSON: a NaN statistic of a faulty cache prints as null
        typer.echo(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                               for k, v in summary.items()}, allow_nan=False))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else "-" if value is None else value
        typer.echo(f"{key:<{width}}  {shown}")


def verify(
    path: Annotated[str, typer.Argument(help="A cache folder or URL.")],
    local_cache: Annotated[str | None, typer.Option(
        help="Where to download a cache given as a URL before checking it (default: a "
        "temporary folder, removed afterwards).")] = None,
) -> None:
    """Re-check a cache: every shard's checksum, schema and values (no NaN or infinity),
    every manifest field against the shards, and the saved tokenizer; exit 1 on any fault.
    A cache at a URL is downloaded whole first (every byte is read anyway)."""
    from kdpipe.schemas.cache import open_cache

    cache = open_cache(path, require_complete=False, check_shards=False,
                       local_cache=local_cache, flag="kdpipe verify")
    problems = cache.verify() + tokenizer_problems(cache)
    for problem in problems:
        typer.echo(f"FAULT {problem}", err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"ok: {len(cache.manifest.shards)} shards, {cache.manifest.num_sequences} "
               "sequences verified")


def tokenizer_problems(cache: Cache) -> list[str]:
    """The cache's saved `tokenizer/` against the manifest: present (every cache of schema
    version 2 has one), loadable, the same id mapping (`vocab_fingerprint`), size and BOS, EOS
    and PAD ids. Caches of schema version 1 saved none."""
    from kdpipe.schemas.manifest import TOKENIZER_DIR
    from kdpipe.schemas.vocab import real_vocab_size, vocab_fingerprint
    from kdpipe.tokenizer_identity import load_tokenizer

    m = cache.manifest
    if cache.tokenizer_dir is None:
        if not m.tokenizer.vocab_fingerprint:
            return []
        return [f"{cache.root / TOKENIZER_DIR}: missing; the tokenizer the token ids come from "
                "(tokenizer.vocab_fingerprint) cannot be checked: restore the folder or "
                "re-create the cache"]
    try:
        tokenizer = load_tokenizer(cache.tokenizer_dir, False, "cache tokenizer")
    except KdpipeError as exc:
        return [str(exc)]
    if m.tokenizer.vocab_fingerprint and \
            vocab_fingerprint(tokenizer, m.vocab_size) != m.tokenizer.vocab_fingerprint:
        return [f"{cache.tokenizer_dir}: does not map ids as the manifest records "
                "(tokenizer.vocab_fingerprint); restore it or re-create the cache"]
    found = []
    if m.tokenizer.vocab_fingerprint and real_vocab_size(tokenizer) != m.vocab_size:
        found.append(f"vocab_size {m.vocab_size}: the saved tokenizer has "
                     f"{real_vocab_size(tokenizer)} ids")
    if len(tokenizer) != m.tokenizer.size:
        found.append(f"tokenizer.size {m.tokenizer.size}: the saved tokenizer has "
                     f"{len(tokenizer)} tokens")
    for role in ("bos", "eos", "pad"):
        recorded, saved = (getattr(m.tokenizer, f"{role}_token_id"),
                           getattr(tokenizer, f"{role}_token_id"))
        if recorded != saved:
            found.append(f"tokenizer.{role}_token_id {recorded}: the saved tokenizer's is "
                         f"{saved}")
    return found
