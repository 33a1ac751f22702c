"""--loader-workers: row groups decoded by DataLoader worker processes give the batches of the
loader's own thread, bit for bit, for any order; faults stay one line; training and resume are
unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import CacheIndex, Columns, build_index, columns_for
from kdpipe.trainer.data import BatchLoader, GlobalBatch
from kdpipe.trainer.decode_workers import load_sequence
from kdpipe.trainer.train import train

from .conftest import small_config
from .test_verified_reads import EDITED_SHARD, edit_one_topk_id


def test_the_load_sequence_replays_the_readers_lru() -> None:
    assert load_sequence([0, 0, 1, 0, 2, 1, 3, 0], capacity=2) == [0, 1, 2, 1, 3, 0]
    assert load_sequence([5, 4, 5, 4], capacity=1) == [5, 4, 5, 4]
    assert load_sequence([], capacity=4) == []


def _batches(index: CacheIndex, order: np.ndarray, columns: Columns, workers: int,
             cached_groups: int) -> list[GlobalBatch]:
    with BatchLoader(index, order, columns, batch_size=3, grad_accum=2, prefetch=2,
                     cached_groups=cached_groups, workers=workers) as loader:
        return list(loader)


def _tensors(batch: GlobalBatch) -> list[torch.Tensor]:
    found = [batch.sample_ids if isinstance(batch.sample_ids, torch.Tensor)
             else torch.as_tensor(batch.sample_ids)]
    for mb in batch.micro:
        found += [mb.input_ids, mb.attention_mask, mb.target_mask, mb.labels, mb.target_row]
        assert mb.teacher is not None
        found += [t for t in vars(mb.teacher).values() if isinstance(t, torch.Tensor)]
    return found


@pytest.mark.parametrize("cached_groups", [1, 3])
def test_workers_give_the_threads_batches(tiny_cache: Path, cached_groups: int) -> None:
    cache = open_cache(tiny_cache)
    index = build_index(cache)
    columns = columns_for(cache, teacher=True, temperature=2.0)
    # A random order over two epochs: row groups leave the LRU and are decoded again.
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(index.sample_ids) for _ in range(2)])
    expected = _batches(index, order, columns, 0, cached_groups)
    found = _batches(index, order, columns, 2, cached_groups)
    assert len(found) == len(expected)
    for a, b in zip(expected, found, strict=True):
        assert a.num_targets == b.num_targets
        for x, y in zip(_tensors(a), _tensors(b), strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_an_edited_shard_stops_the_workers_loader_in_one_line(tiny_cache: Path, tmp_path: Path
                                                               ) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    cache = open_cache(copy)
    index = build_index(cache)  # hashes every shard, once per process, until one changes
    columns = columns_for(cache, teacher=True, temperature=1.0)
    shard = copy / cache.manifest.shards[EDITED_SHARD].file
    edit_one_topk_id(shard)  # the workers decode it; the loader's process checks it first
    with pytest.raises(CacheFormatError) as caught, \
            BatchLoader(index, index.sample_ids, columns, batch_size=4, workers=1) as loader:
        list(loader)
    assert f"cache shard {shard} does not match its checksum" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_training_with_workers_equals_training_without(tiny_cache: Path,
                                                      tiny_student_dir: Path,
                                                      tmp_path: Path) -> None:
    losses = {}
    for workers in (0, 2):
        run = tmp_path / f"run-{workers}"
        train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=4,
                           loader_workers=workers))
        lines = RunLayout(run).metrics.read_text().splitlines()
        losses[workers] = [(record["loss"], record["grad_norm"])
                           for record in map(json.loads, lines) if record["split"] == "train"]
    assert losses[0] and losses[0] == losses[2]
