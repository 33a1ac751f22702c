"""A `Sampler` that presents the training samples easy → hard, paced, and provably so.

Each epoch has as many samples as the training split (so `--epochs` buys the same compute
with or without a curriculum). For batch j of epoch e the trainer will have taken
t = e · J + j optimizer steps (J batches per epoch); the pacing function gives the pool size
m(t) of the easiest samples available, and the batch is drawn uniformly at random, without
repeats, from those m(t) samples. `--pacing none` instead presents every sample once, in
ranked order. The order controls change only the presentation: `anti` reverses the ranking
(hard → easy), `random` replaces it by a seeded shuffle drawn per epoch. The difficulty
percentiles handed to selective reliance always come from the true ranking.

With `--curriculum-source snapshot` the ranking of epoch e >= 1 comes from the per-sample
losses the trainer recorded in epoch e - 1 (`RUN/snapshots/epoch-XXXX.parquet`): ascending
loss (or 1 - confidence), ties by sample id. A sample the previous epoch did not draw (a
paced epoch need not draw every sample) keeps its latest recorded score; a sample never
drawn ranks after all others, in its previous order. Epoch 0 uses `--curriculum FILE` if
given, else a plain seeded shuffle of the whole split (nothing is known yet).

Everything is a function of (seed, epoch, snapshot files), so `--resume` repeats it exactly;
the trainer logs every step's sample ids in RUN/order.jsonl.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.curriculum import rank_scores
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.pacing import Pacing

log = logging.getLogger(__name__)

ORDERS = ("curriculum", "anti", "random")
SNAPSHOT_METRICS = ("nll", "confidence")
_ORDER_SALT = 0x6375727269  # separates the curriculum's RNG streams from the shuffle's


@dataclass(frozen=True, eq=False)
class Ranking:
    """Training samples ranked easy → hard, with percentile lookup by sample id."""

    ordered: np.ndarray  # (n,) sample ids, easiest first
    _sorted_ids: np.ndarray  # (n,) ids ascending
    _percentile: np.ndarray  # (n,) percentile of _sorted_ids[i]

    @classmethod
    def from_scores(cls, sample_ids: np.ndarray, scores: np.ndarray) -> Ranking:
        """Ascending score, ties by sample id (schemas.curriculum.rank_scores' convention)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        rank, percentile, _ = rank_scores(ids, scores, 1)
        ordered = np.empty_like(ids)
        ordered[rank] = ids
        by_id = np.argsort(ids)
        return cls(ordered, ids[by_id], percentile[by_id])

    def __len__(self) -> int:
        return int(self.ordered.size)

    def percentiles(self, sample_ids: np.ndarray) -> np.ndarray:
        """(S,) u = rank / (n - 1) of each sample id (all must be ranked)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        where = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self) - 1)
        if not np.array_equal(self._sorted_ids[where], ids):
            raise KeyError(f"sample ids {ids[self._sorted_ids[where] != ids][:5].tolist()} "
                           "are not ranked")
        return self._percentile[where]

    def rank_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """(S,) integer rank of each sample id."""
        return np.rint(self.percentiles(sample_ids) * max(len(self) - 1, 1)).astype(np.int64)


class CurriculumSampler:
    """Sampler protocol (`trainer.sampler.Sampler`) for curricula; see the module docstring."""

    def __init__(self, train_ids: np.ndarray, pacing: Pacing, per_step: int, total_steps: int,
                 seed: int, initial: Ranking | None, order: str = "curriculum",
                 snapshot_run: str | Path | None = None, snapshot_metric: str = "nll",
                 cache_fingerprint: str = "") -> None:
        self.train_ids = np.sort(np.asarray(train_ids, dtype=np.int64))
        self.n = int(self.train_ids.size)
        if self.n == 0:
            raise ConfigError("a curriculum needs at least one training sample")
        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {ORDERS}")
        if snapshot_metric not in SNAPSHOT_METRICS:
            raise ValueError(f"snapshot metric {snapshot_metric!r} not in {SNAPSHOT_METRICS}")
        self.pacing, self.order, self.seed = pacing, order, seed
        self.per_step, self.total_steps = per_step, total_steps
        self.batches_per_epoch = -(-self.n // per_step)
        self.snapshot_run = Path(snapshot_run) if snapshot_run is not None else None
        self.snapshot_metric, self.cache_fingerprint = snapshot_metric, cache_fingerprint
        self._rankings: dict[int, Ranking | None] = {0: initial}
        self._known: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (mask, score)
        if initial is not None and len(initial) != self.n:
            raise ValueError("the initial ranking must rank exactly the training samples")

    # --- the Sampler protocol ----------------------------------------------------------------
    def epoch_size(self, epoch: int) -> int:
        return self.n

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(n,) sample ids of epoch `epoch`, in the order the trainer consumes them."""
        presented = self.presentation(epoch)
        if self.pacing.name == "none" or self.ranking(epoch) is None:
            return presented
        rng = np.random.default_rng([self.seed, _ORDER_SALT, 1, epoch])
        parts = []
        for j in range(self.batches_per_epoch):
            size = min(self.per_step, self.n - j * self.per_step)
            m = self.pool_size(epoch, j)
            parts.append(presented[rng.choice(m, size=size, replace=False)])
        return np.concatenate(parts)

    # --- what the order is made of -----------------------------------------------------------
    def pool_size(self, epoch: int, batch: int) -> int:
        """Samples available to batch `batch` of `epoch`: m(t) at t = epoch · J + batch."""
        t = epoch * self.batches_per_epoch + batch
        return self.pacing.pool_size(t, self.total_steps, self.n, min_size=self.per_step)

    def presentation(self, epoch: int) -> np.ndarray:
        """(n,) ids in the order pools grow: ranked, reversed (anti) or shuffled (random)."""
        ranking = self.ranking(epoch)
        if ranking is None:  # snapshot source, epoch 0 without a file: a plain shuffle
            return np.random.default_rng([self.seed, _ORDER_SALT, 0, epoch]).permutation(
                self.train_ids)
        if self.order == "anti":
            return ranking.ordered[::-1].copy()
        if self.order == "random":
            rng = np.random.default_rng([self.seed, _ORDER_SALT, 2, epoch])
            return rng.permutation(ranking.ordered)
        return ranking.ordered

    def epoch_of_step(self, step: int) -> int:
        """The epoch of 1-based optimizer step `step` (every epoch has J batches)."""
        return (max(step, 1) - 1) // self.batches_per_epoch

    def percentiles(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        """(S,) difficulty percentile u of each sample at `step`; NaN while none is known."""
        ranking = self.ranking(self.epoch_of_step(step))
        if ranking is None:
            return np.full(len(sample_ids), np.nan)
        return ranking.percentiles(sample_ids)

    def ranking(self, epoch: int) -> Ranking | None:
        """The difficulty ranking in force in `epoch` (None: epoch 0 of a snapshot run)."""
        if epoch in self._rankings:
            return self._rankings[epoch]
        if self.snapshot_run is None:
            return self._rankings[0]
        previous = self.ranking(epoch - 1)
        known, score = self._known_scores(epoch - 1)
        # Unseen samples rank after every seen one, in their previous order.
        fallback = (previous.rank_of(self.train_ids) if previous is not None
                    else np.arange(self.n))
        order = np.lexsort((self.train_ids, np.where(known, 0, fallback),
                            np.where(known, score, 0.0), ~known))
        ranking = Ranking.from_scores(self.train_ids[order], np.arange(self.n, dtype=float))
        if not known.all():
            log.info("epoch %d: %d of %d samples were never drawn yet; they rank hardest",
                     epoch, int((~known).sum()), self.n)
        self._rankings[epoch] = ranking
        return ranking

    def _known_scores(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask, score) of the latest recorded score of each training sample up to `epoch`."""
        if epoch in self._known:
            return self._known[epoch]
        if epoch > 0:
            mask, score = (a.copy() for a in self._known_scores(epoch - 1))
        else:
            mask, score = np.zeros(self.n, dtype=bool), np.zeros(self.n, dtype=np.float64)
        ids, values = self._read_snapshot(epoch)
        where = np.searchsorted(self.train_ids, ids)
        inside = (where < self.n) & (self.train_ids[np.minimum(where, self.n - 1)] == ids)
        mask[where[inside]] = True
        score[where[inside]] = values[inside]
        self._known[epoch] = (mask, score)
        return mask, score

    def _read_snapshot(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.snapshot_run is not None
        path = RunLayout(self.snapshot_run).snapshots / snap.snapshot_name(epoch)
        if not path.is_file():
            raise ConfigError(f"--curriculum-source snapshot: {path} is missing; the trainer "
                              "writes it at the end of each epoch (do not pass --no-snapshots)")
        table, info = snap.read_snapshot(path)
        if not info.epoch_complete or (self.cache_fingerprint
                                       and info.cache_fingerprint != self.cache_fingerprint):
            raise ConfigError(f"{path}: not a complete epoch snapshot of this cache; start the "
                              "run again with --overwrite")
        ids = np.asarray(table.column(snap.SAMPLE_ID), dtype=np.int64)
        if self.snapshot_metric == "nll":
            values = np.asarray(table.column(snap.LOSS), dtype=np.float64)
        else:
            values = 1.0 - np.asarray(table.column(snap.CONFIDENCE), dtype=np.float64)
        return ids, values
