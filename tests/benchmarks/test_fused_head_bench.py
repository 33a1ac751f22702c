"""Smoke tests of benchmarks/fused_head.py and benchmarks/random_teacher_cache.py at tiny sizes."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_fused_head_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    fused_head = importlib.import_module("fused_head")
    fused_head.main(["--tokens", "40", "--hidden", "8", "--vocab", "96", "--top-k", "4",
                     "--chunk-size", "16", "--repeats", "1", "--device", "cpu",
                     "--teachers", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "fused_head.json").read_text())["results"]
    assert set(results) == {"ce", "forward τ=1", "forward τ=2", "sampled",
                            "forward τ=1, 2 teachers", "forward τ=2, 2 teachers",
                            "sampled, 2 teachers"}
    for row in results.values():
        assert row["fused"]["tokens_per_s"] > 0 and row["checkpointed"]["peak_extra_mib"] > 0
    assert (tmp_path / "fused_head.md").is_file()


def test_random_teacher_cache_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    random_teacher_cache = importlib.import_module("random_teacher_cache")
    args = ["--out", str(tmp_path), "--vocab", "300", "--chars", "6000",
            "--tokenizer-chars", "20000", "--max-length", "32", "--top-k", "4",
            "--device", "cpu"]
    random_teacher_cache.main(args)
    assert "vocab_size 300" in capsys.readouterr().out
    random_teacher_cache.main(args)  # every stage found done
