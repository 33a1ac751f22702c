"""The training objective as one module: student body → hidden states at targets → chunked loss.

DDP and FSDP act at a module's forward: DDP arms its gradient hooks there, and FSDP gathers
the sharded parameters of the embeddings, final norm and head (which the chunked loss calls
directly, outside the model's own forward). So training and evaluation call the student
through this module; on one process it is a plain function of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from kdpipe.model_parts import ModelParts
from kdpipe.trainer.chunked_loss import LossSums, chunked_distill_loss
from kdpipe.trainer.data import Batch
from kdpipe.trainer.loss_config import LossConfig

Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class StudentObjective(nn.Module):
    """forward(batch, λ per target token, loss config, teacher weights) → the loss sums of one
    micro-batch."""

    def __init__(self, parts: ModelParts, vocab_size: int) -> None:
        super().__init__()
        self.model = parts.model  # registered, so DDP/FSDP see every parameter
        self.parts = parts  # a plain attribute: body and head are submodules of `model`
        self.vocab_size = vocab_size

    def forward(self, batch: Batch, lam_per_token: Tensor | None, cfg: LossConfig,
                teacher_weights: Tensor | None = None) -> Outputs:
        """(total, Σ CE, Σ KD, correct top-1, (N,) CE per token, (J,) Σ KD_j per teacher):
        tensors only, so DDP and FSDP can find them; `sums` turns them back into LossSums.
        teacher_weights (J, N): the weight of each teacher's KD term per token (several
        teachers, `batch.other_teachers`; None: equal)."""
        hidden = self.parts.hidden_states(batch.input_ids, batch.attention_mask,
                                          batch.segments)  # (B, T, H)
        hidden = hidden[batch.target_mask]  # (N, H) real target positions only
        out = chunked_distill_loss(hidden, self.parts.head, batch.labels, lam_per_token, cfg,
                                   batch.teacher, self.vocab_size,
                                   self.parts.logit_transform,
                                   other_teachers=batch.other_teachers,
                                   teacher_weights=teacher_weights)
        assert out.kd_per_teacher is not None
        return (out.total, out.ce, out.kd, out.correct_top1, out.ce_per_token,
                out.kd_per_teacher)


def sums(outputs: Outputs) -> LossSums:
    total, ce, kd, correct, ce_per_token, kd_per_teacher = outputs
    return LossSums(total=total, ce=ce, kd=kd, correct_top1=correct,
                    tokens=int(ce_per_token.numel()), ce_per_token=ce_per_token,
                    kd_per_teacher=kd_per_teacher)


def call(objective: nn.Module, batch: Batch, lam_per_token: Tensor | None, cfg: LossConfig,
         teacher_weights: Tensor | None = None) -> LossSums:
    """Run a (possibly DDP/FSDP-wrapped) StudentObjective on one micro-batch."""
    out: Outputs = objective(batch, lam_per_token, cfg, teacher_weights)
    return sums(out)


def no_grad_sync(objective: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction of a micro-batch that is not its step's last (when `skip`).

    DDP: its `no_sync()` context; FSDP2: `set_requires_gradient_sync(False)`; one process:
    nothing to skip.
    """
    if not skip:
        return contextlib.nullcontext()
    no_sync = getattr(objective, "no_sync", None)
    if callable(no_sync):
        return no_sync()
    setter = getattr(objective, "set_requires_gradient_sync", None)
    if callable(setter):
        return _fsdp_no_sync(setter)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(setter: object) -> Iterator[None]:
    assert callable(setter)
    setter(False)
    try:
        yield
    finally:
        setter(True)
