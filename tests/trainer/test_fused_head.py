"""The fused head: its closed-form gradients equal autograd's, and the automatic path choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kdpipe.trainer.chunked_loss import TeacherTargets, chunked_distill_loss
from kdpipe.trainer.fused_head import FusedTargets, fused_head_loss, fused_unsupported
from kdpipe.trainer.loss_config import SAMPLED, LossConfig
from kdpipe.trainer.losses import (
    divergence,
    sampled_cross_entropy,
    student_partition,
    teacher_partition,
)

N, H, V, V_HEAD, K, S = 29, 12, 40, 48, 5, 7  # a padded head: rows V.. are no ids


def teacher_targets(n: int, vocab: int, k: int, seed: int, sampled: bool = False,
                    temperature: float | None = None) -> TeacherTargets:
    """A teacher's cached top-k + tail (with the exact tempered tail when `temperature`), or
    a sampled cache: S distinct ids per token with weights summing to 1, some padding."""
    gen = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3
    logp = torch.log_softmax(zt, -1)
    vals, ids = logp.topk(k, -1)
    in_k = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(logp.masked_fill(in_k, float("-inf")), -1).float()
    tempered = None
    if temperature is not None:
        lp_t = torch.log_softmax(zt / temperature, -1)
        tempered = torch.logsumexp(lp_t.masked_fill(in_k, float("-inf")), -1).float()
    if not sampled:
        return TeacherTargets(ids, vals.float(), tail, tempered)
    drawn = torch.rand(n, vocab, generator=gen).argsort(-1)[:, :S]  # (n, S) distinct ids
    weights = torch.rand(n, S, generator=gen)
    weights[:, -2:] = 0.0  # padding slots (their id is arbitrary, their weight 0)
    weights = weights / weights.sum(-1, keepdim=True)
    return TeacherTargets(drawn[:, :1], vals[:, :1].float(), tail, None, drawn, weights)


def make(n: int = N, seed: int = 0, bias: bool = True, sampled: bool = False,
         temperature: float | None = None, scale: float = 0.5
         ) -> tuple[torch.Tensor, nn.Linear, torch.Tensor, TeacherTargets, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 100)
    head = nn.Linear(H, V_HEAD, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V_HEAD, H, generator=gen) * scale)
        if bias:
            head.bias.copy_(torch.randn(V_HEAD, generator=gen) * 0.1)
    hidden = torch.randn(n, H, generator=gen).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=gen)
    lam = torch.rand(n, generator=gen)  # λ per token
    return hidden, head, labels, teacher_targets(n, V, K, seed, sampled, temperature), lam


def reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              labels: torch.Tensor, lam: torch.Tensor, cfg: LossConfig,
              teacher: TeacherTargets | None) -> torch.Tensor:
    """The loss total on dense float64 logits, by the definitions of losses.py (autograd).
    The sampled weights and the teacher partition stay as the trainer forms them."""
    z = F.linear(hidden.double(), weight.double(),
                 None if bias is None else bias.double())[:, :V]  # (N, V)
    ce = F.cross_entropy(z, labels, reduction="none")
    if cfg.mode == "ce":
        return ce.sum()
    assert teacher is not None
    lam64 = lam.double()
    if teacher.is_sampled:
        log_q = torch.log_softmax(z, -1).gather(-1, teacher.sampled_ids)
        kd = sampled_cross_entropy(log_q, teacher.sampled_weights)
    else:
        tempered = teacher.tempered_tail_logmass if cfg.temperature != 1.0 else None
        # The teacher's side is a constant: the same (float32) partition as the trainer's.
        log_p, log_p_tail = teacher_partition(teacher.topk_logprobs, teacher.tail_logmass,
                                              cfg.temperature, V, tempered)
        log_q, log_q_tail = student_partition(z, teacher.topk_ids, cfg.temperature)
        kd = divergence("forward", log_p, log_p_tail, log_q, log_q_tail)
    return ((1 - lam64) * ce + lam64 * cfg.temperature**2 * kd).sum()


def autograd_path(hidden, head, labels, lam, cfg, teacher):  # type: ignore[no-untyped-def]
    """Today's checkpointed autograd path, chosen by giving a (neutral) logit transform."""
    return chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V, lambda z: z)


