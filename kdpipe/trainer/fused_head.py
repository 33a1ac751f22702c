"""The student's output head and loss with closed-form gradients, computed in forward.

For CE, forward KL on the cached top-k + tail partition and the sampled loss, the gradient of
the loss with respect to the student's logits z has a closed form. `fused_head_loss` runs
the head a chunk of tokens at a time, as Liger's fused linear cross-entropy does
(linkedin/Liger-Kernel, `fused_linear_cross_entropy.py`): per chunk it computes the logits,
the loss sums, dL/dz from the closed form, and at once dL/dhidden (stored) and dL/dW, dL/db
(accumulated). No (N, V) tensor outlives its chunk and nothing is recomputed in backward,
which only scales the stored gradients by grad_output. The price: the head weight's
(V_s, H) gradient (float32) is held from forward to backward.

Closed forms, per token, with p = softmax(z) over the first `vocab_size` logits (a padded
head's extra rows get zero gradient), y the label, λ the token's KD weight, τ the temperature:

* CE = lse(z) - z_y:  dCE/dz = p - onehot(y).
* forward KL on the partition K ∪ {tail} (losses.py): with u = z / τ, q = softmax(u),
  log q_j = u_j - lse(u) on the k cached ids j ∈ K and log q_tail = lse_{i∉K}(u_i) - lse(u);
  the teacher's (already normalised) p_j^T on K and tail mass r are constants. Then
  KL = Σ_j p_j^T (log p_j^T - log q_j) + r (log r - log q_tail), and
      dKL/du_i = S q_i - t_i,   t_i = p_i^T (i ∈ K),   t_i = r q_i / Q_tail (i ∉ K),
  S = Σ_j p_j^T + r (1 up to rounding; outcomes of zero teacher mass excluded, as `_kl` does),
  Q_tail = Σ_{i∉K} q_i: the teacher's tail mass spread over the non-cached ids in
  proportion to the student's tempered probabilities. Since du/dz = 1/τ, the loss term
  τ² KL has d(τ² KL)/dz = τ (S q - t).
* sampled = -Σ_j w_j log p_{s_j} (τ = 1):  d/dz = (Σ_j w_j) p - Σ_j w_j onehot(s_j).

The token's gradient is (1 - λ) dCE/dz + λ τ² dKD/dz (mode ce: dCE/dz). With J teachers
(one FusedTargets each, weights w_j summing to 1) it is (1 - λ) dCE/dz + λ τ² Σ_j w_j dKD_j/dz,
each KD_j on teacher j's own partition: the one-teacher gradient of teacher 1 with λ w_1,
plus those of teachers 2..J with λ w_j and no CE term, each from its own copy of the chunk's
logits (2 (chunk, V) tensors alive instead of 1 with two teachers, 3 with more: the kept
logits, the running sum and the term being formed; J times the element-wise work).

Every softmax is shifted by the max over the *non-cached* logits, so that the tail's sum
is ≥ 1 and its log never underflows, however confident the student is on K; the k cached
logits are handled as an (n, k) tensor on their own. `fused_unsupported` says which inputs
this covers; `chunked_loss.chunked_distill_loss` sends everything else through the
checkpointed autograd path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdpipe.trainer.loss_config import SAMPLED, LossConfig
from kdpipe.trainer.losses import divergence, sampled_cross_entropy

FUSED_KINDS = ("forward", SAMPLED)  # the divergences with a closed-form gradient here


def head_parameters(head: nn.Module | Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(weight (V_s, H), bias (V_s,) or None) of a head the fused path can run, else None.

    A weight tensor, or a module that is exactly `nn.Linear` with plain tensors and no hooks:
    a subclass, a peft adapter layer or a hooked/sharded module may compute something else
    than F.linear(hidden, weight, bias), so only autograd can be trusted with it."""
    if isinstance(head, Tensor):
        return (head, None) if type(head) in (Tensor, nn.Parameter) else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    params = (head.weight, head.bias)
    if any(p is not None and type(p) not in (Tensor, nn.Parameter) for p in params):
        return None  # a DTensor or other subclass: sharded, its gradient is not ours to form
    return head.weight, head.bias


