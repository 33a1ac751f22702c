"""Selective reliance: the KD weight λ of each sample (or token) from its difficulty.

Loss per sample: (1 - λ_i) · CE + λ_i · τ² · KD. With the sample's difficulty percentile
u ∈ [0, 1] (0 = easiest, from the active curriculum's ranking):

* constant:  λ_i = --kd-weight
* threshold: λ_i = λ_hi if u_i > q else λ_lo          (q = --reliance-quantile)
* linear:    λ_i = λ_lo + (λ_hi - λ_lo) · u_i
* token:     λ_t = λ_lo + (λ_hi - λ_lo) · (1 - p_T(y_t)), p_T(y_t) = exp(target_logprob_t)
             from the cache: the student leans on the teacher where the teacher itself is
             unsure of the true token (needs no curriculum).

Controls, to tell selective reliance from its side effects:

* --reliance-control shuffled: the same λ values, given to random samples. A seeded
  permutation π of the training split pairs each sample with a partner; sample i gets the λ
  its partner π(i) would get. Over the split the multiset of λ values is unchanged; their
  link to difficulty is gone. Per token, each sample's λ_t are permuted over that sample's own
  targets (seeded by seed, step and sample id, `shuffle_within_samples`): each sample keeps
  its multiset of λ_t, their link to each token's teacher confidence is gone, and the result
  does not depend on how the global batch is split into micro-batches and processes.
* --kd-weight-schedule linear: λ(t) = λ_lo + (λ_hi - λ_lo) · (t - 1) / (T - 1) for every
  sample of step t (1-based, T total steps): a plain λ warm-up. In a sorted curriculum SR
  raises λ as harder samples arrive, so this is the schedule SR could be mistaken for.
* --kd-weight-schedule matched: every sample of step t gets the mean of the λ values SR would
  give that step's samples (token-weighted for `token`): SR's exact λ-over-time with its
  per-sample selectivity removed.

A sample whose percentile is not known yet (epoch 0 of `--curriculum-source snapshot` without
a file) gets the constant --kd-weight. All functions are deterministic in (seed, step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kdpipe.trainer.data import GlobalBatch
from kdpipe.trainer.distributed import RankSlice

_SALT = 0x72656C79  # separates the controls' RNG streams from the sampler's


class LambdaFn(Protocol):
    def __call__(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        """(S,) float32 λ for each sample of a global batch at optimizer step `step`."""
        ...


class ConstantLambda:
    """The same λ for every sample and step (plain KD)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        return np.full(len(sample_ids), self.value, dtype=np.float32)


@dataclass(frozen=True)
class RelianceMapping:
    """Difficulty → λ: the formulas of the module docstring."""

    mode: str = "constant"
    low: float = 0.1  # λ_lo
    high: float = 0.9  # λ_hi
    quantile: float = 0.5  # q of `threshold`
    constant: float = 0.5  # --kd-weight

    def sample_lambda(self, u: np.ndarray) -> np.ndarray:
        """(S,) percentiles (NaN = unknown) → (S,) float64 λ."""
        u = np.asarray(u, dtype=np.float64)
        if self.mode == "threshold":
            lam = np.where(u > self.quantile, self.high, self.low)
        elif self.mode == "linear":
            lam = self.low + (self.high - self.low) * u
        else:
            lam = np.full(u.shape, self.constant)
        return np.where(np.isnan(u), self.constant, lam)

    def token_lambda(self, target_logprob: torch.Tensor) -> torch.Tensor:
        """(N,) teacher log p_T(y_t) → (N,) float32 λ_t = λ_lo + (λ_hi - λ_lo)(1 - p_T)."""
        uncertainty = 1.0 - torch.exp(target_logprob.double())
        return (self.low + (self.high - self.low) * uncertainty).float()


