"""A causal LM as body (→ final hidden states), output head and logit transform.

Both sides compute the head in chunks of positions, never building (B, T, V) logits: the
student's loss (`trainer/chunked_loss.py`) and the teacher's reduction to top-k + tail
(`pipeline/teacher_hf.py`). That split is only correct if `transform(head(body(x)))` equals
the model's own logits: `split_model` checks this numerically on a few tokens, and a model
whose head does something else is refused (student) or run whole (teacher).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.packing import RowSegments, forward_inputs

log = logging.getLogger(__name__)

SPLIT_CHECK_TOKENS = 8  # tokens of the numerical head-split check
SPLIT_CHECK_TOLERANCE = 1e-3  # relative to the logits' scale


class SplitError(ValueError):
    """The model has no separate body and head, or they do not reproduce its logits."""


def known_transform(config: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """Logit transforms transformers applies after the head, by config attribute, written
    with the same operations in the same order as transformers (so float32 results match
    bit for bit), and how to describe it."""
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        return (lambda z: torch.tanh(z / cap) * cap), f"soft-cap {cap}"
    scale = getattr(config, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        return (lambda z: z * scale), f"logit scale {scale}"
    divide = getattr(config, "logits_scaling", None)  # Granite
    if isinstance(divide, (int, float)) and divide != 1:
        return (lambda z: z / divide), f"logits scaling 1/{divide}"
    return None, "none"


@dataclass
class ModelParts:
    """A causal LM as kdpipe runs it: body → hidden states, head, optional transform."""

    model: nn.Module
    body: nn.Module
    head: nn.Module
    logit_transform: Callable[[torch.Tensor], torch.Tensor] | None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      segments: Sequence[RowSegments] | None = None) -> torch.Tensor:
        """(B, T) ids → (B, T, H) final hidden states (after the final norm). `segments`: per
        row, the lengths of the documents packed into it, which never attend to each other
        (`packing.forward_inputs`); None: one document per row."""
        out = self.body(input_ids=input_ids,
                        **forward_inputs(attention_mask, segments, self.model.config))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states → (..., V_head) logits, transform applied."""
        z = self.head(hidden)
        return self.logit_transform(z) if self.logit_transform is not None else z


def split_model(model: nn.Module, name: str) -> ModelParts:
    """Find body and head, and check on a few tokens that they reproduce the model's logits.

    A peft model (LoRA adapters) holds the transformers model, adapters injected, inside: its
    body and head are that model's (a head with an adapter is a peft layer). Raises
    SplitError naming `name` when there is no separate body and head, or when they differ
    from the model's logits by more than SPLIT_CHECK_TOLERANCE of their scale.
    """
    unwrap = getattr(model, "get_base_model", None)
    inner = unwrap() if callable(unwrap) else model
    body = getattr(inner, "base_model", None)
    head = inner.get_output_embeddings()  # type: ignore[operator]
    if body is None or body is inner or head is None:
        raise SplitError(f"{name}: {type(inner).__name__} has no separate base model and "
                         "output embeddings; kdpipe cannot compute its head in chunks")
    transform, described = known_transform(inner.config)
    parts = ModelParts(model, body, head, transform)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = min(model.get_input_embeddings().weight.shape[0], 1000)  # type: ignore[operator]
    ids = torch.arange(SPLIT_CHECK_TOKENS, device=device)[None, :] % vocab  # (1, T)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        found = parts.logits(parts.hidden_states(ids, mask)).float()
    model.train(was_training)
    error = (expected - found).abs().max().item()
    if error > SPLIT_CHECK_TOLERANCE * max(1.0, expected.abs().max().item()):
        raise SplitError(
            f"{name}: {type(model).__name__} computes its logits differently from "
            f"output_embeddings(final hidden states) (known transform: {described}; max "
            f"difference {error:.3g})")
    log.info("%s: body %s, head %s, logit transform %s", name, type(body).__name__,
             type(head).__name__, described)
    return parts
