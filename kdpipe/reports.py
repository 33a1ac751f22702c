"""`kdpipe inspect` and `kdpipe verify`: read-only reports on the files the stages write.

Not a stage: they read caches (`schemas.cache`) and curricula (`curriculum.cli`), write
nothing, and are registered by `kdpipe/cli.py` beside the stages' commands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from kdpipe.schemas.errors import ConfigError, KdpipeError


def inspect(
    paths: Annotated[list[Path], typer.Argument(
        help="A cache folder, or one curriculum file (two: also their rank correlation).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarise a cache (teacher, tokenizer, k, sequences, bytes/token, teacher NLL) or a
    curriculum (source, metric, score quantiles; with two, Spearman's rank correlation)."""
    from kdpipe.schemas.cache import open_cache, summarize
    from kdpipe.schemas.curriculum import is_curriculum_file

    if any(is_curriculum_file(p) for p in paths):
        from kdpipe.curriculum.cli import inspect_curricula

        for line in inspect_curricula(paths, as_json):
            typer.echo(line)
        return
    if len(paths) != 1:
        raise ConfigError("kdpipe inspect takes one cache folder (or one or two curriculum "
                          "files)")
    summary = summarize(open_cache(paths[0], require_complete=False))
    if as_json:  # strict JSON: a NaN statistic of a faulty cache prints as null
        typer.echo(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                               for k, v in summary.items()}, allow_nan=False))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        typer.echo(f"{key:<{width}}  {shown}")


def verify(path: Annotated[Path, typer.Argument(help="A cache folder.")]) -> None:
    """Re-check a cache's schema, every shard's checksum and values (no NaN or infinity) and
    its saved tokenizer; exit 1 on any fault."""
    from kdpipe.schemas.cache import open_cache

    cache = open_cache(path, require_complete=False, check_shards=False)
    problems = cache.verify()
    if cache.tokenizer_dir is not None:
        from kdpipe.tokenizer_identity import cache_tokenizer

        try:
            cache_tokenizer(cache)
        except KdpipeError as exc:
            problems.append(str(exc))
    for problem in problems:
        typer.echo(f"FAULT {problem}", err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"ok: {len(cache.manifest.shards)} shards, {cache.manifest.num_sequences} "
               "sequences verified")
