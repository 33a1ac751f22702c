"""Typer command `build-curriculum`, and what `kdpipe inspect` shows for curriculum files.

Registered by `kdpipe/cli.py`; the command only builds a `BuildCurriculumConfig` and calls
`build_curriculum`. `inspect_curricula` summarises one curriculum, or two and the Spearman
rank correlation of their scores over the samples both rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer

from kdpipe import options
from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.extras import require
from kdpipe.schemas.curriculum import Curriculum, read_curriculum
from kdpipe.schemas.errors import ConfigError


def _build_curriculum(cfg: BuildCurriculumConfig) -> None:
    from kdpipe.curriculum.build import build_curriculum as run_build
    from kdpipe.torch_runtime import set_threads

    set_threads(cfg.threads)
    info = run_build(cfg).info
    typer.echo(f"curriculum ready: {cfg.out} ({info.num_samples} samples by {info.source}/"
               f"{info.metric}, {info.num_buckets} buckets)")


build_curriculum = options.command(
    BuildCurriculumConfig, _build_curriculum,
    "Rank a cache's samples easy → hard by a difficulty score; write a curriculum index.")


def curriculum_summary(path: str | Path, curriculum: Curriculum | None = None
                       ) -> dict[str, Any]:
    """What `kdpipe inspect FILE` prints for a curriculum."""
    c = curriculum or read_curriculum(path)
    info, ordered = c.info, c.ordered_ids()
    q = np.quantile(c.score, [0.0, 0.25, 0.5, 0.75, 1.0]) if c.score.size else [np.nan] * 5
    summary: dict[str, Any] = {
        "curriculum": str(path), "source": info.source, "metric": info.metric,
        "samples": info.num_samples, "buckets": info.num_buckets,
        "cache_fingerprint": info.cache_fingerprint[:16],
        "score_min": float(q[0]), "score_q25": float(q[1]), "score_median": float(q[2]),
        "score_q75": float(q[3]), "score_max": float(q[4]),
        "easiest": ",".join(str(i) for i in ordered[:5].tolist()),
        "hardest": ",".join(str(i) for i in ordered[::-1][:5].tolist()),
    }
    if c.mean_confidence is not None and c.variability is not None:
        summary["mean_confidence"] = float(c.mean_confidence.mean())
        summary["mean_variability"] = float(c.variability.mean())
    summary.update({f"setting_{k}": v for k, v in sorted(info.settings.items())
                    if k not in ("source", "metric", "buckets")})
    return summary


def rank_correlation(a: Curriculum, b: Curriculum) -> dict[str, Any]:
    """Spearman's ρ between two curricula's scores over the samples both rank (ties get their
    average rank; scipy.stats.spearmanr). NaN with fewer than two common samples or a
    constant score."""
    common, ia, ib = np.intersect1d(a.sample_ids, b.sample_ids, return_indices=True)
    result: dict[str, Any] = {"common_samples": int(common.size),
                              "same_cache": a.info.cache_fingerprint == b.info.cache_fingerprint}
    constant = common.size < 2 or np.ptp(a.score[ia]) == 0 or np.ptp(b.score[ib]) == 0
    if constant:
        result["spearman"] = float("nan")
        return result
    stats = require("scipy.stats", "experiments", "rank correlations")
    result["spearman"] = float(stats.spearmanr(a.score[ia], b.score[ib]).statistic)
    return result


def inspect_curricula(paths: Sequence[str | Path], as_json: bool = False) -> list[str]:
    """Lines for `kdpipe inspect`: one curriculum's summary, or two and their ρ."""
    if not 1 <= len(paths) <= 2:
        raise ConfigError(f"kdpipe inspect takes one curriculum, or two to compare; got "
                          f"{len(paths)} paths")
    curricula = [read_curriculum(p) for p in paths]
    summaries = [curriculum_summary(p, c) for p, c in zip(paths, curricula, strict=True)]
    comparison = rank_correlation(*curricula) if len(curricula) == 2 else None
    if as_json:
        record: dict[str, Any] = summaries[0] if comparison is None else \
            {"curricula": summaries, **comparison}
        return [json.dumps(record, allow_nan=False)]
    lines: list[str] = []
    for summary in summaries:
        width = max(len(k) for k in summary)
        if lines:
            lines.append("")
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            lines.append(f"{key:<{width}}  {shown}")
    if comparison is not None:
        lines.append("")
        lines.append(f"spearman_rho    {comparison['spearman']:.4f}")
        lines.append(f"common_samples  {comparison['common_samples']}")
        lines.append(f"same_cache      {comparison['same_cache']}")
    return lines

