"""Cache streaming: index, decoding against pyarrow, collation, sampler, held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.shard_reader import Columns, RowGroup, build_index, columns_for
from kdpipe.trainer.data import BatchLoader, collate
from kdpipe.trainer.sampler import ShuffleSampler, holdout_mask


def _parquet_rows(cache_dir: Path) -> dict[int, dict[str, list]]:
    cache = open_cache(cache_dir)
    rows = {}
    for shard in cache.manifest.shards:
        table = pq.read_table(cache.shard_path(shard))
        for row in table.to_pylist():
            rows[row[cols.SAMPLE_ID]] = row
    return rows


def test_index_covers_the_cache(tiny_cache: Path) -> None:
    cache = open_cache(tiny_cache)
    index = build_index(cache)
    assert len(index) == cache.manifest.num_sequences
    assert len(cache.manifest.shards) >= 2
    assert int(index.num_targets.sum()) == cache.manifest.num_targets
    shuffled = np.random.default_rng(0).permutation(index.sample_ids)
    assert np.array_equal(index.sample_ids[index.positions(shuffled)], shuffled)
    with pytest.raises(ConfigError, match="not in the cache"):
        index.positions(np.array([10**9]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loader_decodes_exactly_what_parquet_holds(tiny_cache: Path, temperature: float) -> None:
    cache = open_cache(tiny_cache)
    index = build_index(cache)
    rows = _parquet_rows(tiny_cache)
    k = cache.manifest.top_k
    columns = columns_for(cache, teacher=True, temperature=temperature)
    assert (columns.tempered_index == 0) == (temperature == 2.0)
    order = np.random.default_rng(1).permutation(index.sample_ids)
    seen = []
    with BatchLoader(index, order, columns, batch_size=3, grad_accum=2, pad_id=1) as loader:
        for global_batch in loader:
            assert global_batch.num_targets == sum(b.num_targets for b in global_batch.micro)
            for batch in global_batch.micro:
                assert batch.teacher is not None
                start = 0
                for b, sid in enumerate(batch.sample_ids.tolist()):
                    row = rows[sid]
                    n = len(row[cols.INPUT_IDS])
                    assert batch.input_ids[b, :n].tolist() == row[cols.INPUT_IDS]
                    assert batch.attention_mask[b].sum() == n
                    assert batch.target_mask[b].sum() == n - 1
                    span = slice(start, start + n - 1)
                    start += n - 1
                    assert batch.labels[span].tolist() == row[cols.INPUT_IDS][1:]
                    assert (batch.target_row[span] == b).all()
                    ids = np.array(row[cols.TOPK_IDS]).reshape(n - 1, k)
                    assert np.array_equal(batch.teacher.topk_ids[span].numpy(), ids)
                    lps = np.array(row[cols.TOPK_LOGPROBS], dtype=np.float32).reshape(n - 1, k)
                    assert np.array_equal(batch.teacher.topk_logprobs[span].numpy(), lps)
                    tail = np.array(row[cols.TAIL_LOGMASS], dtype=np.float32)
                    assert np.array_equal(batch.teacher.tail_logmass[span].numpy(), tail)
                    tempered = batch.teacher.tempered_tail_logmass
                    if temperature == 2.0:
                        assert tempered is not None
                        expected = np.array(row[cols.TAIL_LOGMASS_TEMPERED], dtype=np.float32)
                        assert np.array_equal(tempered[span].numpy(), expected)
                    else:
                        assert tempered is None
                    seen.append(sid)
    assert seen == order.tolist()


def test_ce_mode_reads_no_teacher_columns(tiny_cache: Path) -> None:
    cache = open_cache(tiny_cache)
    columns = columns_for(cache, teacher=False, temperature=2.0)
    assert columns.names == [cols.SAMPLE_ID, cols.INPUT_IDS]
    index = build_index(cache)
    with BatchLoader(index, index.sample_ids[:5], columns, batch_size=5) as loader:
        (batch,) = list(loader)
    assert batch.micro[0].teacher is None


def test_loader_stops_early_and_reports_errors(tiny_cache: Path) -> None:
    cache = open_cache(tiny_cache)
    index = build_index(cache)
    columns = columns_for(cache, teacher=True, temperature=1.0)
    loader = BatchLoader(index, index.sample_ids, columns, batch_size=1, prefetch=1)
    with loader:
        next(iter(loader))  # stop after one batch with the producer blocked on a full queue
    assert loader.thread is None
    bad = np.array([int(index.sample_ids[0]), 10**9])
    with pytest.raises(ConfigError, match="not in the cache"), \
            BatchLoader(index, bad, columns, batch_size=1) as failing:
        list(failing)


def test_heldout_split_is_deterministic_and_disjoint(tiny_cache: Path) -> None:
    ids = np.arange(10_000, dtype=np.int64)
    mask = holdout_mask(ids, 0.2)
    assert np.array_equal(mask, holdout_mask(ids, 0.2))
    assert 0.17 < mask.mean() < 0.23
    perm = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(holdout_mask(perm, 0.2), mask[perm])  # depends on the id alone
    assert not holdout_mask(ids, 0.0).any()
    assert (holdout_mask(ids, 0.1) <= mask).all()  # a smaller fraction is a subset
    index = build_index(open_cache(tiny_cache))
    held = holdout_mask(index.sample_ids, 0.25)
    train, heldout = set(index.sample_ids[~held].tolist()), set(index.sample_ids[held].tolist())
    assert train and heldout and not train & heldout
    assert train | heldout == set(index.sample_ids.tolist())


def test_shuffle_sampler_is_a_seeded_permutation(tiny_cache: Path) -> None:
    index = build_index(open_cache(tiny_cache))
    train_ids = index.sample_ids[~holdout_mask(index.sample_ids, 0.25)]
    sampler = ShuffleSampler(index, train_ids, seed=3, window=2)
    first = sampler.epoch_order(0)
    assert sorted(first.tolist()) == sorted(train_ids.tolist())
    assert sampler.epoch_size(0) == len(train_ids)
    assert np.array_equal(first, ShuffleSampler(index, train_ids, 3, 2).epoch_order(0))
    assert not np.array_equal(first, sampler.epoch_order(1))
    assert not np.array_equal(first, ShuffleSampler(index, train_ids, 4, 2).epoch_order(0))
    # window=1: each row group's samples stay together, so the loader decodes it once.
    groups = index.group[index.positions(ShuffleSampler(index, train_ids, 3, 1).epoch_order(0))]
    assert (np.diff(groups) != 0).sum() == len(np.unique(groups)) - 1


def test_collated_padding_is_right_padding(tiny_cache: Path) -> None:
    cache = open_cache(tiny_cache)
    index = build_index(cache)
    lengths = index.num_targets + 1
    short, long = index.sample_ids[lengths.argmin()], index.sample_ids[lengths.argmax()]
    columns = columns_for(cache, teacher=True, temperature=1.0)
    with BatchLoader(index, np.array([short, long]), columns, batch_size=2, pad_id=1) as loader:
        (global_batch,) = list(loader)
    batch = global_batch.micro[0]
    n_short = int(lengths.min())
    assert batch.input_ids.shape == (2, int(lengths.max()))
    assert (batch.input_ids[0, n_short:] == 1).all()
    assert batch.attention_mask[0, n_short:].sum() == 0
    assert batch.labels.shape[0] == int(lengths.min() + lengths.max() - 2)
    assert batch.target_mask.dtype == torch.bool


def _packed_group(segments: list[int]) -> RowGroup:
    """One row of 6 tokens, every position a target, packed from documents of `segments`."""
    return RowGroup(offsets=np.array([0, 6]), input_ids=np.arange(6, dtype=np.uint16),
                    target_offsets=np.array([0, 5]), position_mask=None,
                    segment_offsets=np.array([0, len(segments)]),
                    segments=np.array(segments, dtype=np.int64), topk_ids=None,
                    topk_logprobs=None, tail_logmass=None, tempered=None)


def test_a_teacher_with_other_document_boundaries_is_refused() -> None:
    columns = Columns(teacher=False, top_k=0, segments=True)
    first = [(7, _packed_group([2, 4]), 0)]
    batch = collate(first, columns, 0, [([(7, _packed_group([2, 4]), 0)], columns)])
    assert batch.segments == [[2, 4]]
    # the same tokens and targets, packed from other documents
    with pytest.raises(CacheFormatError, match="sample id 7 has other input_ids, target "
                                               "positions or packed-document boundaries"):
        collate(first, columns, 0, [([(7, _packed_group([3, 3]), 0)], columns)])