CASES = [  # (mode, kind, temperature, tempered tail stored)
    ("kd", "forward", 1.0, False), ("kd", "forward", 2.0, True), ("kd", "forward", 0.5, False),
    ("kd", SAMPLED, 1.0, False), ("ce", None, 1.0, False),
]


@pytest.mark.parametrize(("mode", "kind", "temperature", "tempered"), CASES)
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_fused_gradients_equal_a_float64_dense_reference(mode, kind, temperature, tempered,
                                                         chunk_size):
    hidden, head, labels, teacher, lam = make(sampled=kind == SAMPLED,
                                              temperature=temperature if tempered else None)
    cfg = LossConfig(mode=mode, kind=kind, temperature=temperature, chunk_size=chunk_size)
    # float64 inputs: the fused path computes in float64, so the formulas are checked tightly
    h64 = hidden.detach().double().requires_grad_(True)
    head64 = head.double()
    got = chunked_distill_loss(h64, head64, labels, lam, cfg, teacher, V)
    assert type(got.total.grad_fn).__name__ == "_FusedHeadLossBackward"
    params = [h64, head64.weight, head64.bias]
    ref = reference(h64, head64.weight, head64.bias, labels, lam, cfg, teacher)
    torch.testing.assert_close(got.total, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got.total, params), torch.autograd.grad(ref, params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert got.total.dtype == torch.float64


@pytest.mark.parametrize(("mode", "kind", "temperature", "tempered"), CASES)
def test_fused_equals_the_autograd_path_in_float32(mode, kind, temperature, tempered):
    hidden, head, labels, teacher, lam = make(sampled=kind == SAMPLED,
                                              temperature=temperature if tempered else None)
    cfg = LossConfig(mode=mode, kind=kind, temperature=temperature, chunk_size=6)
    got = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    ref = autograd_path(hidden, head, labels, lam, cfg, teacher)
    assert type(got.total.grad_fn).__name__ == "_FusedHeadLossBackward"
    assert type(ref.total.grad_fn).__name__ != "_FusedHeadLossBackward"
    for a, b in [(got.total, ref.total), (got.ce, ref.ce), (got.kd, ref.kd),
                 (got.ce_per_token, ref.ce_per_token)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(got.correct_top1) == int(ref.correct_top1) and got.tokens == ref.tokens
    assert not got.ce.requires_grad and not got.kd.requires_grad
    assert not got.ce_per_token.requires_grad
    params = [hidden, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad(got.total, params),
                    torch.autograd.grad(ref.total, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_head_rows_get_exactly_zero_gradient():
    hidden, head, labels, teacher, lam = make(temperature=2.0)
    cfg = LossConfig(temperature=2.0, chunk_size=5)
    chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V).total.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert torch.all(head.weight.grad[V:] == 0) and torch.all(head.bias.grad[V:] == 0)
    assert head.weight.grad[:V].abs().sum() > 0


def test_tied_embeddings_accumulate_both_uses():
    """The head weight is also the input embedding: its gradient sums both uses."""
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    _, head, labels, teacher, lam = make(bias=False)
    mix = torch.randn(H, H, generator=torch.Generator().manual_seed(6)) / H**0.5
    cfg = LossConfig(temperature=1.0, chunk_size=7)

    def grad_of(weight: torch.Tensor, fused: bool) -> torch.Tensor:
        weight = weight.detach().clone().requires_grad_(True)
        hidden = torch.tanh(F.embedding(ids, weight) @ mix)  # (N, H), a body using the embedding
        transform = None if fused else (lambda z: z)
        sums = chunked_distill_loss(hidden, weight, labels, lam, cfg, teacher, V, transform)
        (sums.total / N).backward()
        assert weight.grad is not None
        return weight.grad

    weight = head.weight.detach()
    torch.testing.assert_close(grad_of(weight, True), grad_of(weight, False), rtol=1e-5,
                               atol=1e-7)
    w64 = weight.double().requires_grad_(True)
    hidden64 = torch.tanh(F.embedding(ids, w64) @ mix.double())
    (reference(hidden64, w64, None, labels, lam, cfg, teacher) / N).backward()
    torch.testing.assert_close(grad_of(weight, True), w64.grad.float(), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_over_several_backward_calls():
    hidden, head, labels, teacher, lam = make(temperature=2.0)
    cfg = LossConfig(temperature=2.0, chunk_size=4)
    split = 11

    def part(sl: slice) -> TeacherTargets:
        return TeacherTargets(*(None if t is None else t[sl] for t in vars(teacher).values()))

    for sl in (slice(0, split), slice(split, N)):  # two micro-batches, one optimizer step
        sums = chunked_distill_loss(hidden[sl], head, labels[sl], lam[sl], cfg, part(sl), V)
        (sums.total / N).backward()
    got = [hidden.grad, head.weight.grad, head.bias.grad]
    params = [hidden, head.weight, head.bias]
    ref = reference(hidden, head.weight, head.bias, labels, lam, cfg, teacher) / N
    for a, b in zip(got, torch.autograd.grad(ref, params), strict=True):
        assert a is not None
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-7)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, head, labels, teacher, lam = make()
    head.requires_grad_(False)  # e.g. LoRA on the body only
    cfg = LossConfig(chunk_size=8)
    sums = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    sums.total.backward()
    assert head.weight.grad is None and head.bias.grad is None
    (expected,) = torch.autograd.grad(autograd_path(hidden, head, labels, lam, cfg,
                                                    teacher).total, [hidden])
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_matches_the_autograd_path():
    hidden, head, labels, teacher, lam = make()
    cfg = LossConfig(chunk_size=8)
    params = [hidden, head.weight, head.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
        ref = autograd_path(hidden, head, labels, lam, cfg, teacher)
    assert got.total.dtype == torch.float32
    torch.testing.assert_close(got.total, ref.total, rtol=1e-5, atol=1e-4)
    g_got = torch.autograd.grad(got.total, params)
    g_ref = torch.autograd.grad(ref.total, params)
    for a, b in zip(g_got, g_ref, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_a_confident_student_with_an_underflowed_tail_stays_finite_and_exact():
    """Tail logits ~200 below the cached ones: exp underflows in float32 unless each part of
    the softmax is shifted by its own max."""
    hidden, head, labels, teacher, lam = make(n=6)
    weight = torch.zeros(V_HEAD, H)
    weight[teacher.topk_ids[:, 0]] = 0.0
    bias = torch.full((V_HEAD,), -200.0)
    bias[teacher.topk_ids.flatten()] = 0.0  # every cached id far above every tail id
    head = nn.Linear(H, V_HEAD)
    with torch.no_grad():
        head.weight.copy_(weight + 0.01 * torch.randn(V_HEAD, H))
        head.bias.copy_(bias)
    cfg = LossConfig(chunk_size=4)
    got = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    params = [hidden, head.weight, head.bias]
    grads = torch.autograd.grad(got.total, params)
    assert torch.isfinite(got.total) and all(torch.isfinite(g).all() for g in grads)
    ref = reference(hidden, head.weight, head.bias, labels, lam, cfg, teacher)
    torch.testing.assert_close(got.total, ref.float(), rtol=1e-5, atol=1e-3)
    for a, b in zip(grads, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_a_second_backward_through_the_same_graph_fails_loudly():
    hidden, head, labels, teacher, lam = make()
    sums = chunked_distill_loss(hidden, head, labels, lam, LossConfig(chunk_size=8), teacher, V)
    sums.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        sums.total.backward()


def test_top1_agreement_takes_the_first_index_of_a_tie():
    hidden, head, labels, teacher, lam = make(n=4)
    weight = torch.zeros(V_HEAD, H, requires_grad=True)  # all logits equal: argmax is id 0
    ids = torch.tensor([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [5, 6, 7, 8, 9], [0, 6, 7, 8, 9]])
    tied = TeacherTargets(ids, teacher.topk_logprobs, teacher.tail_logmass)
    for temperature in (1.0, 2.0):  # τ = 1: id 0 among the cached ids, split off the softmax
        cfg = LossConfig(temperature=temperature, chunk_size=3)
        sums = chunked_distill_loss(hidden, weight, labels, lam, cfg, tied, V)
        assert int(sums.correct_top1) == 2


class Scaled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("kind", ["reverse", "jsd", "skew", "tvd", "zero"])
def test_divergences_without_a_closed_form_take_the_autograd_path(kind):
    hidden, head, labels, teacher, lam = make()
    cfg = LossConfig(kind=kind, chunk_size=8)
    assert fused_unsupported(head, cfg, kind, V, K, None) == (
        f"--loss {kind} has no closed-form gradient here")
    sums = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    assert type(sums.total.grad_fn).__name__ != "_FusedHeadLossBackward"


def test_the_path_choice_rule():
    _, head, *_ = make()
    kd, ce = LossConfig(), LossConfig(mode="ce")
    assert fused_unsupported(head, kd, "forward", V, K, None) is None
    assert fused_unsupported(head.weight, kd, SAMPLED, V, 1, None) is None
    assert fused_unsupported(head, ce, "reverse", V, K, None) is None  # ce ignores --loss
    assert "transform" in str(fused_unsupported(head, kd, "forward", V, K, torch.tanh))
    assert "whole vocabulary" in str(fused_unsupported(head, kd, "forward", V, V, None))
    assert "Scaled" in str(fused_unsupported(Scaled(H, V), kd, "forward", V, K, None))
    hooked = nn.Linear(H, V)
    hooked.register_forward_hook(lambda *_: None)
    assert fused_unsupported(hooked, kd, "forward", V, K, None) is not None
    with pytest.raises(ValueError, match="plain nn.Linear"):
        fused_head_loss(torch.zeros(1, H), Scaled(H, V), FusedTargets(torch.zeros(1).long()),
                        ce, "forward", V)


def test_peft_lora_head_takes_the_autograd_path():
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("lm_head", nn.Linear(H, V_HEAD))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    lora_head = wrapped.base_model.model.lm_head
    assert fused_unsupported(lora_head, LossConfig(), "forward", V, K, None) is not None


def test_no_grad_evaluation_uses_the_plain_forward():
    hidden, head, labels, teacher, lam = make(temperature=2.0)
    cfg = LossConfig(temperature=2.0, chunk_size=8)
    with torch.no_grad():
        plain = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    fused = chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V)
    assert plain.total.grad_fn is None
    torch.testing.assert_close(plain.total, fused.total.detach(), rtol=1e-6, atol=1e-5)


def test_a_tied_llama_student_gets_the_same_gradients_on_both_paths():
    """Through a real model: the head is the input embedding (tie_word_embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdpipe.trainer.model import split_student

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=V_HEAD, hidden_size=H, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    parts = split_student(model, "student")
    assert parts.head.weight is model.get_input_embeddings().weight
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    teacher = teacher_targets(3 * 9, V, K, seed=2, temperature=2.0)
    lam = torch.rand(3 * 9, generator=torch.Generator().manual_seed(3))
    cfg = LossConfig(temperature=2.0, chunk_size=10)

    def grads(transform: object) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        hidden = parts.hidden_states(ids, mask)[:, :-1].reshape(-1, H)  # (27, H)
        sums = chunked_distill_loss(hidden, parts.head, ids[:, 1:].reshape(-1), lam, cfg,
                                    teacher, V, transform)  # type: ignore[arg-type]
        (sums.total / 27).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(None), grads(lambda z: z), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op produces, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(("kind", "temperature"), [("forward", 1.0), ("forward", 2.0),
                                                   (SAMPLED, 1.0)])
def test_no_tensor_larger_than_one_chunk_of_logits_or_the_head(kind, temperature):
    n, chunk = 96, 8
    hidden, head, labels, teacher, lam = make(n=n, sampled=kind == SAMPLED,
                                              temperature=temperature)
    cfg = LossConfig(kind=kind, temperature=temperature, chunk_size=chunk)
    legit = max(chunk * V_HEAD, V_HEAD * H, n * H, n * (K + 1), n * S)
    assert legit < n * V
    with LargestTensor() as probe:
        chunked_distill_loss(hidden, head, labels, lam, cfg, teacher, V).total.backward()
    assert probe.largest <= legit
