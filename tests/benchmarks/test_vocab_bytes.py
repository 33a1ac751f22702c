"""benchmarks/vocab_bytes.py: its synthetic teacher is a valid top-k + tail distribution, and a
small run measures what kdpipe's writer writes."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def vocab_bytes(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("vocab_bytes")


@pytest.mark.parametrize("teacher", ["confident", "flat"])
def test_the_synthetic_teacher_is_a_distribution(monkeypatch: pytest.MonkeyPatch,
                                                 teacher: str) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    synthetic = importlib.import_module("synthetic_teacher")
    vocab, k = 151_936, 16
    pos = synthetic.draw_positions(300, k, vocab, synthetic.TEACHERS[teacher],
                                   np.random.default_rng(0))
    assert pos.ids.shape == (300, k) and pos.ids.min() >= 0 and pos.ids.max() < vocab
    assert (pos.ids > 65535).any()  # stored as uint32
    assert all(np.unique(row).size == k for row in pos.ids)
    assert (np.diff(pos.logprobs, axis=1) <= 0).all()
    total = np.exp(pos.logprobs.astype(np.float64)).sum(1) + np.exp(pos.tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert (pos.entropy > 0).all() and (pos.target_logprob <= pos.logprobs[:, 0] + 1e-6).all()
    in_top = (pos.ids == pos.target_id[:, None]).any(1)
    # A target outside the top-k is no likelier than the k-th entry.
    assert (pos.target_logprob[~in_top] <= pos.logprobs[~in_top, -1] + 1e-6).all()


def test_a_small_run_measures_kdpipes_writer(vocab_bytes: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = vocab_bytes.main(["--out", str(out), "--vocabs", "151936", "--teachers", "flat",
                               "--zipfs", "1.0", "--k", "8", "--sequences", "4",
                               "--length", "32", "--levels", "6"])
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    (run,) = result["results"]
    plain, compact = run["encodings"]["plain"], run["encodings"]["compact"]
    assert compact["kdpipe_bytes_per_entry"] < plain["kdpipe_bytes_per_entry"]
    assert compact["distortion"]["max_kl"] <= (1 / 16) ** 2 / 8 + 1e-9
    for entry in (plain, compact):  # the writer's own options are the measured variant
        split = entry["variants"]["ids byte_stream_split, values byte_stream_split"]
        assert split["bytes_per_entry"] == entry["kdpipe_bytes_per_entry"]
    assert "sorted ids delta_binary_packed, values byte_stream_split" in compact["variants"]
