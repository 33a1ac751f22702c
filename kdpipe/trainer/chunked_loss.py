"""The student's output head and loss, computed a chunk of tokens at a time.

For a student with a large vocabulary the (N, V) float32 logits are by far the largest
tensor of a training step (8k tokens × 128k vocab × 4 bytes = 4 GiB, plus the same again for
their log-softmax and gradient). Here the head runs on `chunk_size` tokens at a time, on one
of two paths, chosen automatically per call:

* **fused** (`fused_head.py`), for mode ce, `--loss forward` on a top-k cache (k < V) and
  `--loss sampled`, with a plain `nn.Linear` head (or a weight tensor; tied embeddings and a
  padded head included) and no logit transform. Each chunk's loss and its gradient with
  respect to the chunk's hidden states and the head's weight and bias come from closed forms
  in the forward pass, as in Liger's fused linear cross-entropy: nothing is recomputed in
  backward, and no (N, V) tensor lives beyond its chunk. It holds the head's (V_s, H)
  float32 gradient from forward to backward instead.
* **checkpointed autograd**, for everything else: the other divergences (zero, reverse,
  jsd, skew, tvd), a logit transform (soft-capping, logit scaling), a head that is not a
  plain `nn.Linear` (a peft adapter on the head, a subclass, a module with hooks or sharded
  parameters) and a cache whose top-k covers the whole vocabulary. Each chunk is wrapped in
  `torch.utils.checkpoint` (use_reentrant=False): only its input hidden states are kept and
  its logits are recomputed in backward, so every loss and head gets autograd's exact
  gradients with no hand-written backward, at the price of one extra head matmul per chunk
  (+1/3 of the head's FLOPs) and every element-wise op run twice. Which path runs, and why,
  is logged once per reason.

Several teachers (`teachers.py`): each token's KD is Σ_j w_j KD_j over the teachers' targets,
each on its own partition; both paths take them (the fused one sums the teachers' closed-form
gradients, holding 2 (chunk_size, V) tensors instead of 1 with two teachers, 3 with more).

Without gradients (evaluation), both reduce to the same forward and the plain one is run.
Peak extra memory is O(chunk_size × V) either way, measured on CPU in float32 (chunk_size, V)
tensors: about 5 on the autograd path (CE or forward KL), 1 on the fused path (2 at τ ≠ 1),
so with a 128k vocabulary and chunk_size=1024 (0.5 GiB each) ~2.5 GiB against ~0.5 GiB.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.fused_head import FusedTargets, fused_head_loss, fused_unsupported
from kdpipe.trainer.loss_config import SAMPLED, LossConfig
from kdpipe.trainer.losses import (
    divergence,
    sampled_cross_entropy,
    student_partition,
    teacher_partition,
)

log = logging.getLogger(__name__)


@dataclass
class TeacherTargets:
    """The cached teacher distribution, one row per real target token (padding removed)."""

    topk_ids: Tensor  # (N, k) int64
    topk_logprobs: Tensor  # (N, k) float16/float32
    tail_logmass: Tensor  # (N,) float32
    tempered_tail_logmass: Tensor | None = None  # (N,) exact log tail mass at cfg.temperature
    # Sampled caches: the unique ids drawn per token, padded, and their weights c_j / N (0 at
    # padding). The top-k fields then hold the most-drawn id (k = 1) for top-1 agreement.
    sampled_ids: Tensor | None = None  # (N, S) int64
    sampled_weights: Tensor | None = None  # (N, S) float32, rows sum to 1
    target_logprob: Tensor | None = None  # (N,) log p_T(label), when the loader read it

    @property
    def is_sampled(self) -> bool:
        return self.sampled_ids is not None

    def to(self, device: torch.device) -> TeacherTargets:
        """The same targets on `device` (copied asynchronously from pinned memory)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return TeacherTargets(
            topk_ids=self.topk_ids.to(device, non_blocking=True),
            topk_logprobs=self.topk_logprobs.to(device, non_blocking=True),
            tail_logmass=self.tail_logmass.to(device, non_blocking=True),
            tempered_tail_logmass=move(self.tempered_tail_logmass),
            sampled_ids=move(self.sampled_ids), sampled_weights=move(self.sampled_weights),
            target_logprob=move(self.target_logprob))


@dataclass
class LossSums:
    """Sums over the tokens given, not means: the loop divides by the global token count."""

    total: Tensor  # differentiable: Σ_n [(1 - λ_n) CE_n + λ_n τ² KD_n]
    ce: Tensor  # detached Σ CE_n
    kd: Tensor  # detached Σ KD_n (the divergence, no τ², no λ; KD_n = Σ_j w_jn KD_jn)
    correct_top1: Tensor  # detached count of tokens where student argmax == teacher top-1
    tokens: int
    ce_per_token: Tensor  # detached (N,) CE of each token: per-sample snapshots for free
    # detached (J,) Σ KD_j against each teacher (unweighted); (1,) with one teacher or none
    kd_per_teacher: Tensor | None = None


