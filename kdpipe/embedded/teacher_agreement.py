"""How much two teachers disagree, read from their aligned top-k caches (no model is run).

Per target position t, with teacher A's cached top-k set S_A(t), log-probs log p_A and tail
mass T_A = 1 − Σ_{i∈S_A} p_A(i), and likewise for B:

* NLL of each teacher: −log p(true next token), the cached `target_logprob`;
* top-1 agreement: 1[argmax p_A = argmax p_B] (the first entry of each top-k);
* KL(A‖B) on A's top-k + tail partition, the partition `--loss forward` distils on:
  Σ_{i∈S_A} p_A(i) log(p_A(i) / q(i)) + T_A log(T_A / (1 − Σ_{i∈S_A} q(i))), where
  q(i) = p_B(i) for i ∈ S_B and, since B's cache keeps no more, B's tail mass spread evenly over
  the ids it leaves out, T_B / (V − k), otherwise (V: the vocabulary). An approximation of
  the full-vocabulary KL(p_A‖p_B) from what the caches hold: exact on A's top-k when B's
  top-k contains it, and merging the rest into one bin can only lower it (log-sum
  inequality), up to the uniform guess.

Every number is a mean over target positions. The caches must hold the same sequences
(`schemas.cache_alignment`, as training with several teachers checks them) in the same row
groups, as `prepare(..., second_teacher=...)` makes them; anything else is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.cache_alignment import alignment_difference
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.shard import SAMPLE_ID
from kdpipe.schemas.shard_reader import RowGroup, build_index, columns_for, decode_row_group

TINY = 1e-30  # floor of a probability under a log: a bin B gives no mass costs log(1/TINY)


@dataclass(frozen=True)
class TeacherAgreement:
    """Means over `positions` target positions (nats per token for NLL and KL)."""

    positions: int
    nll_a: float
    nll_b: float
    top1_agreement: float
    kl_a_b: float


def _positions_kl(a: RowGroup, b: RowGroup, k: int, vocab: int) -> np.ndarray:
    """(targets,) KL(A‖B) on A's top-k + tail partition (module docstring)."""
    assert a.topk_ids is not None and a.topk_logprobs is not None
    assert b.topk_ids is not None and b.topk_logprobs is not None
    assert a.tail_logmass is not None and b.tail_logmass is not None
    ids_a, ids_b = a.topk_ids.reshape(-1, k), b.topk_ids.reshape(-1, k)  # (n, k)
    logp_a = a.topk_logprobs.reshape(-1, k).astype(np.float64)  # (n, k)
    p_b = np.exp(b.topk_logprobs.reshape(-1, k).astype(np.float64))  # (n, k)
    match = ids_a[:, :, None] == ids_b[:, None, :]  # (n, k, k): A's i-th id is B's j-th
    spread = np.exp(b.tail_logmass.astype(np.float64)) / max(vocab - k, 1)  # (n,)
    q = np.where(match.any(axis=2), (match * p_b[:, None, :]).sum(axis=2), spread[:, None])
    p_a = np.exp(logp_a)
    with np.errstate(divide="ignore"):
        inside = np.where(p_a > 0, p_a * (logp_a - np.log(np.maximum(q, TINY))), 0.0)
        tail_a = np.exp(a.tail_logmass.astype(np.float64))  # (n,)
        tail_q = np.maximum(1.0 - q.sum(axis=1), TINY)
        outside = np.where(tail_a > 0, tail_a * (np.log(np.maximum(tail_a, TINY))
                                                 - np.log(tail_q)), 0.0)
    return inside.sum(axis=1) + outside


def compare_teachers(cache_a: Path, cache_b: Path,
                     sample_range: tuple[int, int] | None = None) -> TeacherAgreement:
    """Compare two aligned top-k caches, over every target position or those of the samples
    with `sample_range[0] <= sample_id < sample_range[1]`.

    Raises ConfigError when the caches differ in k, vocabulary, sequences or target
    positions, or when no position is compared.
    """
    a, b = open_cache(cache_a), open_cache(cache_b)
    ma, mb = a.manifest, b.manifest
    if (ma.top_k, ma.vocab_size) != (mb.top_k, mb.vocab_size):
        raise ConfigError(f"{cache_b} does not hold {cache_a}'s sequences at its k and "
                          "vocabulary; cache both teachers over the same data and --top-k")
    difference = alignment_difference(build_index(a), build_index(b))
    if difference is not None:
        raise ConfigError(f"{cache_a} and {cache_b} hold different sequences ({difference}); "
                          "cache both over the same data")
    cols_a = columns_for(a, teacher=True, temperature=1.0, target_logprob=True)
    cols_b = columns_for(b, teacher=True, temperature=1.0, target_logprob=True)
    sums = np.zeros(4)  # nll_a, nll_b, top-1 agreements, kl
    count = 0
    for table_a, table_b in zip(a.iter_row_groups(cols_a.names), b.iter_row_groups(cols_b.names),
                                strict=True):
        ids = table_a.column(SAMPLE_ID).to_numpy()
        if not np.array_equal(ids, table_b.column(SAMPLE_ID).to_numpy()):
            raise ConfigError(f"{cache_a} and {cache_b} hold the same sequences in other row "
                              "groups; cache both with the same --shard-size")
        ga, gb = decode_row_group(table_a, cols_a), decode_row_group(table_b, cols_b)
        keep = np.repeat(np.ones(ids.size, bool) if sample_range is None else
                         (ids >= sample_range[0]) & (ids < sample_range[1]),
                         np.diff(ga.target_offsets))  # (targets,)
        assert ga.target_logprob is not None and gb.target_logprob is not None
        assert ga.topk_ids is not None and gb.topk_ids is not None
        k = ma.top_k
        top1 = ga.topk_ids.reshape(-1, k)[:, 0] == gb.topk_ids.reshape(-1, k)[:, 0]
        kl = _positions_kl(ga, gb, k, ma.vocab_size)
        sums += [-ga.target_logprob[keep].astype(np.float64).sum(),
                 -gb.target_logprob[keep].astype(np.float64).sum(), top1[keep].sum(),
                 kl[keep].sum()]
        count += int(keep.sum())
    if count == 0:
        raise ConfigError(f"no target position of {cache_a} to compare"
                          + ("" if sample_range is None else f" in samples {sample_range}"))
    mean = sums / count
    return TeacherAgreement(positions=count, nll_a=float(mean[0]), nll_b=float(mean[1]),
                            top1_agreement=float(mean[2]), kl_a_b=float(mean[3]))
