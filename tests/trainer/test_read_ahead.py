"""The loader's read-ahead (`read_ahead.py`): batches are the bits the row groups give, for a
shuffle and a curriculum order, with and without workers, on resume mid-epoch, with any
budget; the rows held never exceed the budget; a row group revisited later is read again."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.shard_reader import (
    CacheIndex,
    Columns,
    RowGroup,
    RowGroupReader,
    build_index,
    columns_for,
)
from kdpipe.trainer.curriculum_config import _warn_about_random_access
from kdpipe.trainer.curriculum_sampler import CurriculumSampler, Ranking
from kdpipe.trainer.data import Batch, BatchLoader, GlobalBatch, collate
from kdpipe.trainer.pacing import Pacing
from kdpipe.trainer.read_ahead import ReadAhead, compact_rows, fetch_sequence, horizons
from kdpipe.trainer.sampler import ShuffleSampler

BATCH, ACCUM = 3, 2


def _today(index: CacheIndex, order: np.ndarray, columns: Columns, cached_groups: int
           ) -> list[GlobalBatch]:
    """The batches as the loader made them before the read-ahead: every sample's row taken
    from an LRU of whole decoded row groups, in order."""
    reader = RowGroupReader(index, columns, cached_groups)
    positions = index.positions(order)
    batches = []
    for start in range(0, order.size, BATCH * ACCUM):
        step = positions[start:start + BATCH * ACCUM]
        micro = [collate([(int(index.sample_ids[p]), reader.get(int(index.group[p])),
                           int(index.row[p])) for p in step[m:m + BATCH]], columns, 0)
                 for m in range(0, step.size, BATCH)]
        batches.append(GlobalBatch(micro, order[start:start + BATCH * ACCUM],
                                   int(index.num_targets[step].sum())))
    reader.close()
    return batches


def _loaded(index: CacheIndex, order: np.ndarray, columns: Columns, cached_groups: int,
            workers: int = 0, budget: int = 1 << 20) -> list[GlobalBatch]:
    with BatchLoader(index, order, columns, BATCH, ACCUM, prefetch=2,
                     cached_groups=cached_groups, workers=workers, read_ahead=budget) as loader:
        return list(loader)


def _tensors(batch: Batch) -> list[object]:
    found: list[object] = [batch.sample_ids, batch.input_ids, batch.attention_mask,
                           batch.target_mask, batch.labels, batch.target_row,
                           batch.target_logprob, batch.segments]
    if batch.teacher is not None:
        found += list(vars(batch.teacher).values())
    return found


def _assert_same(expected: list[GlobalBatch], found: list[GlobalBatch]) -> None:
    assert len(found) == len(expected)
    for a, b in zip(expected, found, strict=True):
        assert np.array_equal(a.sample_ids, b.sample_ids) and a.num_targets == b.num_targets
        for ma, mb in zip(a.micro, b.micro, strict=True):
            for x, y in zip(_tensors(ma), _tensors(mb), strict=True):
                if isinstance(x, torch.Tensor):
                    assert isinstance(y, torch.Tensor)
                    assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                else:
                    assert x == y


def _curriculum_order(index: CacheIndex, seed: int = 0) -> np.ndarray:
    """A linear-paced curriculum over a random difficulty ranking: draws from a growing pool
    of samples scattered over every row group, with repeats across batches."""
    scores = np.random.default_rng(seed).random(len(index))
    sampler = CurriculumSampler(index.sample_ids, Pacing("linear", start=0.2, full=0.8),
                                per_step=BATCH * ACCUM, total_steps=40, seed=seed,
                                initial=Ranking.from_scores(index.sample_ids, scores))
    return np.concatenate([sampler.epoch_order(e) for e in range(2)])


@pytest.fixture(scope="module")
def loaded(tiny_cache: Path) -> tuple[CacheIndex, Columns]:
    cache = open_cache(tiny_cache)
    return build_index(cache), columns_for(cache, teacher=True, temperature=2.0)


@pytest.mark.parametrize("order_kind", ["shuffle", "curriculum"])
@pytest.mark.parametrize("budget", [1, 300, 1 << 20])
def test_batches_are_todays(loaded: tuple[CacheIndex, Columns], order_kind: str,
                            budget: int) -> None:
    index, columns = loaded
    order = (ShuffleSampler(index, index.sample_ids, seed=3, window=2).epoch_order(0)
             if order_kind == "shuffle" else _curriculum_order(index))
    _assert_same(_today(index, order, columns, 2), _loaded(index, order, columns, 2,
                                                           budget=budget))


@pytest.mark.parametrize("order_kind", ["shuffle", "curriculum"])
def test_workers_give_todays_batches(loaded: tuple[CacheIndex, Columns],
                                     order_kind: str) -> None:
    index, columns = loaded
    order = (ShuffleSampler(index, index.sample_ids, seed=3, window=2).epoch_order(0)
             if order_kind == "shuffle" else _curriculum_order(index))
    _assert_same(_today(index, order, columns, 1),
                 _loaded(index, order, columns, 1, workers=2, budget=500))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(loaded: tuple[CacheIndex, Columns],
                                                 workers: int) -> None:
    index, columns = loaded
    order = _curriculum_order(index, seed=1)
    whole = _loaded(index, order, columns, 2, workers=workers, budget=700)
    done = 5  # global batches before the interruption: horizons now start elsewhere
    resumed = _loaded(index, order[done * BATCH * ACCUM:], columns, 2, workers=workers,
                      budget=700)
    _assert_same(whole[done:], resumed)


@pytest.mark.parametrize("budget", [1, 200, 1000, 1 << 20])
def test_the_rows_held_stay_within_the_budget(loaded: tuple[CacheIndex, Columns],
                                              budget: int) -> None:
    index, columns = loaded
    positions = index.positions(_curriculum_order(index))
    ahead = ReadAhead(index, columns, positions, cached_groups=1, budget=budget)
    rows = list(ahead)
    ahead.close()
    assert len(rows) == positions.size
    largest = int(index.num_targets.max())
    assert 0 < ahead.peak_targets <= max(budget, largest)
    bounds = horizons(index.num_targets[positions], budget)
    sums = np.add.reduceat(index.num_targets[positions], bounds[:-1])
    assert np.all((sums <= budget) | (np.diff(bounds) == 1))


def test_a_group_revisited_later_is_read_again(loaded: tuple[CacheIndex, Columns]) -> None:
    index, columns = loaded
    first, last = index.sample_ids[index.group == 0], index.sample_ids[index.group == 1]
    # Row group 0, then row group 1 (which evicts 0 from an LRU of one), then 0 again.
    order = np.concatenate([first[:4], last, first[::-1]])
    budget = int(index.num_targets[index.positions(order[:6])].sum())  # horizons split 0 | 1
    positions = index.positions(order)
    fetches = fetch_sequence(index.group[positions],
                             horizons(index.num_targets[positions], budget))
    assert fetches.count(0) >= 2
    for workers in (0, 2):
        _assert_same(_today(index, order, columns, 1),
                     _loaded(index, order, columns, 1, workers=workers, budget=budget))


def _ragged(rng: np.random.Generator, rows: int, low: int, high: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(rng.integers(low, high, rows))]).astype(np.int64)


def test_compact_rows_keeps_every_field_of_every_row() -> None:
    """Masked targets, packed segments, top-k with tempered tails and sampled entries: each
    copied row's arrays are its source row's, dtype included."""
    rng, k, n = np.random.default_rng(0), 3, 7
    offsets = _ragged(rng, n, 2, 9)
    mask = rng.random(int(offsets[-1]) - n) < 0.6
    per_row = np.add.reduceat(mask, offsets[:-1] - np.arange(n))
    target_offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    targets = int(target_offsets[-1])
    segment_offsets = _ragged(rng, n, 1, 3)
    sampled_offsets = _ragged(rng, targets, 1, 4)
    group = RowGroup(
        offsets=offsets, input_ids=rng.integers(0, 99, int(offsets[-1])).astype(np.uint16),
        target_offsets=target_offsets, position_mask=mask, segment_offsets=segment_offsets,
        segments=rng.integers(1, 5, int(segment_offsets[-1])),
        topk_ids=rng.integers(0, 99, targets * k).astype(np.uint32),
        topk_logprobs=rng.random(targets * k).astype(np.float16),
        tail_logmass=rng.random(targets).astype(np.float16),
        tempered=rng.random(targets).astype(np.float32),
        target_logprob=rng.random(targets).astype(np.float16),
        sampled_ids=rng.integers(0, 99, int(sampled_offsets[-1])),
        sampled_counts=rng.integers(1, 9, int(sampled_offsets[-1])).astype(np.uint8),
        sampled_offsets=sampled_offsets)
    rows = np.array([5, 0, 3, 6])
    copy = compact_rows(group, rows, k)

    def row_arrays(g: RowGroup, r: int) -> list[np.ndarray]:
        span = g.target_span(r)
        assert g.sampled_offsets is not None and g.sampled_ids is not None
        entries = slice(int(g.sampled_offsets[span.start]), int(g.sampled_offsets[span.stop]))
        return [g.input_ids[g.offsets[r]:g.offsets[r + 1]], g.positions_of(r),
                np.asarray(g.segments_of(r)),
                g.topk_ids[span.start * k:span.stop * k],  # type: ignore[index]
                g.topk_logprobs[span.start * k:span.stop * k],  # type: ignore[index]
                g.tail_logmass[span], g.tempered[span],  # type: ignore[index]
                g.target_logprob[span], g.sampled_ids[entries],  # type: ignore[index]
                g.sampled_counts[entries],  # type: ignore[index]
                np.diff(g.sampled_offsets[span.start:span.stop + 1])]

    for i, r in enumerate(rows.tolist()):
        for x, y in zip(row_arrays(group, r), row_arrays(copy, i), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)


def test_a_read_ahead_too_small_for_the_cache_is_warned_about(
        tiny_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = open_cache(tiny_cache)
    with caplog.at_level(logging.WARNING):
        _warn_about_random_access(cache, loader_groups=1, read_ahead=1 << 20)
        assert not caplog.records
        _warn_about_random_access(cache, loader_groups=1, read_ahead=100)
    assert len(caplog.records) == 1 and "--read-ahead 100 " in caplog.records[0].message


@pytest.mark.parametrize("workers", [0, 2])
def test_caches_in_lockstep_each_read_ahead_over_the_same_order(
        loaded: tuple[CacheIndex, Columns], workers: int) -> None:
    index, columns = loaded
    order = _curriculum_order(index, seed=2)
    expected = _today(index, order, columns, 2)
    with BatchLoader(index, order, columns, BATCH, ACCUM, prefetch=2, cached_groups=2,
                     workers=workers, read_ahead=300, others=[(index, columns)]) as loader:
        found = list(loader)
    _assert_same(expected, found)
    for batch in found:
        for mb in batch.micro:
            (other,) = mb.other_teachers
            assert mb.teacher is not None
            for x, y in zip(vars(mb.teacher).values(), vars(other).values(), strict=True):
                assert (x is None and y is None) or torch.equal(x, y)