class PercentileSource(Protocol):
    def percentiles(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        """(S,) difficulty percentile of each sample at optimizer step `step` (NaN: unknown)."""
        ...


def partner_map(train_ids: np.ndarray, seed: int, stream: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their partners): a seeded random permutation of the training split.
    `stream` keeps the permutations of different controls independent (λ: 0)."""
    ids = np.sort(np.asarray(train_ids, dtype=np.int64))
    return ids, np.random.default_rng([seed, _SALT, stream]).permutation(ids)


def partners_of(ids: np.ndarray, partners: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """(S,) the partner of each of `sample_ids` under `partner_map`'s (ids, partners).
    Raises ValueError for a sample outside the training split the map was drawn over."""
    wanted = np.asarray(sample_ids, dtype=np.int64)
    where = np.searchsorted(ids, wanted).clip(max=max(ids.size - 1, 0))
    if wanted.size and (ids.size == 0 or (ids[where] != wanted).any()):
        raise ValueError("the shuffled control got samples outside the training split")
    return partners[where]


def shuffle_within_samples(values: np.ndarray, samples: np.ndarray, key: Sequence[int]
                           ) -> np.ndarray:
    """(..., N) per-target values with each sample's targets permuted among themselves.

    samples: (N,) the sample id of each target. The permutation of sample s is drawn from
    `np.random.default_rng([*key, s])`, so with `key` = (seed, salt, step) a sample's targets
    get the same permutation however the global batch is split into micro-batches and
    processes (the token-level shuffled controls of λ and of the teacher weights). The
    targets of a sample that occurs twice in `samples` are permuted together, as one group.
    Raises ValueError when `samples` is not (N,).
    """
    if samples.shape != (values.shape[-1],):
        raise ValueError(f"expected {values.shape[-1]} target sample ids, got {samples.shape}")
    out = values.copy()
    for sample in np.unique(samples):
        where = np.flatnonzero(samples == sample)  # ascending: the sample's target order
        rng = np.random.default_rng([*key, int(sample)])
        out[..., where] = values[..., where[rng.permutation(where.size)]]
    return out


class SampleReliance:
    """LambdaFn for threshold/linear, with the controls."""

    def __init__(self, mapping: RelianceMapping, source: PercentileSource,
                 train_ids: np.ndarray, seed: int, control: str = "none",
                 schedule: str = "none") -> None:
        self.mapping, self.source, self.control, self.schedule = mapping, source, control, schedule
        self.ids, self.partners = partner_map(train_ids, seed)

    def __call__(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        ids = (partners_of(self.ids, self.partners, sample_ids) if self.control == "shuffled"
               else sample_ids)
        lam = self.mapping.sample_lambda(self.source.percentiles(ids, step))  # (S,)
        if self.schedule == "matched":
            lam = np.full_like(lam, lam.mean())
        return lam.astype(np.float32)


class ScheduledLambda:
    """LambdaFn of `--kd-weight-schedule linear`: λ(t) for all samples of step t."""

    def __init__(self, low: float, high: float, total_steps: int) -> None:
        self.low, self.high, self.total_steps = low, high, total_steps

    def value(self, step: int) -> float:
        frac = min(max(step - 1, 0) / max(self.total_steps - 1, 1), 1.0)
        return self.low + (self.high - self.low) * frac

    def __call__(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        return np.full(len(sample_ids), self.value(step), dtype=np.float32)


# (target_logprob (N_m,), target_row (N_m,), sample_ids (rows,)) of each micro-batch of one
# global batch; target_logprob is None only when the loader was not asked for it (a bug,
# refused).
MicroTargets = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]


class TokenReliance:
    """λ per token from the teacher's uncertainty; also the per-sample means that get logged."""

    def __init__(self, mapping: RelianceMapping, seed: int, control: str = "none",
                 schedule: str = "none",
                 sum_across: Callable[[list[float]], list[float]] | None = None) -> None:
        self.mapping, self.seed, self.control, self.schedule = mapping, seed, control, schedule
        # Sums over processes (distributed runs), so `matched` is the whole global batch's mean.
        self.sum_across = sum_across or (lambda values: values)

    def __call__(self, micro: Sequence[MicroTargets], step: int
                 ) -> tuple[list[torch.Tensor], np.ndarray]:
        """Per micro-batch (N_m,) float32 λ_t, and (S,) the mean λ of each sample's tokens."""
        weights = []
        for target_logprob, row, sample_ids in micro:
            if target_logprob is None:
                raise ValueError("token-level reliance needs the target_logprob column; "
                                 "build the loader's Columns with target_logprob=True")
            lam = self.mapping.token_lambda(target_logprob.cpu())  # (N_m,)
            if self.control == "shuffled":
                samples = sample_ids.cpu().numpy().astype(np.int64)[row.cpu().numpy()]  # (N_m,)
                lam = torch.from_numpy(shuffle_within_samples(
                    lam.numpy(), samples, (self.seed, _SALT, 1, step)))
            weights.append(lam)
        if self.schedule == "matched":
            every = torch.cat(weights) if weights else torch.zeros(0)
            total, count = self.sum_across([float(every.double().sum()), float(every.numel())])
            mean = total / count if count else self.mapping.constant
            weights = [torch.full_like(w, mean) for w in weights]
        means = [sample_means(w, row.cpu(), ids.numel()) for w, (_, row, ids) in
                 zip(weights, micro, strict=True)]
        return weights, (np.concatenate(means) if means else np.zeros(0, np.float32))


def sample_means(token_values: torch.Tensor, target_row: torch.Tensor, rows: int) -> np.ndarray:
    """(N,) per-token values, (N,) row of each token → (rows,) float32 mean per row."""
    sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, target_row,
                                                             token_values.double())
    counts = torch.bincount(target_row, minlength=rows).clamp(min=1)
    return (sums / counts).float().numpy()


