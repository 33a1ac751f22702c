"""Typer command of the teacher stage, `cache-teacher`, generated from `CacheTeacherConfig`.
Registered by `kdpipe/cli.py`."""

from __future__ import annotations

import typer

from kdpipe import options
from kdpipe.pipeline.cache_config import CacheTeacherConfig


def _cache_teacher(cfg: CacheTeacherConfig) -> None:
    from kdpipe.pipeline.cache_stage import cache_teacher
    from kdpipe.pipeline.workers import is_part
    from kdpipe.torch_runtime import set_threads

    set_threads(cfg.threads, processes=cfg.num_workers)  # workers often share one machine
    manifest = cache_teacher(cfg)
    if is_part(manifest):
        typer.echo(f"worker {cfg.worker_index} of {cfg.num_workers} done: "
                   f"{len(manifest.shards)} shards in {cfg.out}; the last worker to finish "
                   f"merges the manifest (or run `kdpipe cache-teacher --merge --out {cfg.out}`)")
        return
    typer.echo(f"cache ready: {cfg.out} ({manifest.num_sequences} sequences, "
               f"{manifest.num_tokens} tokens, {len(manifest.shards)} shards)")


cache_teacher = options.command(
    CacheTeacherConfig, _cache_teacher,
    "Run the teacher over a corpus once; write top-k log-probs, tail mass and confidence.")
