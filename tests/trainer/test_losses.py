"""The divergences on the cached partition against naive float64 references.

References are written independently of the code under test: full teacher and student
distributions in float64, the partition built with explicit Python loops, each divergence
from its textbook definition. Values *and* gradients w.r.t. the student logits are compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.trainer.losses import LOSSES, divergence, student_partition, teacher_partition

BETA, ALPHA = 0.3, 0.2


def make_teacher(n: int, vocab: int, k: int, seed: int = 0, scale: float = 3.0):
    """Random teacher logits and what the cache stores for them (float32, like a shard)."""
    gen = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale  # (N, V)
    logp = torch.log_softmax(zt, dim=-1)
    vals, ids = logp.topk(k, dim=-1)  # (N, k), descending
    tail = tail_logmass_of(logp, ids)  # (N,)
    return zt, ids, vals.float(), tail.float()


def tail_logmass_of(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{i∉K} p_i from full log-probs (N, V): what the cache writer computes exactly."""
    mask = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    return torch.logsumexp(logp.masked_fill(mask, float("-inf")), dim=-1)


def student_logits(n: int, vocab: int, seed: int = 1, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=gen) * scale).requires_grad_(True)


def naive_partition(probs: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(V,) float64 probabilities -> (k + 1,) [p_j for j in K] + [Σ_{i∉K} p_i], by loops."""
    chosen = set(ids)
    tail = sum((probs[i] for i in range(probs.shape[0]) if i not in chosen),
               start=torch.zeros((), dtype=probs.dtype))
    return torch.stack([probs[j] for j in ids] + [tail])


def naive_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            total = total + pi * (torch.log(pi) - torch.log(qi))
    return total


def naive_divergence(kind: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Textbook definitions on one token's (k + 1)-point distributions (tail last)."""
    if kind == "forward":
        return naive_kl(p, q)
    if kind == "zero":
        return naive_kl(p[:-1] / p[:-1].sum(), q[:-1] / q[:-1].sum())
    if kind == "reverse":
        return naive_kl(q, p)
    if kind == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * naive_kl(p, m) + (1 - BETA) * naive_kl(q, m)
    if kind == "skew":
        return naive_kl(p, ALPHA * p + (1 - ALPHA) * q)
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    raise AssertionError(kind)


def reference(kind: str, teacher_probs: torch.Tensor, zs: torch.Tensor, ids: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """Per-token reference (N,) in float64, differentiable w.r.t. the student logits zs."""
    q_full = torch.softmax(zs.double() / temperature, dim=-1)  # (N, V_s)
    out = []
    for n in range(zs.shape[0]):
        row = ids[n].tolist()
        out.append(naive_divergence(kind, naive_partition(teacher_probs[n], row),
                                    naive_partition(q_full[n], row)))
    return torch.stack(out)


def ours(kind: str, ids, vals, tail, zs, vocab, temperature=1.0, tempered=None):
    log_p, log_p_tail = teacher_partition(vals, tail, temperature, vocab, tempered)
    log_q, log_q_tail = student_partition(zs, ids, temperature)
    return divergence(kind, log_p, log_p_tail, log_q, log_q_tail, beta=BETA, alpha=ALPHA)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


# --- forward KL: the default ---------------------------------------------------------------

def test_forward_with_k_equal_v_is_dense_kl():
    n, vocab = 6, 40
    zt, ids, vals, tail = make_teacher(n, vocab, vocab)
    assert torch.isneginf(tail).all()
    zs = student_logits(n, vocab)
    got = ours("forward", ids, vals, tail, zs, vocab)
    zs64 = zs.detach().double().requires_grad_(True)
    p = torch.softmax(zt, -1)
    dense = (p * (torch.log_softmax(zt, -1) - torch.log_softmax(zs64, -1))).sum(-1)
    torch.testing.assert_close(got.double(), dense.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_of(got, zs).double(), grad_of(dense, zs64),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("k", [1, 5, 39])
def test_partition_divergences_match_naive_reference(kind, k):
    n, vocab = 5, 40
    zt, ids, vals, tail = make_teacher(n, vocab, k, seed=k)
    zs = student_logits(n, vocab, seed=k + 1)
    got = ours(kind, ids, vals, tail, zs, vocab)
    zs64 = zs.detach().double().requires_grad_(True)
    ref = reference(kind, torch.softmax(zt, -1), zs64, ids)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad_of(got, zs).double(), grad_of(ref, zs64),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", LOSSES)
def test_with_k_equal_v_every_kind_is_its_dense_definition(kind):
    n, vocab = 4, 24
    zt, ids, vals, tail = make_teacher(n, vocab, vocab, seed=3)
    zs = student_logits(n, vocab, seed=4)
    got = ours(kind, ids, vals, tail, zs, vocab)
    p = torch.softmax(zt, -1)
    q = torch.softmax(zs.detach().double(), -1)
    dense = torch.stack([naive_divergence(kind, torch.cat([p[i], p.new_zeros(1)]),
                                          torch.cat([q[i], q.new_zeros(1)]))
                         for i in range(n)])
    torch.testing.assert_close(got.double(), dense, atol=2e-6, rtol=1e-5)
    assert torch.isfinite(grad_of(got, zs)).all()


def test_float16_logprobs_are_renormalised_to_mass_one():
    zt, ids, vals, tail = make_teacher(8, 300, 20, seed=5)
    log_p, log_p_tail = teacher_partition(vals.half(), tail, 1.0, 300)
    assert log_p.dtype == torch.float32
    mass = torch.logsumexp(torch.cat([log_p, log_p_tail[:, None]], -1), -1)
    torch.testing.assert_close(mass, torch.zeros(8), atol=1e-6, rtol=0)
    raw = torch.logsumexp(torch.cat([vals.half().float(), tail[:, None]], -1), -1)
    assert raw.abs().max() > 1e-5  # float16 rounding really did leave mass != 1


def test_divergences_are_zero_when_student_equals_teacher():
    zt, ids, vals, tail = make_teacher(4, 30, 6, seed=6)
    zs = zt.float().clone().requires_grad_(True)
    for kind in LOSSES:
        torch.testing.assert_close(ours(kind, ids, vals, tail, zs, 30), torch.zeros(4),
                                   atol=1e-6, rtol=0)


# --- temperature ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("k", [5, 30])
def test_exact_tempered_tail_matches_dense_tempered_partition(temperature, k):
    n, vocab = 5, 30
    zt, ids, vals, tail = make_teacher(n, vocab, k, seed=7)
    tempered = tail_logmass_of(torch.log_softmax(zt / temperature, -1), ids).float()
    log_p, log_p_tail = teacher_partition(vals, tail, temperature, vocab, tempered)
    p_tau = torch.softmax(zt / temperature, -1)
    expected = torch.stack([naive_partition(p_tau[i], ids[i].tolist()) for i in range(n)])
    got = torch.cat([log_p, log_p_tail[:, None]], -1).exp().double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # and the KD term against the dense tempered student, values and gradients
    zs = student_logits(n, vocab, seed=8)
    loss = ours("forward", ids, vals, tail, zs, vocab, temperature, tempered)
    zs64 = zs.detach().double().requires_grad_(True)
    ref = reference("forward", p_tau, zs64, ids, temperature)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad_of(loss, zs).double(), grad_of(ref, zs64),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_uniform_tail_approximation_is_its_formula(temperature):
    n, vocab, k = 4, 50, 7
    _, ids, vals, tail = make_teacher(n, vocab, k, seed=9)
    log_p, log_p_tail = teacher_partition(vals, tail, temperature, vocab)
    for i in range(n):
        scaled = [v / temperature for v in vals[i].double().tolist()]
        rest = vocab - k
        tail_t = math.log(rest) + (float(tail[i]) - math.log(rest)) / temperature
        norm = math.log(sum(math.exp(s) for s in scaled) + math.exp(tail_t))
        expected = [s - norm for s in scaled] + [tail_t - norm]
        got = log_p[i].tolist() + [float(log_p_tail[i])]
        assert got == pytest.approx(expected, abs=2e-6)


def test_uniform_approximation_is_exact_for_a_uniform_tail():
    n, vocab, k, temperature = 3, 40, 5, 2.5
    zt = torch.zeros(n, vocab, dtype=torch.float64)
    zt[:, :k] = torch.tensor([6.0, 4.0, 3.0, 2.5, 1.0], dtype=torch.float64)
    logp = torch.log_softmax(zt, -1)
    vals, ids = logp.topk(k, -1)
    tail = tail_logmass_of(logp, ids).float()
    exact = tail_logmass_of(torch.log_softmax(zt / temperature, -1), ids).float()
    approx = teacher_partition(vals.float(), tail, temperature, vocab)
    with_exact = teacher_partition(vals.float(), tail, temperature, vocab, exact)
    for a, b in zip(approx, with_exact, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_temperature_with_k_equal_v_needs_no_tail():
    zt, ids, vals, tail = make_teacher(3, 20, 20, seed=10)
    for tempered in (None, torch.full((3,), float("-inf"))):
        log_p, log_p_tail = teacher_partition(vals, tail, 2.0, 20, tempered)
        assert torch.isneginf(log_p_tail).all()
        expected = torch.log_softmax(zt / 2.0, -1).gather(-1, ids)
        torch.testing.assert_close(log_p.double(), expected, atol=1e-6, rtol=1e-6)


# --- numerics: confident student, zero-mass outcomes, wide heads -----------------------------

def test_confident_student_tail_is_accurate():
    n, vocab, k = 3, 1000, 4
    _, ids, _, _ = make_teacher(n, vocab, k, seed=11)
    zs = torch.zeros(n, vocab)
    zs.scatter_(-1, ids[:, :1], 50.0)  # logit gap 50 on the teacher's top-1
    zs.requires_grad_(True)
    log_q, log_q_tail = student_partition(zs, ids, 1.0)
    z64 = zs.detach().double()
    expected = math.log(vocab - k) - torch.logsumexp(z64, -1)  # all tail logits are 0
    torch.testing.assert_close(log_q_tail.double(), expected, atol=0, rtol=1e-6)
    assert float(log_q_tail[0].detach()) == pytest.approx(math.log(996) - 50, abs=1e-4)
    # the catastrophic way: 1 - Σ q in float32 is exactly 0 here
    naive = torch.log1p(-log_q.exp().sum(-1))
    assert torch.isneginf(naive).all()
    assert torch.isfinite(grad_of(log_q_tail, zs)).all()


def test_zero_teacher_mass_gives_finite_loss_and_grads():
    n, vocab = 4, 16
    zt = torch.randn(n, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    zt[:, -5:] = float("-inf")  # masked ids: p = 0, and with k = V the tail is empty too
    logp = torch.log_softmax(zt, -1)
    vals, ids = logp.topk(vocab, -1)
    tail = tail_logmass_of(logp, ids).float()
    assert torch.isneginf(vals).any() and torch.isneginf(tail).all()
    zs = student_logits(n, vocab, seed=13)
    for kind in LOSSES:
        loss = ours(kind, ids, vals.float(), tail, zs, vocab)
        grad = grad_of(loss, zs)
        if kind == "reverse":  # KL(q || p) is truly infinite where p = 0 < q: documented
            assert torch.isposinf(loss).all()
            continue
        assert torch.isfinite(loss).all(), kind
        assert torch.isfinite(grad).all(), kind
    # forward KL with p = 0 entries is still dense KL
    dense = torch.special.xlogy(logp.exp(), logp.exp()).sum(-1) - (
        logp.exp() * torch.log_softmax(zs.detach().double(), -1)).sum(-1)
    got = ours("forward", ids, vals.float(), tail, zs, vocab)
    torch.testing.assert_close(got.double(), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", LOSSES)
def test_nan_inputs_give_a_nan_loss_not_zero(kind):
    """A NaN teacher log-prob (or one from a τ so small that logits overflow) must surface as
    a non-finite loss, which training and evaluation stop on, never as a KD term of 0."""
    n, vocab, k = 3, 16, 4
    logp = torch.log_softmax(torch.randn(n, vocab, dtype=torch.float64), -1)
    vals, ids = logp.topk(k, -1)
    tail = tail_logmass_of(logp, ids).float()
    vals = vals.float()
    vals[1] = float("nan")
    loss = ours(kind, ids, vals, tail, student_logits(n, vocab, seed=3), vocab)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), kind


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("kind", LOSSES)
def test_empty_student_tail_with_k_equal_v_has_finite_grads(kind):
    zt, ids, vals, tail = make_teacher(3, 12, 12, seed=14)
    zs = student_logits(3, 12, seed=15)
    _, log_q_tail = student_partition(zs, ids, 1.0)
    assert torch.isneginf(log_q_tail).all()
    with torch.autograd.detect_anomaly():  # no NaN anywhere in backward, not even masked
        loss = ours(kind, ids, vals, tail, zs, 12)
        assert torch.isfinite(loss).all()
        assert torch.isfinite(grad_of(loss, zs)).all()


@pytest.mark.parametrize("kind", ["forward", "jsd", "tvd"])
@pytest.mark.parametrize("k", [4, 30])
def test_student_head_wider_than_teacher_vocab(kind, k):
    n, vocab, padded = 4, 30, 38  # the student head has 8 extra (padding) rows
    zt, ids, vals, tail = make_teacher(n, vocab, k, seed=16)
    zs = student_logits(n, padded, seed=17)
    got = ours(kind, ids, vals, tail, zs, vocab)
    zs64 = zs.detach().double().requires_grad_(True)
    p = torch.cat([torch.softmax(zt, -1), torch.zeros(n, padded - vocab, dtype=torch.float64)],
                  dim=-1)
    ref = reference(kind, p, zs64, ids)
    torch.testing.assert_close(got.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad_of(got, zs).double(), grad_of(ref, zs64),
                               atol=2e-6, rtol=1e-5)


def test_inputs_are_upcast_and_bad_arguments_are_rejected():
    _, ids, vals, tail = make_teacher(2, 10, 3, seed=18)
    zs = student_logits(2, 10).detach().to(torch.bfloat16)
    log_q, log_q_tail = student_partition(zs, ids, 1.0)
    assert log_q.dtype == log_q_tail.dtype == torch.float32
    log_p, log_p_tail = teacher_partition(vals, tail, 1.0, 10)
    with pytest.raises(ValueError, match="unknown loss kind"):
        divergence("kl", log_p, log_p_tail, log_q, log_q_tail)
    with pytest.raises(ValueError, match="beta"):
        divergence("jsd", log_p, log_p_tail, log_q, log_q_tail, beta=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        teacher_partition(vals, tail, 1.0, 2)
