"""A compact-encoded cache: verified, decoded transparently, and training/evaluating on it
gives nearly the KD of the plain cache it was made alongside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.cache import open_cache, summarize
from kdpipe.schemas.encoding import LOGPROB_STEP
from kdpipe.schemas.manifest import read_manifest
from kdpipe.schemas.shard_reader import build_index, columns_for
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.train import train

from .conftest import TAIL_TEMPERATURE, small_config


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path,
                  trainer_corpus: Path) -> Path:
    """The session's tiny_cache settings, compact-encoded."""
    out = tmp_path_factory.mktemp("compact-cache")
    cache_teacher(CacheTeacherConfig(
        teacher=str(tiny_teacher_dir), data=(str(trainer_corpus),), out=out, device="cpu",
        batch_size=16, top_k=8, max_length=64, shard_size=16,
        tail_temperatures=(TAIL_TEMPERATURE,), encoding="compact"))
    return out


def test_compact_cache_verifies_and_keeps_plain_fingerprints(compact_cache: Path,
                                                             tiny_cache: Path) -> None:
    cache = open_cache(compact_cache)
    assert cache.verify() == []
    assert summarize(cache)["encoding"] == "compact"
    plain = read_manifest(tiny_cache)
    # Caches made before --encoding / --cache-mode keep their fingerprint (and still resume).
    assert "encoding" not in plain.settings() and "cache_mode" not in plain.settings()
    assert cache.manifest.settings()["encoding"] == "compact"
    assert cache.manifest.settings_fingerprint != plain.settings_fingerprint
    assert cache.manifest.num_bytes < plain.num_bytes


def test_loader_decodes_to_the_plain_targets(compact_cache: Path, tiny_cache: Path) -> None:
    batches = []
    for root in (tiny_cache, compact_cache):
        cache = open_cache(root)
        index = build_index(cache)
        columns = columns_for(cache, teacher=True, temperature=TAIL_TEMPERATURE)
        with BatchLoader(index, np.sort(index.sample_ids), columns, batch_size=8) as loader:
            batches.append([m for step in loader for m in step.micro])
    for plain, compact in zip(*batches, strict=True):
        assert plain.teacher is not None and compact.teacher is not None
        np.testing.assert_array_equal(plain.labels, compact.labels)
        p_ids, c_ids = plain.teacher.topk_ids.numpy(), compact.teacher.topk_ids.numpy()
        p_lp, c_lp = plain.teacher.topk_logprobs.numpy(), compact.teacher.topk_logprobs.numpy()
        # Same sets of ids; each id's log-prob within half a step (+ float16 rounding).
        np.testing.assert_array_equal(np.sort(p_ids, 1), np.sort(c_ids, 1))
        order_p, order_c = np.argsort(p_ids, 1), np.argsort(c_ids, 1)
        diff = (np.take_along_axis(p_lp, order_p, 1) - np.take_along_axis(c_lp, order_c, 1))
        assert np.abs(diff).max() <= LOGPROB_STEP / 2 + 1e-2
        assert (np.diff(c_lp, axis=1) <= 0).all()
        np.testing.assert_array_equal(plain.teacher.tail_logmass, compact.teacher.tail_logmass)
        assert compact.teacher.tempered_tail_logmass is not None


def test_compact_cache_trains_and_evaluates_like_plain(tmp_path: Path, compact_cache: Path,
                                                       tiny_cache: Path,
                                                       tiny_student_dir: Path) -> None:
    results = {}
    for name, root in (("plain", tiny_cache), ("compact", compact_cache)):
        results[name] = evaluate(EvalConfig.from_options(
            student=str(tiny_student_dir), cache=str(root), batch_size=16, chunk_size=64,
            device="cpu", progress=False))
    assert results["compact"]["ce"] == results["plain"]["ce"]
    assert results["compact"]["kd"] == pytest.approx(results["plain"]["kd"], abs=2e-3)
    run = train(small_config(compact_cache, tmp_path / "run", student=str(tiny_student_dir),
                             max_steps=3))
    assert run["step"] == 3
