"""The order in which a run sees its samples, and the held-out split.

The loop asks a `Sampler` for each epoch's order of sample ids and cuts it into consecutive
global batches, so any order works: the default seeded shuffle here, or a curriculum that
presents samples easy → hard (`curriculum_sampler.py`). Orders are deterministic functions of
(seed, epoch), which is what makes `--resume` exact and the logged order reproducible; each
sample's λ comes from `reliance.py`, just as deterministic.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kdpipe.schemas.shard_reader import CacheIndex

HOLDOUT_SALT = 0x6B6470697065  # changing it changes every run's held-out split


class Sampler(Protocol):
    """Gives the order of sample ids for each epoch (ids may repeat; any subset of the cache)."""

    def epoch_size(self, epoch: int) -> int:
        """Samples in that epoch's order (to plan the schedule before training starts)."""
        ...

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(n,) int64 sample ids in the order they are consumed; called at each epoch start."""
        ...


def holdout_mask(sample_ids: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) bool: which samples are held out, by a hash of the sample id alone.

    Independent of the seed, the sampler and the cache's shard layout, so every run on the
    same cache with the same fraction holds out exactly the same samples, and a sample's
    membership never changes when other samples are added.
    """
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    return _unit_hash(np.asarray(sample_ids, dtype=np.int64)) < fraction


def _unit_hash(values: np.ndarray) -> np.ndarray:
    """splitmix64 of (value + salt) mapped to [0, 1): vectorised, stable across platforms."""
    z = values.astype(np.uint64) + np.uint64(HOLDOUT_SALT) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class ShuffleSampler:
    """A seeded shuffle that reads each Parquet row group once per epoch.

    For epoch e a generator seeded with (seed, e) permutes the cache's row groups, cuts that
    permutation into windows of `window` consecutive row groups, and shuffles the samples of
    each window (only those in `sample_ids`, e.g. the training split). The epoch's order is
    the windows one after another. With `window` >= the number of row groups this is a full
    uniform shuffle; smaller windows bound the loader's memory to `window` decoded row groups
    while still mixing ~window * 64 sequences from distant parts of the cache.
    """

    def __init__(self, index: CacheIndex, sample_ids: np.ndarray, seed: int,
                 window: int = 16) -> None:
        self.seed, self.window = seed, window
        positions = index.positions(np.asarray(sample_ids, dtype=np.int64))
        self.size = int(positions.size)
        by_group = np.argsort(index.group[positions], kind="stable")
        groups, starts = np.unique(index.group[positions][by_group], return_index=True)
        bounds = np.append(starts, positions.size)
        # Sample ids of each row group that holds any of `sample_ids`, in storage order.
        self.members = [index.sample_ids[positions[by_group[a:b]]]
                        for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.groups = groups

    def epoch_size(self, epoch: int) -> int:
        return self.size

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        group_order = rng.permutation(len(self.members))
        parts = []
        for w in range(0, len(group_order), self.window):
            window = np.concatenate([self.members[g] for g in group_order[w:w + self.window]])
            parts.append(rng.permutation(window))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class SequentialSampler:
    """Samples in the given order every epoch: evaluation, and curricula with a fixed order."""

    def __init__(self, sample_ids: np.ndarray) -> None:
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)

    def epoch_size(self, epoch: int) -> int:
        return int(self.sample_ids.size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.sample_ids
