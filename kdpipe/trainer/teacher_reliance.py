"""Reliance across teachers: the weight w_j of each teacher j in the KD mixture, per sample or
per token, from that teacher's confidence in the true tokens.

Loss (several caches, one per teacher): L = (1 - λ) CE + λ Σ_j w_j · τ² · KD_j, with the
weights of each sample (or token) summing to 1 over the J teachers. With w0 the normalised
--teacher-weight values (the prior) and NLL_j the teacher's negative log-likelihood of the
true tokens (docs/curriculum.md, "Reliance across teachers"):

* fixed:   w_j = w0_j for every sample and token.
* softmax: w_j = w0_j · exp(-NLL_j / T) / Σ_k w0_k · exp(-NLL_k / T). At the token level with
           T = 1 this is the posterior over teachers after seeing the true token, with w0 as
           the prior (Bayes' rule: p(j | y_t) ∝ p(j) · p_j(y_t)); T → ∞ gives back `fixed`,
           T → 0 gives `best`. A teacher with w0_j = 0 never gets weight.
* best:    all weight on the teachers of least NLL_j among those with w0_j > 0; exact ties
           share it in proportion to w0 (evenly with equal --teacher-weight values), which
           is the T → 0 limit of softmax and does not depend on the order of --cache.

Levels: `sample` takes NLL_j = teacher j's mean -log p_j(y_t) over the sample's targets (the
cache's `teacher_nll` sequence statistic), `token` takes NLL_j,t = -target_logprob_j,t.

Controls, in the style of `reliance.py`'s for λ:

* shuffled: the same weight vectors given to random samples: sample i gets the vector of its
  partner π(i), π a seeded permutation of the training split (`reliance.partner_map`, on its
  own stream); per token, each sample's token weight vectors are permuted over that sample's
  own targets (seeded by seed, step and sample id: `reliance.shuffle_within_samples`, as
  λ's token-level control), which keeps each sample's weights and breaks their link to each
  token's confidence, whatever the micro-batches and processes.
* matched: every sample (token) of step t gets the step's mean weight vector, a mean over
  the global batch's target tokens: at the level `sample` each sample's vector weighted by
  its number of targets (the loss sums over tokens, so this is the mean weight per token that
  `teacher_weight_j` logs), at the level `token` over all its target tokens on every process
  (summed with `sum_across`). Same mean weight per teacher per step, no selectivity.

Every function is deterministic in (seed, step). The formulas run in float64 numpy; results
are float32. docs/curriculum.md gives the sources (Du et al. 2020 on competing teachers; Zhang,
Chen and Wang 2022 on confidence-weighted teachers; Bayesian model averaging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.schemas.cache import Cache
from kdpipe.schemas.errors import CacheFormatError, ConfigError, NonFiniteError
from kdpipe.schemas.shard import NUM_TARGETS, SAMPLE_ID, TEACHER_NLL
from kdpipe.trainer.distributed import RankSlice
from kdpipe.trainer.loss_config import normalised
from kdpipe.trainer.reliance import partner_map, partners_of, shuffle_within_samples

_SALT = 0x7465616368  # separates the token shuffles' RNG streams from the λ controls'
_PARTNER_STREAM = 2  # reliance.partner_map's stream here; λ's shuffled control uses 0


def teacher_weights(nll: np.ndarray, prior: np.ndarray, mode: str, temperature: float
                    ) -> np.ndarray:
    """(J, M) NLL of each teacher for M samples or tokens → (J, M) float64 weights, columns
    summing to 1 (the module docstring's formulas).

    nll: nats, finite (checked by the callers, which can name the sample or token). prior:
    (J,) w0, normalised, ≥ 0. mode: fixed, softmax or best; temperature: T > 0 of softmax.
    """
    nll = np.asarray(nll, dtype=np.float64)
    allowed = prior > 0  # (J,)
    if mode == "fixed" or nll.shape[1] == 0:
        return np.broadcast_to(prior[:, None], nll.shape).copy()
    if mode == "softmax":
        # NLL relative to the least allowed one, so that a tiny T makes the others' logits
        # -inf (weight 0), never inf - inf = NaN.
        # A tiny T overflows the division to +inf (weight exactly 0, as the limit T → 0
        # gives); the least one stays 0 / T = 0, so the max below is finite.
        with np.errstate(over="ignore"):
            excess = (nll - nll[allowed].min(axis=0, keepdims=True)) / temperature  # (J, M)
        with np.errstate(divide="ignore"):  # log 0 = -inf: a teacher the prior excludes
            logits = np.log(prior)[:, None] - excess
        logits -= logits[allowed].max(axis=0, keepdims=True)  # the largest term is exp(0) = 1
        weights = np.exp(logits)
    elif mode == "best":
        least = nll[allowed].min(axis=0, keepdims=True)  # (1, M)
        weights = np.where((nll == least) & allowed[:, None], prior[:, None], 0.0)
    else:
        raise ValueError(f"unknown teacher reliance mode {mode!r}")
    return weights / weights.sum(axis=0, keepdims=True)


def check_finite(nll: np.ndarray, names: Sequence[str], what: str,
                 labels: np.ndarray | None = None) -> None:
    """Raise NonFiniteError at the first non-finite value of the (J, M) `nll`, naming its
    teacher (`names[j]`) and `what` column m is, followed by `labels[m]` (default m)."""
    bad = np.argwhere(~np.isfinite(nll))
    if bad.size:
        j, m = (int(v) for v in bad[0])
        label = m if labels is None else labels[m]
        raise NonFiniteError(f"{names[j]}: {what} {label} is {nll[j, m]}, not finite; the "
                             "cache is faulty (`kdpipe verify` lists it): re-create it")


@dataclass(frozen=True)
class SampleNll:
    """Each teacher's per-sample mean NLL of the true tokens (the caches' `teacher_nll`)."""

    sample_ids: np.ndarray  # (n,) int64, ascending
    nll: np.ndarray  # (J, n) float64, nats per target token, finite
    num_targets: np.ndarray  # (n,) int64, each sample's target tokens (the loss's weight)

    def _where(self, sample_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(sample_ids, dtype=np.int64)
        where = np.searchsorted(self.sample_ids, ids).clip(max=max(self.sample_ids.size - 1, 0))
        missing = ids[self.sample_ids[where] != ids] if self.sample_ids.size else ids
        if missing.size:
            raise ValueError(f"samples {missing[:5].tolist()} have no teacher_nll in the table")
        return where

    def lookup(self, sample_ids: np.ndarray) -> np.ndarray:
        """(S,) sample ids → (J, S) NLL; ValueError for an id not in the table."""
        return self.nll[:, self._where(sample_ids)]

    def targets(self, sample_ids: np.ndarray) -> np.ndarray:
        """(S,) sample ids → (S,) their numbers of target tokens; ValueError as `lookup`."""
        return self.num_targets[self._where(sample_ids)]


def read_sample_nll(caches: Sequence[Cache]) -> SampleNll:
    """The `teacher_nll` column of every cache (one per teacher, --cache order), by sample id,
    with the first cache's `num_targets` (aligned caches share their target positions).

    Every cache must hold the same sample ids (CacheFormatError otherwise, naming the cache);
    a non-finite value is a NonFiniteError naming the cache and the sample.
    """
    first: np.ndarray | None = None
    rows = []
    targets = np.zeros(0, np.int64)
    for cache in caches:
        ids = cache.read_column(SAMPLE_ID).to_numpy().astype(np.int64)  # (n,)
        values = cache.read_column(TEACHER_NLL).to_numpy().astype(np.float64)  # (n,)
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order]
        if first is None:
            first = ids
            targets = cache.read_column(NUM_TARGETS).to_numpy().astype(np.int64)[order]
        elif not np.array_equal(ids, first):
            raise CacheFormatError(f"{cache.location}: holds other samples than "
                                   f"{caches[0].location}; every --cache must cover the same "
                                   "sequences")
        check_finite(values[None, :], [str(cache.location)], "teacher_nll of sample", ids)
        rows.append(values)
    if first is None:
        raise ValueError("read_sample_nll needs at least one cache")
    return SampleNll(first, np.stack(rows), targets)


def _normalised_prior(prior: Sequence[float] | np.ndarray) -> np.ndarray:
    w0 = np.asarray(prior, dtype=np.float64)
    try:
        if w0.ndim != 1:
            raise ValueError("not one value per teacher")
        return np.asarray(normalised(w0.tolist()), dtype=np.float64)
    except ValueError:
        raise ConfigError(f"--teacher-weight {w0.tolist()}: give one finite value ≥ 0 per "
                          "--cache, not all 0") from None


def _token_mean(weights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(J, S) per-sample weights and (S,) target counts → (J,) the mean weight per target
    token (a plain mean over samples when no sample has a target)."""
    total = targets.sum()
    if total <= 0:
        return weights.mean(axis=1)
    return (weights * targets[None, :]).sum(axis=1) / total


