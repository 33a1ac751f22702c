"""Smoke test of benchmarks/cache_workers.py: two workers, before and after, on a tiny corpus.

The benchmark scripts are not a package (they run as `python benchmarks/NAME.py`), so the test
puts their folder on sys.path the same way.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_cache_workers_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    cache_workers = importlib.import_module("cache_workers")
    out = tmp_path / "bench"
    result = cache_workers.main(["--workers", "2", "--train-chars", "40000", "--vocab-size",
                                 "300", "--max-length", "64", "--out", str(out)])
    assert (out / "cache_workers.md").is_file()
    reference = result["reference"]
    for mode, copies in (("before", 2), ("after", 1)):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        assert len(rows) == 2 and all(r["digest"] == reference["digest"] for r in rows)
        assert sum(r["documents"] for r in rows) == copies * reference["documents_read"]
