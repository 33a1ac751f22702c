"""Chunked head + loss: equal to the unchunked computation, λ/τ² bookkeeping, memory bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.chunked_loss import LossSums, TeacherTargets, chunked_distill_loss
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.losses import divergence, student_partition, teacher_partition

N, H, V, V_STUDENT, K = 37, 16, 50, 56, 6  # a padded student head: rows V.. are no ids


def make_inputs(n=N, hidden_size=H, vocab=V, student_vocab=V_STUDENT, k=K, seed=0, bias=True,
                temperature=None):
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden_size, student_vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(student_vocab, hidden_size, generator=gen) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(student_vocab, generator=gen) * 0.1)
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    zt = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3
    logp = torch.log_softmax(zt, -1)
    vals, ids = logp.topk(k, -1)
    tempered = None
    if temperature is not None:
        lp_t = torch.log_softmax(zt / temperature, -1)
        in_k = torch.zeros_like(lp_t, dtype=torch.bool).scatter_(-1, ids, True)
        tempered = torch.logsumexp(lp_t.masked_fill(in_k, float("-inf")), -1).float()
    in_k = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(logp.masked_fill(in_k, float("-inf")), -1).float()
    teacher = TeacherTargets(ids, vals.float(), tail, tempered)
    return hidden, head, labels, teacher


def unchunked(hidden, head, labels, lam_per_token, cfg, teacher, transform=None, vocab=V):
    """The plain computation: full (N, V) logits, no chunking, no checkpointing. Only the
    `vocab` real ids form the softmax: a padded head's extra rows are left out."""
    logits = head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)
    logits = logits[:, :vocab]
    if transform is not None:
        logits = transform(logits)
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    tempered = teacher.tempered_tail_logmass if cfg.temperature != 1.0 else None
    log_p, log_p_tail = teacher_partition(teacher.topk_logprobs, teacher.tail_logmass,
                                          cfg.temperature, vocab, tempered)
    log_q, log_q_tail = student_partition(logits, teacher.topk_ids, cfg.temperature)
    kd = divergence(cfg.resolved(False), log_p, log_p_tail, log_q, log_q_tail, cfg.beta, cfg.alpha)
    lam = lam_per_token.float()
    total = ((1 - lam) * ce + lam * cfg.temperature**2 * kd).sum()
    correct = (logits.argmax(-1) == teacher.topk_ids[:, 0]).sum()
    return total, ce.sum(), kd.sum(), correct


def grads(total, tensors):
    return torch.autograd.grad(total, tensors)


