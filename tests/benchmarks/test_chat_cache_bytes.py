"""Smoke test of benchmarks/chat_cache_bytes.py on a few conversations and a random teacher."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_chat_cache_bytes_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    chat_cache_bytes = importlib.import_module("chat_cache_bytes")
    out = tmp_path / "bench"
    result = chat_cache_bytes.main(["--out", str(out), "--train-chars", "4000",
                                    "--vocab-size", "400", "--ks", "4", "--conversations", "12"])
    assert (out / "chat_cache_bytes.md").is_file() and (out / "chat_cache_bytes.json").is_file()
    rows = {r["train_on"]: r for r in result["rows"]}
    assistant, every = rows["assistant"], rows["all"]
    assert result["info"]["conversations"] == 12
    assert assistant["tokens"] == every["tokens"]  # the same conversations, the same packing
    assert 0 < assistant["targets"] < every["targets"] < every["tokens"]
    assert assistant["teacher_column_bytes"] < every["teacher_column_bytes"]
    assert assistant["columns"]["target_mask"] > 0
