"""A synthetic teacher with a real vocabulary's size, for benchmarks/vocab_bytes.py (its
docstring describes the model): per target position, k candidate ids drawn from a Zipf law
and a power-law distribution over all V ranks, with exact tail masses and entropies.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from kdpipe.schemas.shard_writer import SequenceTargets

C_GRID = 256  # distinct power-law exponents per teacher (exact tails for each)


@dataclass(frozen=True)
class Teacher:
    """How confident the synthetic teacher is: the median and log-normal spread of its
    per-position power-law exponent c, the jitter (sigma of log gap factors) on its top ranks,
    and the Zipf exponent of its candidate ids."""

    c_median: float
    c_spread: float = 0.3
    jitter: float = 0.5
    zipf: float = 1.0


TEACHERS = {"confident": Teacher(2.6), "medium": Teacher(1.8), "flat": Teacher(1.3)}


@dataclass
class Positions:
    """A synthetic teacher's outputs at n target positions."""

    ids: np.ndarray  # (n, k) int64, descending log-prob
    logprobs: np.ndarray  # (n, k) float32, the "float32 teacher"
    tail: np.ndarray  # (n,) float32 log mass outside the top-k
    target_id: np.ndarray  # (n,) int64 the actual next token
    target_logprob: np.ndarray  # (n,) float32
    entropy: np.ndarray  # (n,) float64 nats, over all V ranks


def frequency_ids(vocab: int, rng: np.random.Generator) -> np.ndarray:
    """(V,) id of each frequency rank: roughly increasing, as BPE orders its merges."""
    log_rank = np.log(np.arange(1, vocab + 1))
    return np.argsort(np.argsort(log_rank + rng.normal(0.0, 1.0, vocab)))


def candidate_ids(n: int, k: int, cdf: np.ndarray, id_of_rank: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """(n, k) ids: per position the first k distinct Zipf draws (sampling without
    replacement, in draw order: frequent ids come first more often)."""
    out = np.empty((n, k), dtype=np.int64)
    draws = 4 * k
    for i in range(n):
        while True:
            ranks = np.searchsorted(cdf, rng.random(draws))
            _, first = np.unique(ranks, return_index=True)
            if first.size >= k:
                out[i] = id_of_rank[ranks[np.sort(first)[:k]]]
                break
            draws *= 2
    return out


def draw_positions(n: int, k: int, vocab: int, teacher: Teacher, rng: np.random.Generator
                   ) -> Positions:
    """n positions of the synthetic teacher (module docstring)."""
    id_of_rank = frequency_ids(vocab, rng)
    zipf = np.arange(1, vocab + 1, dtype=np.float64) ** -teacher.zipf
    cdf = np.cumsum(zipf) / zipf.sum()
    cdf[-1] = 1.0
    ids = candidate_ids(n, k, cdf, id_of_rank, rng)  # (n, k) in rank order
    grid = teacher.c_median * np.exp(teacher.c_spread * normal_grid(C_GRID))
    which = rng.integers(0, C_GRID, n)
    c = grid[which]  # (n,)
    r = np.arange(1, k + 1, dtype=np.float64)
    gaps = np.log(r[1:] / r[:-1])[None, :] * c[:, None]  # (n, k-1) exact power-law gaps
    factors = np.exp(teacher.jitter * rng.standard_normal((n, k - 1)) - teacher.jitter ** 2 / 2)
    z = np.concatenate([np.zeros((n, 1)), -np.cumsum(gaps * factors, axis=1)], axis=1)  # (n, k)
    # Ranks beyond k: z_r = z_k - c log(r / k), summed exactly over every rank, per grid value.
    tail_log_sum = np.empty(n)
    tail_wlogw = np.empty(n)  # sum_r w_r log w_r, w_r = (r / k)^-c, for the entropy
    tail_rank_u = rng.random(n)
    tail_rank = np.empty(n, dtype=np.int64)
    log_ratio = np.log(np.arange(k + 1, vocab + 1, dtype=np.float64) / k)  # (V - k,)
    for g in np.unique(which):
        rows = np.flatnonzero(which == g)
        w = np.exp(-grid[g] * log_ratio)
        total = w.sum()
        tail_log_sum[rows] = np.log(total)
        tail_wlogw[rows] = (w * -grid[g] * log_ratio).sum()
        tail_rank[rows] = k + 1 + np.searchsorted(np.cumsum(w) / total, tail_rank_u[rows])
    tail_rank = np.minimum(tail_rank, vocab)
    log_tail = z[:, -1] + tail_log_sum  # (n,)
    log_z = np.logaddexp(np.logaddexp.reduce(z, axis=1), log_tail)
    logprobs = z - log_z[:, None]  # (n, k) float64
    tail = log_tail - log_z
    p_k = np.exp(logprobs[:, -1])
    entropy = (-(np.exp(logprobs) * logprobs).sum(1)
               - p_k * (np.exp(tail_log_sum) * logprobs[:, -1] + tail_wlogw))
    # The actual next token: a top-k rank by its probability, else a rank of the tail.
    u = rng.random(n)
    cum = np.cumsum(np.exp(logprobs), axis=1)
    in_top = u < cum[:, -1]
    rank = np.minimum((cum < u[:, None]).sum(1), k - 1)
    target_id = ids[np.arange(n), rank]
    target_lp = logprobs[np.arange(n), rank]
    tail_rows = np.flatnonzero(~in_top)
    target_lp[tail_rows] = (logprobs[tail_rows, -1]
                            - grid[which[tail_rows]] * np.log(tail_rank[tail_rows] / k))
    for i in tail_rows:  # an id outside the position's top-k
        while (candidate := int(id_of_rank[np.searchsorted(cdf, rng.random())])) in ids[i]:
            pass
        target_id[i] = candidate
    return Positions(ids, logprobs.astype(np.float32), tail.astype(np.float32), target_id,
                     target_lp.astype(np.float32), entropy)


def normal_grid(m: int) -> np.ndarray:
    """(m,) standard normal quantiles at the midpoints of m equal-probability bins."""
    return np.array([NormalDist().inv_cdf((i + 0.5) / m) for i in range(m)])


def sequences_of(positions: Positions, length: int, first_ids: np.ndarray
                 ) -> tuple[list[list[int]], list[SequenceTargets]]:
    """Cut the positions into sequences of `length` tokens (length - 1 targets each)."""
    per = length - 1
    seqs, targets = [], []
    for s in range(positions.ids.shape[0] // per):
        span = slice(s * per, (s + 1) * per)
        tokens = np.concatenate([[first_ids[s]], positions.target_id[span]])
        lp = positions.target_logprob[span]
        targets.append(SequenceTargets(
            topk_ids=positions.ids[span], topk_logprobs=positions.logprobs[span],
            tail_logmass=positions.tail[span], target_logprob=lp, tail_logmass_tempered=None,
            nll=float(-lp.mean()), entropy=float(positions.entropy[span].mean()),
            confidence=float(np.exp(lp).mean()),
            top1=float((positions.ids[span, 0] == positions.target_id[span]).mean())))
        seqs.append(tokens.tolist())
    return seqs, targets
