"""How the student's body runs in training: attention kernel, activation checkpointing,
torch.compile. None of them changes the loss beyond rounding, only memory and speed.

* `--attn-implementation` (sdpa, flash_attention_2, eager; default: the model's own) is
  passed to transformers when the student is built, so it lands in
  `model.config._attn_implementation`, where `packing.forward_inputs` reads it to choose a
  packed batch's inputs (flash-attention needs the documents' offsets).
* `--gradient-checkpointing`: the model's own `activation_checkpointing_enable` (or its
  older name, `gradient_checkpointing_enable`, where transformers lacks it; non-reentrant
  `torch.utils.checkpoint` around each transformer block): backward keeps only each block's
  input and recomputes the rest, one more body forward per step. The output head is
  checkpointed in chunks already (`chunked_loss.py`), whatever this option.
* `--compile`: `torch.compile` of the body, falling back to eager, with one warning, when it
  fails (no compiler, an unsupported model).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdpipe.schemas.errors import ConfigError

if TYPE_CHECKING:
    from kdpipe.model_parts import ModelParts

log = logging.getLogger(__name__)

def attention_problems(attn_implementation: str | None) -> list[str]:
    """flash_attention_2 needs the flash-attn package (transformers imports it lazily, and
    would fail only when the student is built)."""
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec(
            "flash_attn") is None:
        return ["--attn-implementation flash_attention_2 needs the flash-attn package (pip "
                "install flash-attn, on a CUDA machine); use sdpa"]
    return []


def enable_gradient_checkpointing(model: nn.Module, name: str) -> None:
    """Checkpoint every transformer block of `model` (non-reentrant: no inputs need
    requires_grad, and it composes with the chunked head's checkpoints).

    Raises ConfigError when the architecture has no gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {name} ({type(model).__name__}) does not "
                          "support gradient checkpointing; train without it")
    kwargs = {"use_reentrant": False}
    # The newer name; transformers keeps the older one as a deprecated alias.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs=kwargs)


class CompiledBody(nn.Module):
    """The body through `torch.compile`, or eagerly from the first failure on (one warning).

    Not registered in the model (`ModelParts.body` is a plain attribute), so parameters,
    state dicts and DDP/FSDP see the model exactly as without --compile.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.eager = body
        self.compiled: Any = None
        try:
            self.compiled = torch.compile(body)
        except Exception as exc:  # e.g. dynamo unsupported on this Python: torch's own types
            self._give_up(exc)

    def _give_up(self, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("--compile: torch.compile does not work for this student here (%s: %s); "
                    "running it without compiling", type(exc).__name__, first[:300])
        self.compiled = None

    def forward(self, **inputs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(**inputs)
            except torch.OutOfMemoryError:
                raise  # not a compile failure: eager would run out of memory too
            # torch.compile's failures share no base class (dynamo, inductor, a missing C++
            # compiler). A genuine error of the model raises again from the eager call below.
            except Exception as exc:
                self._give_up(exc)
        return self.eager(**inputs)


def compile_body(parts: ModelParts) -> None:
    """Run `parts.body` through torch.compile from now on (falling back as CompiledBody)."""
    parts.body = CompiledBody(parts.body)
