"""Smoke test of benchmarks/cache_quality.py: every arm trains a few steps and is evaluated.

The benchmark scripts are not a package (they run as `python benchmarks/NAME.py`, importing
each other by module name), so the test puts their folder on sys.path the same way.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_cache_quality_smoke(tiny_teacher_dir: Path, jsonl_corpus: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    cache_quality = importlib.import_module("cache_quality")
    out = tmp_path / "bench"
    result = cache_quality.main([
        "--teacher", str(tiny_teacher_dir), "--data", str(jsonl_corpus), "--out", str(out),
        "--seeds", "0", "--steps", "3", "--batch-size", "4", "--eval-batch-size", "8",
        "--hidden", "32", "--layers", "1", "--top-k", "8", "--max-length", "64",
        "--samples", "16", "--eval-fraction", "0.2", "--eval-max-samples", "16",
        "--chunk-size", "64", "--warmup-steps", "1", "--log-every", "1", "--device", "cpu"])

    assert (out / "cache_quality.md").is_file()
    saved = json.loads((out / "cache_quality.json").read_text(encoding="utf-8"))
    assert saved["summary"] == result["summary"]
    summary = result["summary"]
    assert set(summary) == set(cache_quality.ARMS)
    for arm, row in summary.items():
        assert math.isfinite(row["ppl"]["mean"]) and row["ppl"]["mean"] > 1, arm
        assert math.isfinite(row["ratio"]["mean"]) and row["ratio"]["mean"] > 0, arm
    assert summary["online"]["ratio"]["mean"] == 1.0
    assert isinstance(summary["topk"]["goal_met"], bool)
    assert isinstance(summary["sampled"]["goal_met"], bool)
    # Same seed: every arm starts from the same student and sees the same batches, so the
    # first step's CE (before any update) is identical in every arm.
    first_ce = {run["arm"]: run["curve"][0]["ce"] for run in result["runs"]}
    assert max(first_ce.values()) - min(first_ce.values()) < 1e-4, first_ce
    assert result["caches"]["sampled"]["path"].endswith("cache-sampled-16")