def fused_unsupported(head: nn.Module | Tensor, cfg: LossConfig, kind: str, vocab_size: int,
                      top_k: int | None, logit_transform: object | None) -> str | None:
    """Why the fused path cannot compute this loss (None: it can).

    Covered: mode ce; mode kd with `kind` forward (top-k cache, k < vocab_size: a tail
    exists) or sampled; no logit transform; a head `head_parameters` accepts."""
    if logit_transform is not None:
        return "a logit transform (soft-capping or scaling) follows the head"
    if cfg.mode == "kd" and kind not in FUSED_KINDS:
        return f"--loss {kind} has no closed-form gradient here"
    if cfg.mode == "kd" and kind == "forward" and top_k is not None and top_k >= vocab_size:
        return "the cache's top-k covers the whole vocabulary (no tail)"
    if head_parameters(head) is None:
        return f"the head is a {type(head).__name__}, not a plain nn.Linear"
    return None


@dataclass
class FusedTargets:
    """Per-token inputs of the fused loss, N rows each (padding removed); None where unused.

    labels (N,) int64; lam (N,) λ per token (mode kd); ids (N, k) int64 cached top-k ids
    (top-1 agreement; forward KL); log_p (N, k), log_p_tail (N,): the teacher partition at
    τ (`losses.teacher_partition`); sampled_ids (N, S) int64, sampled_weights (N, S).
    Several teachers, one FusedTargets each: teacher_weight (N,) w_j of this teacher's KD
    term (None: 1); with_ce False for all but teacher 1, so CE counts once."""

    labels: Tensor
    lam: Tensor | None = None
    ids: Tensor | None = None
    log_p: Tensor | None = None
    log_p_tail: Tensor | None = None
    sampled_ids: Tensor | None = None
    sampled_weights: Tensor | None = None
    teacher_weight: Tensor | None = None
    with_ce: bool = True

    def rows(self, sl: slice) -> FusedTargets:
        """The same inputs for the tokens `sl` (views, no copies)."""
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sl]

        return FusedTargets(self.labels[sl], cut(self.lam), cut(self.ids), cut(self.log_p),
                            cut(self.log_p_tail), cut(self.sampled_ids),
                            cut(self.sampled_weights), cut(self.teacher_weight), self.with_ce)