@dataclass
class StepLambdas:
    """λ of one optimizer step, for the samples (and tokens) this process trains on."""

    per_sample: np.ndarray  # (S_local,) float32, this process's share of the global batch
    per_token: list[torch.Tensor] | None = None  # token reliance: (N_m,) per micro-batch
    logged: np.ndarray | None = None  # (S,) the global batch's λ; None when it is constant

    @classmethod
    def constant(cls, value: float, samples: int) -> StepLambdas:
        return cls(np.full(samples, value, dtype=np.float32))

    def tokens(self, micro: int, first_row: int, target_row: torch.Tensor) -> torch.Tensor:
        """(N,) λ of each target token of micro-batch `micro`, whose rows start at sample
        `first_row` of this process's share; `target_row` (N,) is each token's row."""
        if self.per_token is not None:
            return self.per_token[micro].to(target_row.device)
        lam = torch.from_numpy(np.asarray(self.per_sample, dtype=np.float32))  # (S_local,)
        return lam.to(target_row.device)[first_row + target_row]


class Reliance:
    """The one source of λ: each step's per-sample (and per-token) weights, whatever the mode.

    `per_sample` gives the global batch's λ by sample (constant, scheduled or selective);
    `per_token`, when set, replaces it by token-level reliance (the per-sample λ logged are
    then each sample's mean). `gather` concatenates every process's (S_local,) values in rank
    order (identity on one process).
    """

    def __init__(self, per_sample: LambdaFn, per_token: TokenReliance | None = None,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.per_sample, self.per_token = per_sample, per_token
        self.gather = gather or (lambda values: values)
        self.varies = per_token is not None or not isinstance(per_sample, ConstantLambda)

    def for_step(self, global_ids: np.ndarray, step: int, batch: GlobalBatch,
                 share: RankSlice | None = None) -> StepLambdas:
        """λ for optimizer step `step` over the global batch `global_ids` (S,), of which this
        process trains `batch`, its `share` (None: the whole batch, one process). A share
        that is not real (a padding rank) gets λ 0 but still takes part in the collectives."""
        start, count = (0, global_ids.size) if share is None else (share.start,
                                                                     share.sample_ids.size)
        real = share is None or share.real
        if self.per_token is None:
            lam = self.per_sample(global_ids, step)  # (S,) the same on every process
            mine = lam[start:start + count] if real else np.zeros(count, np.float32)
            return StepLambdas(mine, None, lam if self.varies else None)
        micro = [(mb.target_logprob, mb.target_row, mb.sample_ids)
                 for mb in batch.micro] if real else []
        weights, means = self.per_token(micro, step)  # collective under `matched`
        mine = means if real else np.zeros(count, np.float32)
        return StepLambdas(mine, weights, self.gather(means))
