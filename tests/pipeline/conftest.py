"""Helpers for the teacher-stage tests: a small corpus and a quick cache-teacher config."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from kdpipe.pipeline.cache_stage import CacheTeacherConfig

from ..conftest import run_cli

__all__ = ["run_cli", "small_config"]

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def small_config(teacher: Path, data: Path, out: Path, **overrides: object) -> CacheTeacherConfig:
    settings: dict[str, object] = dict(teacher=str(teacher), data=(str(data),), out=out,
                                       top_k=8, max_length=48, shard_size=5, batch_size=4)
    settings.update(overrides)
    return CacheTeacherConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture()
def small_corpus(tmp_path: Path) -> Path:
    """Six short stdlib excerpts as JSON lines: a few thousand tokens, several shards."""
    path = tmp_path / "small.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for name in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "glob.py", "abc.py"):
            text = (STDLIB / name).read_text(encoding="utf-8")
            f.write(json.dumps({"text": text[:700]}) + "\n")
    return path
