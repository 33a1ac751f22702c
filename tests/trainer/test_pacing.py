"""Pacing functions against their formulas, and the curriculum sampler's pools and controls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kdpipe.options import field_problems
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.curriculum_config import CurriculumConfig
from kdpipe.trainer.curriculum_sampler import CurriculumSampler, Ranking
from kdpipe.trainer.pacing import PACINGS, Pacing

T = 100  # total steps in the formula checks


@pytest.mark.parametrize(("t", "expected"), [(0, 0.2), (20, 0.2 + 0.8 * 20 / 80),
                                             (40, 0.6), (80, 1.0), (99, 1.0)])
def test_linear(t: int, expected: float) -> None:
    assert Pacing("linear", start=0.2, full=0.8).share(t, T) == pytest.approx(expected)


@pytest.mark.parametrize("t", [0, 1, 10, 33, 79, 80, 99])
def test_root(t: int) -> None:
    b, a = 0.1, 0.8
    expected = min(1.0, math.sqrt(t * (1 - b * b) / (a * T) + b * b))
    assert Pacing("root", start=b, full=a).share(t, T) == pytest.approx(expected)
    assert Pacing("root", start=b, full=a).share(80, T) == pytest.approx(1.0)


@pytest.mark.parametrize(("t", "expected"), [(0, 0.1), (9, 0.1), (10, 0.15), (19, 0.15),
                                             (20, 0.225), (50, 0.1 * 1.5**5), (70, 1.0)])
def test_exp(t: int, expected: float) -> None:
    pacing = Pacing("exp", start=0.1, increase=1.5, step_length=10)
    assert pacing.share(t, T) == pytest.approx(expected)


def test_step_and_baby_steps() -> None:
    step = Pacing("step", start=0.3, step_length=25)
    assert [step.share(t, T) for t in (0, 24, 25, 99)] == [0.3, 0.3, 1.0, 1.0]
    baby = Pacing("baby-steps", buckets=4, step_length=10)
    assert [baby.buckets_available(t, T) for t in (0, 9, 10, 25, 30, 99)] == [1, 1, 2, 3, 4, 4]
    assert [baby.share(t, T) for t in (0, 10, 30)] == [0.25, 0.5, 1.0]
    # Pool = exactly the samples of buckets 0..k-1, bucket floor(r * B / n), for n = 10.
    buckets = np.arange(10) * 4 // 10
    for t in (0, 10, 20, 30):
        k = baby.buckets_available(t, T)
        assert baby.pool_size(t, T, 10) == int((buckets < k).sum())
    assert Pacing("none").share(0, T) == 1.0


def test_default_step_lengths_reach_all_data_at_a_t() -> None:
    a = 0.5
    exp = Pacing("exp", start=0.2, full=a, increase=2.0)  # 3 doublings: 0.2 → 1.6
    assert exp.step_len(T) == math.ceil(a * T / 3)
    assert exp.share(int(a * T) - 1, T) < 1.0 and exp.share(int(a * T) + 1, T) == 1.0
    assert Pacing("step", full=a).step_len(T) == 50
    baby = Pacing("baby-steps", full=a, buckets=5)
    assert baby.step_len(T) == math.ceil(50 / 4) and baby.share(52, T) == 1.0


def test_pool_size_clamps_and_problems() -> None:
    pacing = Pacing("linear", start=0.01, full=0.5)
    assert pacing.pool_size(0, T, 1000, min_size=32) == 32  # never less than one batch
    assert pacing.pool_size(0, T, 1000) == 10
    assert pacing.pool_size(99, T, 1000) == 1000
    bad = CurriculumConfig(pacing="cubic", pacing_start=0.0, pacing_full=1.5,
                           pacing_increase=1.0, pacing_step_length=0, pacing_buckets=0)
    message = "; ".join(field_problems(bad))
    for flag in ("--pacing ", "--pacing-start", "--pacing-full", "--pacing-increase",
                 "--pacing-step-length", "--pacing-buckets"):
        assert flag in message, flag


# --- the sampler ------------------------------------------------------------------------

IDS = np.arange(1000, 1050, dtype=np.int64)  # 50 training samples
SCORES = np.random.default_rng(3).random(IDS.size)
ORDERED = IDS[np.argsort(SCORES)]  # easy → hard


def sampler(pacing: str, order: str = "curriculum", seed: int = 0, per_step: int = 4,
            total_steps: int = 39, **kwargs: object) -> CurriculumSampler:
    return CurriculumSampler(IDS, Pacing(pacing, **kwargs),  # type: ignore[arg-type]
                             per_step, total_steps, seed, Ranking.from_scores(IDS, SCORES),
                             order)


@pytest.mark.parametrize("pacing", [p for p in PACINGS if p != "none"])
@pytest.mark.parametrize("order", ["curriculum", "anti", "random"])
def test_sampler_never_draws_outside_the_pool(pacing: str, order: str) -> None:
    s = sampler(pacing, order, start=0.1, full=0.6, step_length=4)
    assert s.batches_per_epoch == 13  # 50 samples in batches of 4 (the last one of 2)
    for epoch in range(3):
        epoch_order = s.epoch_order(epoch)
        assert epoch_order.size == s.epoch_size(epoch) == 50
        presented = s.presentation(epoch)
        for j in range(s.batches_per_epoch):
            batch = epoch_order[j * 4:(j + 1) * 4]
            pool = presented[:s.pool_size(epoch, j)]
            assert set(batch.tolist()) <= set(pool.tolist()), (epoch, j)
            assert np.unique(batch).size == batch.size  # no repeats within a batch
    first_pool = s.pool_size(0, 0)
    assert first_pool == math.ceil(0.1 * 50) or first_pool == 4
    assert np.array_equal(s.epoch_order(1), sampler(pacing, order, start=0.1, full=0.6,
                                                    step_length=4).epoch_order(1))


def test_none_presents_sorted_order_and_anti_reverses_it() -> None:
    assert np.array_equal(sampler("none").epoch_order(0), ORDERED)
    assert np.array_equal(sampler("none").epoch_order(3), ORDERED)
    assert np.array_equal(sampler("none", "anti").epoch_order(0), ORDERED[::-1])
    # anti with pacing: the first batches come from the hardest samples only
    anti = sampler("linear", "anti", start=0.2, full=0.5)
    first = anti.epoch_order(0)[:4]
    assert set(first.tolist()) <= set(ORDERED[-anti.pool_size(0, 0):].tolist())
    easy = sampler("linear", "curriculum", start=0.2, full=0.5)
    assert set(easy.epoch_order(0)[:4].tolist()) <= set(ORDERED[:10].tolist())


def test_random_is_a_seeded_shuffle_per_epoch() -> None:
    rand = sampler("none", "random")
    e0, e1 = rand.epoch_order(0), rand.epoch_order(1)
    assert sorted(e0.tolist()) == IDS.tolist() and sorted(e1.tolist()) == IDS.tolist()
    assert not np.array_equal(e0, ORDERED) and not np.array_equal(e0, e1)
    assert np.array_equal(e0, sampler("none", "random").epoch_order(0))
    assert not np.array_equal(e0, sampler("none", "random", seed=1).epoch_order(0))
    # Percentiles for reliance stay the true difficulty, whatever the presentation.
    assert np.allclose(rand.percentiles(ORDERED, step=1), np.linspace(0, 1, 50))


def test_percentiles_and_steps_to_epochs() -> None:
    s = sampler("linear")
    assert s.epoch_of_step(1) == 0 and s.epoch_of_step(13) == 0 and s.epoch_of_step(14) == 1
    ranking = Ranking.from_scores(IDS, SCORES)
    assert ranking.rank_of(ORDERED).tolist() == list(range(50))
    with pytest.raises(KeyError):
        ranking.percentiles(np.array([5]))


def _write_epoch(run: Path, epoch: int, ids: np.ndarray, losses: np.ndarray) -> None:
    n = ids.size
    table = pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array(np.full(n, epoch, np.int32)),
        pa.array(np.ones(n, np.int64)), pa.array(losses.astype(np.float32)),
        pa.array(np.exp(-losses).astype(np.float32)), pa.array(np.full(n, 5, np.int32)),
        pa.array(np.ones(n, np.int32))], schema=snap.SNAPSHOT_SCHEMA)
    snap.write_snapshot(RunLayout(run).snapshots / snap.snapshot_name(epoch), table, epoch, 1,
                        True, "fp")


def test_snapshot_re_ranking_follows_the_recorded_losses(tmp_path: Path) -> None:
    s = CurriculumSampler(IDS, Pacing("none"), 4, 39, 0, None, snapshot_run=tmp_path,
                          cache_fingerprint="fp")
    first = s.epoch_order(0)  # nothing known yet: a seeded shuffle
    assert sorted(first.tolist()) == IDS.tolist() and not np.array_equal(first, IDS)
    assert np.isnan(s.percentiles(IDS[:3], step=1)).all()
    with pytest.raises(ConfigError, match="epoch-0000.parquet is missing"):
        s.epoch_order(1)
    losses = np.random.default_rng(0).random(IDS.size)
    losses[5] = losses[6]  # a tie: broken by sample id
    _write_epoch(tmp_path, 0, IDS, losses)
    expected = sorted(IDS.tolist(), key=lambda i: (np.float32(losses[i - 1000]), i))
    assert s.epoch_order(1).tolist() == expected
    # Epoch 1 recorded only 10 samples: they are re-ranked by their new loss, the others
    # keep their epoch-0 loss; a sample never recorded at all would rank hardest.
    new = np.linspace(5.0, 0.0, 10)
    _write_epoch(tmp_path, 1, IDS[:10], new)
    latest = {int(i): float(np.float32(v)) for i, v in zip(IDS, losses, strict=True)}
    latest.update({int(i): float(np.float32(v)) for i, v in zip(IDS[:10], new, strict=True)})
    assert s.epoch_order(2).tolist() == sorted(latest, key=lambda i: (latest[i], i))
    fresh = CurriculumSampler(IDS, Pacing("none"), 4, 39, 0, None, snapshot_run=tmp_path,
                              cache_fingerprint="fp")
    assert np.array_equal(fresh.epoch_order(2), s.epoch_order(2))  # what --resume recomputes

    partial = tmp_path / "partial"
    _write_epoch(partial, 0, IDS[10:], losses[10:])
    p = CurriculumSampler(IDS, Pacing("none"), 4, 39, 0, Ranking.from_scores(IDS, SCORES),
                          snapshot_run=partial, cache_fingerprint="fp")
    order = p.epoch_order(1)
    unseen = [i for i in ORDERED.tolist() if i < 1010]  # in their previous (file) order
    assert order[-10:].tolist() == unseen
    assert order[:40].tolist() == sorted(IDS[10:].tolist(),
                                         key=lambda i: (np.float32(losses[i - 1000]), i))
    other = CurriculumSampler(IDS, Pacing("none"), 4, 39, 0, None, snapshot_run=tmp_path,
                              cache_fingerprint="another")
    with pytest.raises(ConfigError, match="not a complete epoch snapshot of this cache"):
        other.epoch_order(1)