def lambdas(n=N, seed=3):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "temperature", "chunk_size"), [
    ("forward", 2.0, 1), ("forward", 2.0, 7), ("forward", 2.0, N), ("forward", 2.0, 1000),
    ("forward", 1.0, 7), ("jsd", 1.0, 16), ("reverse", 0.5, 7), ("tvd", 1.0, 7),
])
def test_chunked_equals_unchunked_values_and_grads(chunk_size, kind, temperature):
    hidden, head, labels, teacher = make_inputs(temperature=temperature)
    lam = lambdas()
    cfg = LossConfig(kind=kind, temperature=temperature, chunk_size=chunk_size)
    got = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    ref = unchunked(hidden, head, labels, lam, cfg, teacher)
    assert got.tokens == N
    for a, b in zip((got.total, got.ce, got.kd), ref[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert int(got.correct_top1) == int(ref[3])
    assert not got.ce.requires_grad and not got.kd.requires_grad
    params = [hidden, head.weight, head.bias]
    for a, b in zip(grads(got.total, params), grads(ref[0], params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_weight_tensor_head_and_logit_transform():
    hidden, head, labels, teacher = make_inputs(bias=False)
    weight = head.weight.detach().clone().requires_grad_(True)
    lam = lambdas()

    def softcap(x: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(x / 3.0)

    cfg = LossConfig(kind="skew", temperature=1.5, chunk_size=8)
    got = chunked_distill_loss(hidden, weight, labels, lam, cfg, teacher, V, softcap)
    ref = unchunked(hidden, weight, labels, lam, cfg, teacher, softcap)
    torch.testing.assert_close(got.total, ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(got.total, [hidden, weight]), grads(ref[0], [hidden, weight]),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_head_matches_the_same_computation_unchunked():
    hidden, head, labels, teacher = make_inputs()
    head = head.to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_(True)
    lam = lambdas()
    cfg = LossConfig(chunk_size=7)
    got = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    ref = unchunked(hidden, head, labels, lam, cfg, teacher)
    assert got.total.dtype == torch.float32
    torch.testing.assert_close(got.total, ref[0], atol=1e-4, rtol=1e-5)
    (g_got,) = grads(got.total, [hidden])
    (g_ref,) = grads(ref[0], [hidden])
    torch.testing.assert_close(g_got, g_ref)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_lambda_per_token_mixes_ce_and_tau_squared_kd(temperature):
    hidden, head, labels, teacher = make_inputs(temperature=temperature)
    cfg = LossConfig(kind="forward", temperature=temperature, chunk_size=10)

    def run(lam: torch.Tensor) -> LossSums:
        return chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)

    pure_ce, pure_kd = run(torch.zeros(N)), run(torch.ones(N))
    torch.testing.assert_close(pure_ce.total, pure_ce.ce)
    # τ² exactly once: with λ = 1 the total is τ² times the reported (unscaled) divergence
    torch.testing.assert_close(pure_kd.total, temperature**2 * pure_kd.kd)
    torch.testing.assert_close(pure_ce.kd, pure_kd.kd)
    mixed = run(torch.full((N,), 0.25))
    torch.testing.assert_close(mixed.total, 0.75 * pure_ce.total + 0.25 * pure_kd.total)
    # per-token λ: each token mixes its own CE and KD
    lam = lambdas()
    logits = head(hidden)[:, :V].float()
    ce_n = F.cross_entropy(logits, labels, reduction="none")
    log_p, log_p_tail = teacher_partition(teacher.topk_logprobs, teacher.tail_logmass,
                                          temperature, V, teacher.tempered_tail_logmass)
    kd_n = divergence("forward", log_p, log_p_tail,
                      *student_partition(logits, teacher.topk_ids, temperature))
    expected = ((1 - lam) * ce_n + lam * temperature**2 * kd_n).sum()
    torch.testing.assert_close(run(lam).total, expected, atol=1e-5, rtol=1e-5)


def test_ce_mode_is_plain_cross_entropy():
    hidden, head, labels, teacher = make_inputs()
    cfg = LossConfig(mode="ce", chunk_size=6)
    got = chunked_distill_loss(hidden, head, labels, None, cfg, None, V)
    ref = F.cross_entropy(head(hidden)[:, :V], labels, reduction="sum")
    torch.testing.assert_close(got.total, ref)
    torch.testing.assert_close(got.ce, ref.detach())
    assert float(got.kd) == 0.0 and int(got.correct_top1) == 0
    params = [hidden, head.weight, head.bias]
    for a, b in zip(grads(got.total, params), grads(ref, params), strict=True):
        torch.testing.assert_close(a, b)
    # with the teacher given, ce mode still reports top-1 agreement and ignores λ
    with_teacher = chunked_distill_loss(hidden, head, labels, torch.ones(N), cfg, teacher, V)
    torch.testing.assert_close(with_teacher.total, ref)
    expected = (head(hidden)[:, :V].argmax(-1) == teacher.topk_ids[:, 0]).sum()
    assert int(with_teacher.correct_top1) == int(expected)


@pytest.mark.parametrize("mode", ["ce", "kd"])
def test_per_token_ce_is_reported_for_every_chunk(mode):
    hidden, head, labels, teacher = make_inputs()
    cfg = LossConfig(mode=mode, chunk_size=5)
    got = chunked_distill_loss(hidden, head, labels, torch.full((N,), 0.5), cfg, teacher, V)
    ref = F.cross_entropy(head(hidden)[:, :V], labels, reduction="none")
    torch.testing.assert_close(got.ce_per_token, ref.detach())
    assert not got.ce_per_token.requires_grad


def test_no_grad_and_empty_inputs():
    hidden, head, labels, teacher = make_inputs()
    cfg = LossConfig(chunk_size=4)
    lam = lambdas()
    with_grad = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    with torch.no_grad():
        without = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    assert not without.total.requires_grad
    torch.testing.assert_close(without.total, with_grad.total.detach())
    empty = TeacherTargets(teacher.topk_ids[:0], teacher.topk_logprobs[:0],
                           teacher.tail_logmass[:0], None)
    none = chunked_distill_loss(hidden[:0], head, labels[:0], lam[:0], cfg, empty, V)
    assert none.tokens == 0 and float(none.total.detach()) == 0.0
    none.total.backward()  # still part of the graph


def test_bad_inputs_are_rejected():
    hidden, head, labels, teacher = make_inputs()
    with pytest.raises(ValueError, match="teacher"):
        chunked_distill_loss(hidden, head, labels, lambdas(), LossConfig(), None, V)
    with pytest.raises(ConfigError, match="tokenizer"):
        chunked_distill_loss(hidden, head, labels, lambdas(), LossConfig(), teacher, 64)
    with pytest.raises(ValueError, match="lam_per_token"):
        chunked_distill_loss(hidden, head, labels, None, LossConfig(), teacher, V)
    with pytest.raises(ConfigError) as info:
        LossConfig(kind="kl", temperature=0.0, chunk_size=0).validate()
    message = str(info.value)
    assert "--loss" in message and "--temperature" in message and "--chunk-size" in message


# --- memory: no (N, V) tensor, ever -----------------------------------------------------------

MEM_N, MEM_H, MEM_V, MEM_K, MEM_CHUNK = 96, 8, 64, 4, 8  # N·V = 6144 ≫ every legitimate size


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, forward and backward (incl. recompute)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def memory_inputs():
    return make_inputs(n=MEM_N, hidden_size=MEM_H, vocab=MEM_V, student_vocab=MEM_V, k=MEM_K)


def test_no_saved_tensor_is_n_by_v():
    hidden, head, labels, teacher = memory_inputs()
    cfg = LossConfig(kind="forward", temperature=2.0, chunk_size=MEM_CHUNK)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = chunked_distill_loss(hidden, head, labels, torch.ones(MEM_N), cfg, teacher, MEM_V)
    sums.total.backward()
    # Everything kept for backward, all chunks together, is less than one (N, V) tensor:
    # per-chunk logits are recomputed, not stored (without checkpointing this is ~7·N·V).
    assert saved and sum(saved) < MEM_N * MEM_V
    # the detector works: the unchunked computation does save an (N, V) tensor
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unchunked(hidden, head, labels, torch.ones(MEM_N), cfg, teacher, vocab=MEM_V)
    assert max(saved) >= MEM_N * MEM_V


def test_peak_tensor_is_one_chunk_of_logits():
    hidden, head, labels, teacher = memory_inputs()
    cfg = LossConfig(kind="jsd", chunk_size=MEM_CHUNK)
    lam = torch.full((MEM_N,), 0.5)
    legit = max(MEM_CHUNK * MEM_V, MEM_V * MEM_H, MEM_N * MEM_H, MEM_N * (MEM_K + 1))
    assert legit < MEM_N * MEM_V
    with LargestTensor() as probe:
        sums = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, MEM_V)
        sums.total.backward()
    assert probe.largest <= legit
    with LargestTensor() as probe:
        unchunked(hidden, head, labels, lam, cfg, teacher, vocab=MEM_V)[0].backward()
    assert probe.largest >= MEM_N * MEM_V
