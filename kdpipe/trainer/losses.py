"""Divergences between teacher and student on the cached partition: the k cached ids + one tail.

The cache stores, per target token, the teacher's top-k ids K, their log-probs l_j (raw
log-softmax at τ = 1) and the log of the mass outside K. Every loss here works on the
partition K ∪ {tail}: the teacher's and the student's distributions are both collapsed to
k + 1 outcomes, and the divergence is taken between those two (k + 1)-point distributions.

* forward KL(p || q) on the partition is the *exact* forward KL of the bucketed
  distributions; with k = V it equals dense KL (tested to float precision; docs/training.md).
  It is the default.
* `zero` drops the tail and renormalises both sides over K (what other trainers do by
  default). It is biased — it rewards the student for putting no mass on tail tokens — and
  kept only for comparison.
* reverse KL, JSD(β), skew KL and TVD are exact divergences *of the partitioned
  distributions*, which differ from the divergences of the full distributions unless k = V
  (for them the tail bucket is not a sufficient statistic).

Everything is computed in (at least) float32 and in log space; outcomes with zero mass
contribute exactly 0 to values and gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdpipe.trainer.loss_config import LOSSES, SAMPLED

_NEG_INF = float("-inf")


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 inputs stay float64, which the tests use as a reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler 2012); -inf at x = 0."""
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2.0)
    # Each branch is finite where it is selected; clamp the other so no NaN is ever produced.
    a = torch.log(-torch.expm1(x.clamp(min=-math.log(2.0))))
    b = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(near_zero, a, b)


def _normalise(log_k: Tensor, log_tail: Tensor) -> tuple[Tensor, Tensor]:
    """Renormalise the (k + 1)-point partition in log space so its mass is exactly 1."""
    lse = torch.logsumexp(torch.cat([log_k, log_tail.unsqueeze(-1)], dim=-1), dim=-1)  # (N,)
    return log_k - lse.unsqueeze(-1), log_tail - lse


def teacher_partition(
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    temperature: float,
    vocab_size: int,
    tempered_tail_logmass: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher log p^τ on the k cached ids (N, k) and on the tail bucket (N,).

    topk_logprobs (N, k): raw log-softmax at τ = 1 (float16 or float32 in the cache).
    tail_logmass (N,): log of the τ = 1 mass outside K (-inf when k = V).
    tempered_tail_logmass (N,): the exact log tail mass of softmax(z / τ) at this τ, when the
    cache stored it. Without it, τ ≠ 1 uses the documented *uniform approximation*: the τ = 1
    tail mass r is spread evenly over the V - k ids outside K, so
    log Σ_{i∉K} exp(l_i / τ) ≈ log(V - k) + (log r - log(V - k)) / τ.
    `vocab_size` is the support of the cached distribution: the tokenizer's real ids
    (manifest.vocab_size).
    """
    k = topk_logprobs.shape[-1]
    if k > vocab_size:
        raise ValueError(f"top-k width {k} exceeds the teacher vocab_size {vocab_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = _upcast(topk_logprobs)  # (N, k)
    tail = _upcast(tail_logmass).to(logp.dtype)  # (N,)
    if temperature == 1.0:
        return _normalise(logp, tail)
    scaled = logp / temperature  # (N, k)
    if tempered_tail_logmass is not None:
        tail_t = _upcast(tempered_tail_logmass).to(logp.dtype).clamp(max=0.0)  # (N,)
        log_top = _log1mexp(tail_t)  # log of the tempered mass on K
        log_k = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True) + log_top.unsqueeze(-1)
        return _normalise(log_k, tail_t)
    rest = vocab_size - k
    if rest == 0:
        return _normalise(scaled, torch.full_like(tail, _NEG_INF))
    log_rest = math.log(rest)
    tail_t = log_rest + (tail - log_rest) / temperature  # -inf stays -inf
    return _normalise(scaled, tail_t)


def student_partition(
    logits: Tensor, topk_ids: Tensor, temperature: float, lse: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Student log q^τ on the ids K (N, k) and on everything else (N,), from logits (N, V).

    `logits` cover the tokenizer's real ids only (the caller drops a padded head's extra
    rows), so the student's distribution has the teacher's support. log q_tail is a
    logsumexp over the non-K logits minus the
    full logsumexp — never log(1 - Σ q_j), which cancels catastrophically when the student is
    confident. `topk_ids` holds distinct ids (N, k), int64. `lse` (N,): the logsumexp of
    `logits / temperature` when the caller already has it (the CE term at τ = 1).
    """
    z = _upcast(logits)  # (N, V)
    if temperature != 1.0:  # no (N, V) copy at τ = 1
        z = z / temperature
    ids = topk_ids.long()
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)  # (N,)
    log_q = z.gather(-1, ids) - lse.unsqueeze(-1)  # (N, k)
    if ids.shape[-1] < z.shape[-1]:  # k distinct ids < V: every row keeps a tail
        return log_q, torch.logsumexp(z.scatter(-1, ids, _NEG_INF), dim=-1) - lse
    in_k = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, True)  # (N, V)
    # A row whose every id is in K has an empty tail: log q_tail = -inf. A logsumexp over all
    # -inf back-propagates NaN (masked_fill would zero it again, but anomaly detection and any
    # later change would trip on it), so such rows are computed unmasked and then replaced.
    empty = in_k.all(dim=-1)  # (N,)
    masked = z.masked_fill(in_k & ~empty.unsqueeze(-1), _NEG_INF)
    log_q_tail = torch.logsumexp(masked, dim=-1).masked_fill(empty, _NEG_INF) - lse  # (N,)
    return log_q, log_q_tail