def _shifted_exp(x: Tensor, ids: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Softmax pieces of x (n, V), which is overwritten: (e, shift, tail_lse, x_K, argmax).

    e = exp(x - shift) with the columns `ids` (n, k) set to 0; shift (n,) the max of x over
    the columns not in `ids`; tail_lse (n,) = shift + log Σ_{i∉K} e_i (≥ shift: never
    underflows); x_K (n, k) the logits at `ids` before overwriting (None without ids);
    argmax (n,) the first index of x's maximum over all columns, as torch.argmax."""
    x_k = None
    if ids is not None:
        x_k = x.gather(-1, ids)  # (n, k)
        x.scatter_(-1, ids, float("-inf"))
    shift, arg = x.max(dim=-1)  # (n,): max and its first index, one pass
    if x_k is not None:
        assert ids is not None
        # The first index of the overall max: the tail's, or the smallest cached id at it.
        top = torch.maximum(shift, x_k.amax(dim=-1))  # (n,)
        big = torch.full_like(ids, x.shape[-1])
        in_k = torch.where(x_k == top.unsqueeze(-1), ids, big).amin(dim=-1)  # (n,)
        arg = torch.minimum(torch.where(shift == top, arg, big[:, 0]), in_k)
    e = x.sub_(shift.unsqueeze(-1)).exp_()  # (n, V), 0 at the cached ids
    tail_lse = shift + e.sum(dim=-1).log()  # (n,)
    return e, shift, tail_lse, x_k, arg


def _lse_with(tail_lse: Tensor, x_k: Tensor | None) -> Tensor:
    """log-sum-exp over all columns (n,), from the tail's and the cached logits (n, k)."""
    if x_k is None:
        return tail_lse
    return torch.logsumexp(torch.cat([x_k, tail_lse.unsqueeze(-1)], dim=-1), dim=-1)


def _tail_share(r: Tensor, shift: Tensor, tail_lse: Tensor) -> Tensor:
    """r / Σ_{i∉K} exp(x_i - shift) (n,): the teacher's tail mass r per unit of e on the
    tail; 0 where r = 0 (no NaN from an empty or underflowed tail)."""
    return torch.where(r > 0, r * torch.exp(shift - tail_lse), torch.zeros_like(r))


def _chunk(z: Tensor, tg: FusedTargets, cfg: LossConfig, kind: str
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dL/dz (n, V), per-token total (n,), per-token CE (n,), per-token KD (n,), correct
    top-1) of one chunk and one teacher: total = a CE + λ w τ² KD with a = 1 - λ (0 without
    `tg.with_ce`) and w = `tg.teacher_weight` (1 when None). z (n, V): float logits over the
    real ids, consumed (dL/dz is written into it)."""
    kd_mode = cfg.mode == "kd"
    tau = cfg.temperature
    forward_kl = kd_mode and kind == "forward"
    shared = forward_kl and tau == 1.0  # KL's softmax is CE's, with the cached ids split off
    labels = tg.labels.unsqueeze(-1)  # (n, 1)
    z_label = z.gather(-1, labels).squeeze(-1)  # (n,)
    z_sampled = None
    if kd_mode and kind == SAMPLED:
        assert tg.sampled_ids is not None
        z_sampled = z.gather(-1, tg.sampled_ids)  # (n, S)
    u = z / tau if forward_kl and not shared else None  # (n, V), before z is overwritten
    e, shift, tail_lse, z_k, arg = _shifted_exp(z, tg.ids if shared else None)
    lse = _lse_with(tail_lse, z_k)  # (n,) the student's log-normaliser over the real ids
    ce = lse - z_label  # (n,)
    if tg.ids is not None:
        correct = (arg == tg.ids[:, 0]).sum()
    else:
        correct = torch.zeros((), dtype=torch.long, device=z.device)
    if not kd_mode:
        g = e.mul_(torch.exp(shift - lse).unsqueeze(-1))  # p
        g.scatter_add_(-1, labels, -torch.ones_like(ce).unsqueeze(-1))
        return g, ce, ce, torch.zeros_like(ce), correct
    assert tg.lam is not None
    lam = tg.lam.to(ce.dtype)  # (n,)
    a = 1.0 - lam if tg.with_ce else torch.zeros_like(lam)  # CE's weight
    if tg.teacher_weight is not None:
        lam = lam * tg.teacher_weight.to(ce.dtype)  # this teacher's share of the KD weight
    if z_sampled is not None:
        assert tg.sampled_ids is not None and tg.sampled_weights is not None
        w = tg.sampled_weights.to(ce.dtype)  # (n, S)
        g = e.mul_(((a + lam * w.sum(dim=-1)) * torch.exp(shift - lse)).unsqueeze(-1))
        g.scatter_add_(-1, labels, -a.unsqueeze(-1))
        g.scatter_add_(-1, tg.sampled_ids, -lam.unsqueeze(-1) * w)
        kd = sampled_cross_entropy(z_sampled - lse.unsqueeze(-1), w)  # (n,)
        return g, a * ce + lam * kd, ce, kd, correct
    assert tg.log_p is not None and tg.log_p_tail is not None and tg.ids is not None
    log_p, log_p_tail = tg.log_p.to(ce.dtype), tg.log_p_tail.to(ce.dtype)
    p_t, r = log_p.exp(), log_p_tail.exp()  # (n, k), (n,)
    mass = p_t.sum(dim=-1) + r  # S
    b = lam * tau  # d(λ τ² KL)/dz = λ τ (S q - t)
    if shared:
        assert z_k is not None
        # Tail columns: a p_i + b (S p_i - r p_i / Q_tail), with p_i = e_i exp(shift - lse)
        # and p_i / Q_tail = e_i exp(shift - tail_lse). Cached columns: from (n, k) values.
        g = e.mul_(((a + b * mass) * torch.exp(shift - lse)
                    - b * _tail_share(r, shift, tail_lse)).unsqueeze(-1))
        p_k = torch.exp(z_k - lse.unsqueeze(-1))  # (n, k)
        g.scatter_(-1, tg.ids, (a + b * mass).unsqueeze(-1) * p_k - b.unsqueeze(-1) * p_t)
        g.scatter_add_(-1, labels, -a.unsqueeze(-1))
        log_q, log_q_tail = z_k - lse.unsqueeze(-1), tail_lse - lse
    else:
        assert u is not None
        g = e.mul_((a * torch.exp(shift - lse)).unsqueeze(-1))  # (1 - λ) p
        g.scatter_add_(-1, labels, -a.unsqueeze(-1))
        eu, shift_u, tail_u, u_k, _ = _shifted_exp(u, tg.ids)
        assert u_k is not None
        lse_u = _lse_with(tail_u, u_k)  # (n,)
        g.add_(eu.mul_((b * (mass * torch.exp(shift_u - lse_u)
                             - _tail_share(r, shift_u, tail_u))).unsqueeze(-1)))
        del eu, u
        q_k = torch.exp(u_k - lse_u.unsqueeze(-1))  # (n, k), 0 in eu: added here
        g.scatter_add_(-1, tg.ids, b.unsqueeze(-1) * (mass.unsqueeze(-1) * q_k - p_t))
        log_q, log_q_tail = u_k - lse_u.unsqueeze(-1), tail_u - lse_u
    kd = divergence("forward", log_p, log_p_tail, log_q, log_q_tail)  # (n,)
    return g, a * ce + lam * (tau**2) * kd, ce, kd, correct


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) computes in here: autocast's, else the inputs'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and weight.is_floating_point():
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _FusedHeadLoss(torch.autograd.Function):
    """total = Σ_n L_n over all chunks; its gradients are formed in forward (module doc)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                targets: list[FusedTargets], cfg: LossConfig, kind: str, vocab_size: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = hidden.shape[0]
        cd = _compute_dtype(hidden, weight)
        float_dtype = torch.promote_types(cd, torch.float32)  # the loss: at least float32
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)  # gradient sums
        # Autocast off: every dtype below is explicit, and the head weight is cast once for
        # all chunks rather than once per matmul.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight[:vocab_size].to(cd)  # (V, H) the real ids only: a view when no cast
            b = None if bias is None else bias[:vocab_size].to(cd)  # (V,)
            grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
            grad_weight = (torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
                           if weight.requires_grad else None)  # (V_s, H): padded rows stay 0
            grad_bias = (torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
                         if bias is not None and bias.requires_grad else None)
            total = torch.zeros((), dtype=float_dtype, device=hidden.device)
            kd_sum = torch.zeros((), dtype=float_dtype, device=hidden.device)
            per_teacher = torch.zeros(len(targets), dtype=float_dtype, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            ce_tokens = []
            for start in range(0, n, cfg.chunk_size):
                sl = slice(start, start + cfg.chunk_size)
                h = hidden[sl].to(cd)  # (n_c, H)
                z = F.linear(h, w, b).to(float_dtype)  # (n_c, V), consumed by _chunk
                g, tot, ce, kd, right = _chunk(z if len(targets) == 1 else z.clone(),
                                               targets[0].rows(sl), cfg, kind)
                total += tot.sum()
                correct += right
                ce_tokens.append(ce)
                kd_sum += _weighted(kd, targets[0].rows(sl)).sum()
                per_teacher[0] += kd.sum()
                # Teachers 2..J: the gradient is a sum over teachers, each term from its own
                # copy of the logits (a consumed (n_c, V) copy and the sum: 3 such tensors).
                for j, tg in enumerate(targets[1:], start=1):
                    last = j == len(targets) - 1
                    g_j, tot, _, kd, _ = _chunk(z if last else z.clone(), tg.rows(sl), cfg,
                                                kind)
                    g += g_j
                    del g_j
                    total += tot.sum()
                    kd_sum += _weighted(kd, tg.rows(sl)).sum()
                    per_teacher[j] += kd.sum()
                g_cd = g.to(cd)  # (n_c, V) the matmuls run in the head's dtype, as autograd's
                del g, z
                if grad_hidden is not None:
                    grad_hidden[sl] = g_cd @ w
                if grad_weight is not None:
                    _add_matmul(grad_weight[:vocab_size], g_cd.t(), h)
                if grad_bias is not None:
                    grad_bias[:vocab_size] += g_cd.sum(dim=0)
                del g_cd  # before the next chunk's logits: one (n_c, V) tensor at a time
        ce_per_token = torch.cat(ce_tokens) if ce_tokens else hidden.new_zeros(
            0, dtype=float_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce_per_token, kd_sum, correct, per_teacher)
        return total, ce_per_token, kd_sum, correct, per_teacher

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        # Scaled in place: the stored gradients are used once. A second backward through the
        # same graph fails autograd's version check rather than reusing scaled values.
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_total.detach()
        out: list[Tensor | None] = []
        for grad, dtype in ((grad_hidden, None), (grad_weight, weight_dtype),
                            (grad_bias, bias_dtype)):
            if grad is None:
                out.append(None)
                continue
            grad = grad.mul_(scale.to(grad.dtype))
            out.append(grad if dtype is None else grad.to(dtype))
        return (*out, None, None, None, None)


def _weighted(kd: Tensor, tg: FusedTargets) -> Tensor:
    """(n,) w_j KD_j of one teacher's per-token KD (w_j = 1 when not given)."""
    return kd if tg.teacher_weight is None else kd * tg.teacher_weight.to(kd.dtype)


def _add_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, in out's dtype (float32 sums of lower-precision products)."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a, b)  # no (V, H) temporary
    else:
        out += (a @ b).to(out.dtype)


def fused_head_loss(hidden: Tensor, head: nn.Module | Tensor,
                    targets: FusedTargets | list[FusedTargets], cfg: LossConfig, kind: str,
                    vocab_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(total, per-token CE (N,), Σ KD, correct top-1, Σ KD_j per teacher (J,)) over N
    tokens, gradients fused.

    hidden (N, H); head: a weight (V_s, H) or an nn.Linear that `head_parameters` accepts
    (`fused_unsupported` is None); targets: per-token inputs, N rows, one FusedTargets per
    teacher (teacher 1 first; it alone carries CE). total = Σ_n [(1 - λ_n) CE_n + λ_n τ²
    Σ_j w_jn KD_jn] (mode ce: Σ CE_n) is differentiable with respect to hidden and the head's
    parameters that require grad; the rest are detached. KD is the forward KL on each
    teacher's partition or the sampled loss (module doc for the gradients; with J teachers
    dL/dz = (1 - λ)(p - y) + λ τ Σ_j w_j (S_j q - t_j), a sum of the one-teacher terms).
    Raises ValueError for a head the fused path cannot run."""
    params = head_parameters(head)
    if params is None:
        raise ValueError(f"the fused head needs a weight tensor or a plain nn.Linear, got "
                         f"{type(head).__name__}")
    if cfg.mode == "kd" and kind not in FUSED_KINDS:
        raise ValueError(f"the fused head computes {', '.join(FUSED_KINDS)}, not {kind!r}")
    weight, bias = params
    if isinstance(targets, FusedTargets):
        targets = [targets]
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] = _FusedHeadLoss.apply(
        hidden, weight, bias, targets, cfg, kind, vocab_size)
    return out
