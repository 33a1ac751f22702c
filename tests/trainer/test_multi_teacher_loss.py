"""The loss with several teachers: (1 - λ) CE + λ τ² Σ_j w_j KD_j, each KD_j on teacher j's own
partition, on both paths (fused, checkpointed autograd), against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from kdpipe.trainer.chunked_loss import TeacherTargets, chunked_distill_loss
from kdpipe.trainer.loss_config import SAMPLED, LossConfig
from kdpipe.trainer.losses import (
    divergence,
    sampled_cross_entropy,
    student_partition,
    teacher_partition,
)

from .test_fused_head import K, N, V, make, teacher_targets


def mix_weights(teachers: int, n: int, seed: int) -> torch.Tensor:
    """(J, N) random per-token weights, each column summing to 1 (one token all teacher 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(teachers, n, generator=gen)
    w[:, 0] = torch.tensor([1.0] + [0.0] * (teachers - 1))
    return w / w.sum(0, keepdim=True)


def teacher_kd(z: torch.Tensor, teacher: TeacherTargets, cfg: LossConfig, kind: str
               ) -> torch.Tensor:
    """(N,) KD against one teacher on float64 logits z, by losses.py's definitions."""
    if teacher.is_sampled:
        return sampled_cross_entropy(torch.log_softmax(z, -1).gather(-1, teacher.sampled_ids),
                                     teacher.sampled_weights)
    tempered = teacher.tempered_tail_logmass if cfg.temperature != 1.0 else None
    log_p, log_p_tail = teacher_partition(teacher.topk_logprobs, teacher.tail_logmass,
                                          cfg.temperature, V, tempered)
    log_q, log_q_tail = student_partition(z, teacher.topk_ids, cfg.temperature)
    return divergence(kind, log_p, log_p_tail, log_q, log_q_tail, cfg.beta, cfg.alpha)


def reference(hidden, head, labels, lam, cfg, kind, teachers, weights):  # type: ignore[no-untyped-def]
    """(total, Σ_n Σ_j w_jn KD_jn, [Σ_n KD_jn]) on dense float64 logits."""
    z = F.linear(hidden.double(), head.weight.double(), head.bias.double())[:, :V]
    ce = F.cross_entropy(z, labels, reduction="none")
    kds = [teacher_kd(z, t, cfg, kind) for t in teachers]
    kd = sum(w.double() * kd_j for w, kd_j in zip(weights, kds, strict=True))
    scale = 1.0 if kind == SAMPLED else cfg.temperature**2
    lam64 = lam.double()
    total = ((1 - lam64) * ce + lam64 * scale * kd).sum()
    return total, kd.detach().sum(), [kd_j.detach().sum() for kd_j in kds]


CASES = [("forward", 1.0, False), ("forward", 2.0, True), ("forward", 0.5, False),
         (SAMPLED, 1.0, False), ("jsd", 1.0, False), ("reverse", 2.0, True)]


# (path, case): the fused path computes forward KL and the sampled loss only
PATHS = [("autograd", case) for case in CASES] + [("fused", case) for case in CASES
                                                  if case[0] in ("forward", SAMPLED)]


@pytest.mark.parametrize(("path", "case"), PATHS)
@pytest.mark.parametrize("teachers", [2, 3])
def test_several_teachers_equal_a_float64_reference(path, case, teachers):
    kind, temperature, tempered = case
    hidden, head, labels, first, lam = make(sampled=kind == SAMPLED,
                                            temperature=temperature if tempered else None)
    # Teachers of different k (each its own partition), the same tokens.
    others = [teacher_targets(N, V, K + 2 * j, seed=10 + j, sampled=kind == SAMPLED,
                              temperature=temperature if tempered else None)
              for j in range(1, teachers)]
    weights = mix_weights(teachers, N, seed=3)
    cfg = LossConfig(kind=kind, temperature=temperature, chunk_size=7)
    h64 = hidden.detach().double().requires_grad_(True)
    head64 = head.double()
    transform = None if path == "fused" else (lambda z: z)  # a transform: the autograd path
    got = chunked_distill_loss(h64, head64, labels, lam, cfg, first, V, transform,
                               other_teachers=others, teacher_weights=weights)
    fused = type(got.total.grad_fn).__name__ == "_FusedHeadLossBackward"
    assert fused == (path == "fused")
    ref, ref_kd, ref_per_teacher = reference(h64, head64, labels, lam, cfg, kind,
                                             [first, *others], weights)
    # The fused path computes in the inputs' float64, the autograd path in float32.
    tol = dict(rtol=1e-9, atol=1e-9) if fused else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.total.double(), ref, **tol)
    torch.testing.assert_close(got.kd.double(), ref_kd, **tol)
    assert got.kd_per_teacher is not None and got.kd_per_teacher.shape == (teachers,)
    torch.testing.assert_close(got.kd_per_teacher.double(), torch.stack(ref_per_teacher), **tol)
    params = [h64, head64.weight, head64.bias]
    for a, b in zip(torch.autograd.grad(got.total, params), torch.autograd.grad(ref, params),
                    strict=True):
        torch.testing.assert_close(a, b, **(dict(rtol=1e-8, atol=1e-10) if fused else tol))