def sampled_cross_entropy(log_q_ids: Tensor, weights: Tensor) -> Tensor:
    """Per-token -Σ_j (c_j / N) log q(j) over the ids drawn from the teacher (N,).

    log_q_ids (N, S): student log-probs (τ = 1) at the unique sampled ids; weights (N, S):
    c_j / N, 0 at padding. With the ids drawn from p, E[c_j / N] = p_j, so this is an
    unbiased estimate of the cross-entropy H(p, q) = KL(p || q) + H(p): its gradient is that
    of forward KL to the *full* teacher distribution, with no top-k truncation.
    """
    lq = _upcast(log_q_ids)
    return -(weights.to(lq.dtype) * lq).sum(dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a (log a - log b) over the last dim; outcomes with a = 0 give exactly 0, grads too.

    A NaN in `log_a` is kept (NaN != 0), so that a bad input surfaces as a non-finite loss
    rather than as a KD term of 0."""
    support = log_a.exp() != 0  # a underflowing float32 counts as 0 too (its term is 0 anyway)
    la = log_a.masked_fill(~support, 0.0)
    lb = log_b.masked_fill(~support, 0.0)
    terms = la.exp() * (la - lb)
    return torch.where(support, terms, torch.zeros_like(terms)).sum(dim=-1)


def _log_mix(weight: float, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(w a + (1 - w) b), elementwise; gradient-safe where both a and b are 0."""
    wa = log_a + math.log(weight) if weight > 0 else torch.full_like(log_a, _NEG_INF)
    wb = log_b + math.log1p(-weight) if weight < 1 else torch.full_like(log_b, _NEG_INF)
    both_zero = torch.isneginf(wa) & torch.isneginf(wb)
    mixed = torch.logaddexp(wa.masked_fill(both_zero, 0.0), wb.masked_fill(both_zero, 0.0))
    return mixed.masked_fill(both_zero, _NEG_INF)


def divergence(
    kind: str,
    log_p: Tensor,
    log_p_tail: Tensor,
    log_q: Tensor,
    log_q_tail: Tensor,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-token divergence (N,) between teacher p and student q on the partition K ∪ {tail}.

    log_p, log_q (N, k); log_p_tail, log_q_tail (N,). Kinds (see LOSSES):
    * forward: KL(p || q) = Σ_j p_j (log p_j - log q_j) + r (log r - log q_tail). Exact on the
      partition, equal to dense KL when k = V.
    * zero: KL of p and q each renormalised over K, tail dropped. Biased; for comparison only.
    * reverse: KL(q || p) on the partition (+inf where the teacher puts zero mass on an outcome
      the student does not, e.g. a wider student head against a k = V cache).
    * jsd: generalised JSD(β) = β KL(p || m) + (1 - β) KL(q || m) with m = β p + (1 - β) q,
      0 < β < 1 (TRL's GKD convention; β = 0.5 is the symmetric JSD).
    * skew: KL(p || α p + (1 - α) q), 0 <= α <= 1 (α = 0 is forward KL).
    * tvd: ½ Σ |p - q| over the k + 1 outcomes.
    reverse, jsd, skew and tvd are exact for the partitioned distributions only.
    """
    lp = torch.cat([log_p, log_p_tail.unsqueeze(-1)], dim=-1)  # (N, k + 1)
    lq = torch.cat([log_q, log_q_tail.unsqueeze(-1)], dim=-1)  # (N, k + 1)
    dtype = torch.promote_types(torch.promote_types(lp.dtype, lq.dtype), torch.float32)
    lp, lq = lp.to(dtype), lq.to(dtype)
    if kind == "forward":
        return _kl(lp, lq)
    if kind == "zero":
        top_p = log_p.to(dtype) - torch.logsumexp(log_p.to(dtype), dim=-1, keepdim=True)
        top_q = log_q.to(dtype) - torch.logsumexp(log_q.to(dtype), dim=-1, keepdim=True)
        return _kl(top_p, top_q)
    if kind == "reverse":
        return _kl(lq, lp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = _log_mix(beta, lp, lq)
        return beta * _kl(lp, log_m) + (1.0 - beta) * _kl(lq, log_m)
    if kind == "skew":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"skew needs 0 <= alpha <= 1, got {alpha}")
        return _kl(lp, _log_mix(alpha, lp, lq))
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(dim=-1)
    if kind == SAMPLED:
        raise ValueError("the sampled loss is not a divergence on the top-k partition; use "
                         "sampled_cross_entropy")
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(LOSSES)}")