@dataclass
class StepTeacherWeights:
    """The teacher weights of one optimizer step, for the samples this process trains on."""

    per_sample: np.ndarray | None  # (J, S_local) float32, level `sample`
    per_token: list[torch.Tensor] | None  # (J, N_m) float32 per micro-batch, level `token`
    mean: np.ndarray  # (J,) float64, the step's mean weight per teacher per target token

    def tokens(self, micro: int, first_row: int, target_row: torch.Tensor) -> torch.Tensor:
        """(J, N) weights of each target token of micro-batch `micro`, whose rows start at
        sample `first_row` of this process's share; `target_row` (N,) is each token's row."""
        if self.per_token is not None:
            return self.per_token[micro].to(target_row.device)
        assert self.per_sample is not None
        weights = torch.from_numpy(self.per_sample).to(target_row.device)  # (J, S_local)
        return weights[:, first_row + target_row]


class TeacherReliance:
    """The weight of each teacher per sample or per token, with the controls.

    mode: fixed, softmax or best; level: sample or token; temperature: T > 0 of softmax;
    prior: (J,) the --teacher-weight values (normalised here); control: none, shuffled or
    matched. `shuffled` at level `sample` needs `train_ids` (the training split); `sample` needs
    `sample_nll` (`read_sample_nll`). `sum_across` sums a list of floats over processes (a
    collective; identity on one process): `for_tokens` calls it exactly once per call, in
    every mode, and `for_step` calls `for_tokens` once at the token level of softmax and best,
    so every process must call `for_step` once per step (a padding rank too). `names`: the
    teachers as messages name them (default "teacher 1", ...). Raises ConfigError for a
    prior or temperature the options would refuse, NonFiniteError for a non-finite NLL.
    """

    def __init__(self, mode: str, level: str, temperature: float,
                 prior: Sequence[float] | np.ndarray, *, control: str = "none",
                 train_ids: np.ndarray | None = None, seed: int = 0,
                 sample_nll: SampleNll | None = None,
                 sum_across: Callable[[list[float]], list[float]] | None = None,
                 names: Sequence[str] | None = None) -> None:
        self.prior = _normalised_prior(prior)
        self.teachers = self.prior.size
        self.mode, self.level, self.temperature = mode, level, temperature
        self.control, self.seed = control, seed
        self.sum_across = sum_across or (lambda values: values)
        self.names = list(names) if names is not None else [
            f"teacher {j + 1}" for j in range(self.teachers)]
        if mode == "softmax" and not temperature > 0:
            raise ConfigError(f"--teacher-reliance-temperature {temperature}: must be > 0")
        if level == "sample" and mode != "fixed":
            if sample_nll is None or sample_nll.nll.shape[0] != self.teachers:
                raise ValueError("sample-level teacher reliance needs each teacher's "
                                 "teacher_nll table (read_sample_nll), one row per teacher")
            check_finite(sample_nll.nll, self.names, "teacher_nll of sample",
                         sample_nll.sample_ids)
        self.sample_nll = sample_nll
        self.ids = self.partners = None
        if control == "shuffled" and level == "sample":
            if train_ids is None:
                raise ValueError("the shuffled control needs the training split's sample ids")
            self.ids, self.partners = partner_map(train_ids, seed, stream=_PARTNER_STREAM)

    def for_samples(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        """(S,) sample ids of a global batch at optimizer step `step` → (J, S) float32
        weights, columns summing to 1 (level `sample`, or `fixed` at any level)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        if self.mode == "fixed":
            return teacher_weights(np.zeros((self.teachers, ids.size)), self.prior, "fixed",
                                   self.temperature).astype(np.float32)
        if self.level != "sample" or self.sample_nll is None:
            raise ValueError("for_samples is the sample level; use for_tokens")
        if self.control == "shuffled":
            assert self.ids is not None and self.partners is not None
            ids = partners_of(self.ids, self.partners, ids)
        weights = teacher_weights(self.sample_nll.lookup(ids), self.prior, self.mode,
                                  self.temperature)  # (J, S)
        if self.control == "matched" and ids.size:
            mean = _token_mean(weights, self.sample_nll.targets(ids))
            weights = np.repeat(mean[:, None], ids.size, axis=1)
        return weights.astype(np.float32)

    def for_tokens(self, micro: Sequence[torch.Tensor], step: int,
                   samples: Sequence[np.ndarray] | None = None
                   ) -> tuple[list[torch.Tensor], np.ndarray]:
        """The weights of every target token of this process's micro-batches of one step.

        micro: per micro-batch the (J, N_m) cached target_logprob of each teacher (the log
        p_j of the true token, nats). samples: per micro-batch the (N_m,) sample id of each
        target (needed by the shuffled control, which permutes within each sample). Returns
        per micro-batch (J, N_m) float32 CPU weights, columns summing to 1, and (J,) the
        step's token-weighted mean weight per teacher over every process (`sum_across`: one
        collective per call, whatever the mode).
        """
        if self.control == "shuffled" and (samples is None or len(samples) != len(micro)):
            raise ValueError("the shuffled control needs each target's sample id, per "
                             "micro-batch")
        weights = []
        for m, logprob in enumerate(micro):
            if logprob.ndim != 2 or logprob.shape[0] != self.teachers:
                raise ValueError(f"expected ({self.teachers}, N) target log-probs, got "
                                 f"{tuple(logprob.shape)}")
            nll = -logprob.detach().cpu().double().numpy()  # (J, N_m)
            check_finite(nll, self.names, f"target_logprob of micro-batch {m}, target")
            w = teacher_weights(nll, self.prior, self.mode, self.temperature)  # (J, N_m)
            if self.control == "shuffled":
                assert samples is not None
                w = shuffle_within_samples(w, np.asarray(samples[m], np.int64),
                                           (self.seed, _SALT, step))
            weights.append(w)
        local = [float(v) for v in sum(w.sum(axis=1) for w in weights)] if weights else \
            [0.0] * self.teachers
        totals = self.sum_across(local + [float(sum(w.shape[1] for w in weights))])
        count = totals[-1]
        mean = np.asarray(totals[:-1], np.float64) / count if count else self.prior.copy()
        if self.control == "matched":
            weights = [np.repeat(mean[:, None], w.shape[1], axis=1) for w in weights]
        return [torch.from_numpy(w.astype(np.float32)) for w in weights], mean

    def for_step(self, global_ids: np.ndarray, step: int, micro: Sequence[torch.Tensor],
                 share: RankSlice | None = None, samples: Sequence[np.ndarray] | None = None
                 ) -> StepTeacherWeights:
        """The weights of step `step` over the global batch `global_ids` (S,), of which this
        process trains its `share` (None: all of it, one process) in micro-batches whose
        (J, N_m) target log-probs are `micro` and (N_m,) target sample ids `samples` (both
        read only at the token level). A share that is not real (a padding rank) gets the
        prior but still takes part in the collective."""
        start, count = (0, global_ids.size) if share is None else (share.start,
                                                                     share.sample_ids.size)
        real = share is None or share.real
        if self.mode == "fixed" or self.level == "sample":
            every = self.for_samples(global_ids, step)  # (J, S) the same on every process
            mine = every[:, start:start + count] if real else np.repeat(
                self.prior[:, None], count, axis=1).astype(np.float32)
            if not every.size:
                mean = self.prior.copy()
            elif self.sample_nll is not None:
                mean = _token_mean(every.astype(np.float64), self.sample_nll.targets(global_ids))
            else:  # fixed: every column is the prior
                mean = every.astype(np.float64).mean(axis=1)
            return StepTeacherWeights(mine, None, mean)
        per_token, mean = self.for_tokens(micro if real else [], step,
                                          (samples or []) if real else [])
        return StepTeacherWeights(None, per_token, mean)