def dense_teacher(n: int, seed: int) -> tuple[TeacherTargets, torch.Tensor]:
    """A cache with k = V (no tail) and its dense float64 log-probs (n, V)."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, V, generator=gen, dtype=torch.float64) * 3, -1)
    values, ids = logp.topk(V, -1)
    tail = torch.full((n,), float("-inf"))
    return TeacherTargets(ids, values, tail), logp


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_caches_give_kl_to_the_teachers_mixture(temperature):
    """With k = V, Σ_j w_j KL(P_j || Q) = KL(M || Q) + Σ_j w_j Σ P_j log P_j - Σ M log M,
    M = Σ_j w_j P_j: the student is pulled towards the mixture of the teachers (values and
    gradients against that dense form)."""
    hidden, head, labels, _, lam = make()
    (t1, logp1), (t2, logp2) = dense_teacher(N, 21), dense_teacher(N, 22)
    weights = mix_weights(2, N, seed=5)
    cfg = LossConfig(kind="forward", temperature=temperature, chunk_size=5)
    h64 = hidden.detach().double().requires_grad_(True)
    head64 = head.double()
    got = chunked_distill_loss(h64, head64, labels, lam, cfg, t1, V, other_teachers=[t2],
                               teacher_weights=weights)
    assert type(got.total.grad_fn).__name__ != "_FusedHeadLossBackward"  # k = V: autograd

    z = F.linear(h64, head64.weight, head64.bias)[:, :V]
    log_q = torch.log_softmax(z / temperature, -1)  # (N, V)
    p1 = torch.softmax(logp1 / temperature, -1)
    p2 = torch.softmax(logp2 / temperature, -1)
    w = weights.double()
    mixture = w[0, :, None] * p1 + w[1, :, None] * p2  # (N, V)

    def plogp(p: torch.Tensor) -> torch.Tensor:
        return torch.xlogy(p, p).sum(-1)

    kd = ((mixture * (mixture.log() - log_q)).sum(-1)
          + w[0] * plogp(p1) + w[1] * plogp(p2) - plogp(mixture))
    ce = F.cross_entropy(z, labels, reduction="none")
    lam64 = lam.double()
    ref = ((1 - lam64) * ce + lam64 * temperature**2 * kd).sum()
    torch.testing.assert_close(got.total.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.kd.double(), kd.detach().sum(), rtol=1e-5, atol=1e-5)
    params = [h64, head64.weight, head64.bias]
    for a, b in zip(torch.autograd.grad(got.total, params), torch.autograd.grad(ref, params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 logits


def test_one_teacher_is_unchanged_and_equal_weights_are_the_default():
    hidden, head, labels, first, lam = make()
    second = teacher_targets(N, V, K + 1, seed=9)
    cfg = LossConfig(chunk_size=6)
    one = chunked_distill_loss(hidden, head, labels, lam, cfg, first, V)
    assert one.kd_per_teacher is not None and torch.allclose(one.kd_per_teacher, one.kd[None])
    equal = chunked_distill_loss(hidden, head, labels, lam, cfg, first, V,
                                 other_teachers=[second])
    given = chunked_distill_loss(hidden, head, labels, lam, cfg, first, V,
                                 other_teachers=[second],
                                 teacher_weights=torch.full((2, N), 0.5))
    torch.testing.assert_close(equal.total, given.total)
    # Weights (1, 0): teacher 1 alone, whatever teacher 2 says.
    alone = chunked_distill_loss(hidden, head, labels, lam, cfg, first, V,
                                 other_teachers=[second],
                                 teacher_weights=torch.stack([torch.ones(N), torch.zeros(N)]))
    torch.testing.assert_close(alone.total, one.total, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"teacher_weights must be \(J, N\) = \(2, 29\)"):
        chunked_distill_loss(hidden, head, labels, lam, cfg, first, V, other_teachers=[second],
                             teacher_weights=torch.ones(3, N))