def _head_logits(head: torch.nn.Module | Tensor, hidden: Tensor) -> Tensor:
    if isinstance(head, Tensor):
        return F.linear(hidden, head)  # (n, V_s)
    return head(hidden)  # (n, V_s)


def _head_width(head: torch.nn.Module | Tensor) -> int | None:
    if isinstance(head, Tensor):
        return head.shape[0]
    weight = getattr(head, "weight", None)
    return weight.shape[0] if isinstance(weight, Tensor) else None


# Per-token columns of one teacher passed to `_chunk_loss` (each (n, ...) or None).
TEACHER_COLUMNS = 6  # top-k ids, top-k log-probs, tail, tempered tail, sampled ids, weights


def _chunk_loss(
    hidden: Tensor,
    labels: Tensor | None,
    lam_per_token: Tensor | None,
    teacher_weights: Tensor | None,
    *teacher_columns: Tensor | None,
    head: torch.nn.Module | Tensor,
    cfg: LossConfig,
    kind: str,
    vocab_size: int,
    logit_transform: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(total, per-token ce, Σ weighted KD, correct, Σ KD_j per teacher (J,)) of one chunk;
    the unit that checkpoint recomputes.

    `teacher_weights` (n, J) or None (one teacher); `teacher_columns`: J groups of
    TEACHER_COLUMNS per-token tensors (None where unused), teacher 1 first. `kind`: the
    divergence, `cfg.kind` resolved for the caches."""
    # The real ids only: a padded head's extra rows never enter the softmax (a view, no copy).
    logits = _head_logits(head, hidden)[:, :vocab_size]  # (n, V) in the head's dtype
    if logit_transform is not None:
        logits = logit_transform(logits)
    logits = logits.float()  # (n, V)
    assert labels is not None
    # CE as logsumexp - gathered logit: same value as F.cross_entropy, but it keeps only the
    # logits (alive anyway) for backward instead of a second (n, V) log-softmax.
    lse = torch.logsumexp(logits, dim=-1)  # (n,), shared with the KD term at τ = 1
    ce = lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    groups = [teacher_columns[j:j + TEACHER_COLUMNS]
              for j in range(0, len(teacher_columns), TEACHER_COLUMNS)]
    first_ids = groups[0][0] if groups else None
    if first_ids is not None:
        correct = (logits.argmax(dim=-1) == first_ids[:, 0]).sum()
    else:
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
    per_teacher = torch.zeros(len(groups), device=logits.device)
    if cfg.mode == "ce":
        zero = torch.zeros((), device=logits.device)
        return ce.sum(), ce.detach(), zero, correct, per_teacher
    assert lam_per_token is not None
    lam = lam_per_token.float()  # (n,)
    kd = torch.zeros_like(ce)  # (n,) Σ_j w_j KD_j
    kd_terms = []
    for ids, lps, tail, tempered, sampled_ids, sampled_weights in groups:
        if kind == SAMPLED:  # τ = 1 (LossConfig refuses others)
            assert sampled_ids is not None and sampled_weights is not None
            log_q_ids = logits.gather(-1, sampled_ids) - lse.unsqueeze(-1)  # (n, S)
            kd_terms.append(sampled_cross_entropy(log_q_ids, sampled_weights))  # (n,)
            continue
        assert ids is not None and lps is not None and tail is not None
        log_p, log_p_tail = teacher_partition(lps, tail, cfg.temperature, vocab_size, tempered)
        log_q, log_q_tail = student_partition(logits, ids, cfg.temperature,
                                              lse if cfg.temperature == 1.0 else None)
        kd_terms.append(divergence(kind, log_p, log_p_tail, log_q, log_q_tail, cfg.beta,
                                   cfg.alpha))  # (n,)
    for j, kd_j in enumerate(kd_terms):
        kd = kd + (kd_j if teacher_weights is None else teacher_weights[:, j].float() * kd_j)
        per_teacher[j] = kd_j.detach().sum()
    scale = 1.0 if kind == SAMPLED else cfg.temperature**2
    total = ((1.0 - lam) * ce + lam * scale * kd).sum()
    return total, ce.detach(), kd.detach().sum(), correct, per_teacher


def _checked_kind(hidden: Tensor, head: torch.nn.Module | Tensor, labels: Tensor,
                  lam_per_token: Tensor | None, cfg: LossConfig,
                  teachers: Sequence[TeacherTargets], teacher_weights: Tensor | None,
                  vocab_size: int) -> str:
    """The divergence to compute, once the inputs of `chunked_distill_loss` are consistent:
    shapes, λ, teacher targets and (J, N) teacher weights for mode kd, a loss that suits the
    caches, a head with a row for every real id. Raises ValueError (a caller's bug) or
    ConfigError (the user's input)."""
    n = hidden.shape[0]
    if hidden.dim() != 2 or labels.shape != (n,):
        raise ValueError(f"expected hidden (N, H) and labels (N,), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    kd_mode = cfg.mode == "kd"
    if kd_mode and not teachers:
        raise ValueError("mode 'kd' needs the teacher's cached targets; pass teacher=...")
    if kd_mode and (lam_per_token is None or lam_per_token.shape != (n,)):
        raise ValueError(f"lam_per_token must be a (N,) = ({n},) tensor of λ per token in mode "
                         "'kd'")
    for teacher in teachers:
        if teacher.topk_ids.shape[0] != n or teacher.topk_logprobs.shape != teacher.topk_ids.shape:
            raise ValueError(f"teacher targets {tuple(teacher.topk_ids.shape)} / "
                             f"{tuple(teacher.topk_logprobs.shape)} do not match N = {n} tokens")
    if teacher_weights is not None and teacher_weights.shape != (len(teachers), n):
        raise ValueError(f"teacher_weights must be (J, N) = ({len(teachers)}, {n}), got "
                         f"{tuple(teacher_weights.shape)}")
    sampled = bool(teachers) and teachers[0].is_sampled
    if any(t.is_sampled != sampled for t in teachers):
        raise ConfigError("the teachers' caches mix top-k and sampled targets; one --loss "
                          "serves every teacher, so cache every teacher with the same "
                          "--cache-mode")
    kind = cfg.resolved(sampled)
    if kd_mode and teachers and sampled != (kind == SAMPLED):
        raise ConfigError(f"--loss {kind} needs a top-k cache, but this cache is sampled "
                          "(--cache-mode sampled): use --loss sampled" if sampled else
                          "--loss sampled needs a sampled cache (`kdpipe cache-teacher "
                          "--cache-mode sampled`); this cache holds top-k log-probs: use "
                          "--loss forward")
    width = _head_width(head)
    if width is not None and width < vocab_size:
        raise ConfigError(f"the student's output head has {width} rows, fewer than the "
                          f"{vocab_size} real ids of the cache's tokenizer; the student must "
                          "have a row for every id")
    return kind


def chunked_distill_loss(
    hidden: Tensor,
    head: torch.nn.Module | Tensor,
    labels: Tensor,
    lam_per_token: Tensor | None,
    cfg: LossConfig,
    teacher: TeacherTargets | None,
    vocab_size: int,
    logit_transform: Callable[[Tensor], Tensor] | None = None,
    *,
    other_teachers: Sequence[TeacherTargets] = (),
    teacher_weights: Tensor | None = None,
) -> LossSums:
    """Loss sums over N real target tokens, computed `cfg.chunk_size` tokens at a time.

    hidden (N, H): final hidden states at the real target positions, already flattened.
    head: the student's output layer (a module such as nn.Linear, or a weight (V_s, H)).
    labels (N,): true next tokens. lam_per_token (N,): λ of each token (ignored, may be None, when
    cfg.mode == "ce"). teacher: the cached targets of the same N tokens (None allowed in ce
    mode). vocab_size: manifest.vocab_size, the tokenizer's real ids: both CE and KD use the
    softmax over the head's first `vocab_size` rows (the rest of a padded head is left out;
    docs/training.md). logit_transform: applied to each chunk's logits (e.g. soft-capping).
    Several teachers (trainer/teachers.py): `other_teachers` are teachers 2..J's targets of
    the same tokens and `teacher_weights` (J, N) their per-token weights w_j (columns sum to
    1; None: equal), so KD_n = Σ_j w_jn KD_jn, each on teacher j's own partition.
    With gradients on, the fused path runs whenever `fused_unsupported` finds nothing against
    it, else the checkpointed autograd path (module docstring); both give the same sums.
    """
    n = hidden.shape[0]
    teachers = () if teacher is None else (teacher, *other_teachers)
    if teachers and teacher_weights is None and len(teachers) > 1:
        teacher_weights = hidden.new_full((len(teachers), n), 1.0 / len(teachers),
                                          dtype=torch.float32)
    kind = _checked_kind(hidden, head, labels, lam_per_token, cfg, teachers, teacher_weights,
                         vocab_size)
    if torch.is_grad_enabled():
        top_k = max((t.topk_ids.shape[1] for t in teachers), default=None)
        reason = fused_unsupported(head, cfg, kind, vocab_size, top_k, logit_transform)
        if reason is None:
            return _fused(hidden, head, labels, lam_per_token, cfg, teachers, teacher_weights,
                          vocab_size, kind)
        _log_autograd_path(reason)
    kd_mode = cfg.mode == "kd"
    # Per-token inputs of the chunk function; teacher columns only where they are used (in
    # mode ce, teacher 1's ids alone, for top-1 agreement).
    weights = teacher_weights.t() if kd_mode and teacher_weights is not None else None  # (N, J)
    columns: list[Tensor | None] = [labels, lam_per_token if kd_mode else None, weights]
    for j, t in enumerate(teachers if kd_mode else teachers[:1]):
        columns.append(t.topk_ids.long() if j == 0 or not t.is_sampled else None)  # (N, k)
        if kd_mode and t.is_sampled:
            columns += [None, None, None, t.sampled_ids, t.sampled_weights]
        elif kd_mode:
            tempered = t.tempered_tail_logmass if cfg.temperature != 1.0 else None
            columns += [t.topk_logprobs, t.tail_logmass, tempered, None, None]
        else:
            columns += [None] * (TEACHER_COLUMNS - 1)
    chunk_fn = functools.partial(_chunk_loss, head=head, cfg=cfg, kind=kind,
                                 vocab_size=vocab_size, logit_transform=logit_transform)

    use_checkpoint = torch.is_grad_enabled()  # here: a head or loss the fused path lacks
    totals: list[Tensor] = []
    ce_tokens: list[Tensor] = []
    kd_sum = torch.zeros((), device=hidden.device)
    per_teacher = torch.zeros(max(len(teachers), 1), device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, n, cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        pieces = [None if c is None else c[sl] for c in columns]
        if use_checkpoint:  # the chunk's logits are recomputed in backward, never kept
            out = checkpoint(chunk_fn, hidden[sl], *pieces, use_reentrant=False)
        else:
            out = chunk_fn(hidden[sl], *pieces)
        totals.append(out[0])
        ce_tokens.append(out[1])
        kd_sum = kd_sum + out[2]
        correct = correct + out[3]
        per_teacher[:out[4].numel()] += out[4]
    # With no tokens: a zero that is still connected to the graph, so backward() works.
    total = torch.stack(totals).sum() if totals else hidden.float().sum() * 0.0
    ce_per_token = torch.cat(ce_tokens) if ce_tokens else hidden.new_zeros(0, dtype=torch.float32)
    return LossSums(total=total, ce=ce_per_token.sum(), kd=kd_sum, correct_top1=correct,
                    tokens=n, ce_per_token=ce_per_token, kd_per_teacher=per_teacher)


@functools.cache
def _log_autograd_path(reason: str) -> None:
    """Say once per reason that the output head runs on the checkpointed autograd path."""
    log.info("output head and loss: checkpointed autograd path (%s); the fused path covers "
             "CE, forward KL on the top-k + tail partition and the sampled loss with a plain "
             "linear head", reason)


def _fused(hidden: Tensor, head: torch.nn.Module | Tensor, labels: Tensor,
           lam_per_token: Tensor | None, cfg: LossConfig, teachers: Sequence[TeacherTargets],
           teacher_weights: Tensor | None, vocab_size: int, kind: str) -> LossSums:
    """chunked_distill_loss on the fused path (fused_head.py), inputs already checked: one
    FusedTargets per teacher (mode ce: teacher 1's ids only, for top-1 agreement)."""
    targets = []
    for j, teacher in enumerate(teachers if cfg.mode == "kd" else teachers[:1]):
        tg = FusedTargets(labels, ids=teacher.topk_ids.long(), with_ce=j == 0)
        if cfg.mode == "kd":
            tg.lam = lam_per_token
            tg.teacher_weight = None if teacher_weights is None else teacher_weights[j]
            if teacher.is_sampled:
                assert teacher.sampled_ids is not None
                tg.sampled_ids = teacher.sampled_ids.long()
                tg.sampled_weights = teacher.sampled_weights
            else:
                tempered = teacher.tempered_tail_logmass if cfg.temperature != 1.0 else None
                # (N, k + 1) values, computed once for all chunks.
                tg.log_p, tg.log_p_tail = teacher_partition(
                    teacher.topk_logprobs, teacher.tail_logmass, cfg.temperature, vocab_size,
                    tempered)
        targets.append(tg)
    if not targets:
        targets.append(FusedTargets(labels))
    total, ce_per_token, kd, correct, per_teacher = fused_head_loss(hidden, head, targets, cfg,
                                                                    kind, vocab_size)
    return LossSums(total=total, ce=ce_per_token.sum(), kd=kd, correct_top1=correct,
                    tokens=hidden.shape[0], ce_per_token=ce_per_token,
                    kd_per_teacher=per_teacher)
