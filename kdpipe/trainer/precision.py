"""`--precision`: the dtypes of the student's weights, gradients and forward pass in training.

* `fp32`: float32 weights and gradients, no autocast.
* `bf16-mixed`: float32 weights and gradients; the forward (and so the backward) runs under
  bfloat16 autocast, which casts each weight to bfloat16 where a matmul uses it.
* `bf16-master`: bfloat16 weights and gradients, the forward under the same autocast; the
  optimizer (`MasterWeightOptimizer`) keeps a float32 master copy of every bfloat16 weight,
  applies the update to the masters in float32 and copies them back, rounded, to the model.
  Checkpoints hold the masters, so `--resume` is exact and nothing is lost at save time.
* `auto`: `bf16-mixed` on a CUDA GPU with bfloat16, else `fp32` (the default before
  `--precision` existed).

There is no float16: without loss scaling small gradients underflow to zero. Bytes per
parameter of each choice are in docs/training.md ("Precision, optimizers and memory").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.choices import PRECISIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """A resolved --precision: what the forward autocasts to and what the weights are."""

    name: str  # fp32, bf16-mixed or bf16-master (never auto)
    autocast: torch.dtype | None  # None: no autocast
    weights: torch.dtype  # dtype of the model's trainable weights (and their gradients)

    @property
    def master_weights(self) -> bool:
        """Whether the optimizer keeps float32 masters of lower-precision weights."""
        return self.weights != torch.float32


def bf16_works(device: torch.device) -> bool:
    """Whether `device` runs a bfloat16 matmul and its backward under autocast (CUDA: whether
    the GPU has bfloat16). A CPU without native bfloat16 instructions still passes: torch
    emulates them, slowly."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        weight = torch.ones(2, 2, device=device, requires_grad=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = weight @ weight
        out.float().sum().backward()
        return out.dtype == torch.bfloat16
    except (RuntimeError, TypeError):  # no bfloat16 kernels, or no autocast for this device
        return False


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """The Precision of --precision `choice` on `device`; `auto` as the docstring above.

    Raises ConfigError (one line) for a bfloat16 choice on a device without bfloat16.
    """
    if choice == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        choice = "bf16-mixed" if cuda_bf16 else "fp32"
    if choice == "fp32":
        return Precision("fp32", None, torch.float32)
    if choice not in ("bf16-mixed", "bf16-master"):
        raise ConfigError(f"--precision {choice!r} is not one of {', '.join(PRECISIONS)}")
    if not bf16_works(device):
        raise ConfigError(f"--precision {choice}: this {device.type} device cannot compute in "
                          "bfloat16; use --precision fp32")
    weights = torch.bfloat16 if choice == "bf16-master" else torch.float32
    return Precision(choice, torch.bfloat16, weights)


def _kept_in_float32(model: nn.Module, name: str) -> bool:
    """Parameters transformers keeps in float32 whatever the load dtype (routers, gates: the
    model's `_keep_in_fp32_modules`), matched as transformers matches them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return any(module in name.split(".") for module in keep)


def to_training_precision(model: nn.Module, precision: Precision) -> dict[Tensor, Tensor]:
    """Cast the trainable weights to `precision.weights`; returns {parameter: float32 master}.

    Only parameters change: buffers (rotary frequencies, masks) stay as loaded, in float32.
    Each master is the weight's float32 value before the cast (exactly what was loaded: for
    a resumed run, the checkpoint's masters). Empty unless `precision.master_weights`. Call
    before the model is wrapped for DDP, which fixes its gradient buckets' dtype.
    """
    masters: dict[Tensor, Tensor] = {}
    if not precision.master_weights:
        return masters
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and not _kept_in_float32(model,
                                                                                       name):
            masters[param] = param.detach().to(torch.float32, copy=True)
            param.data = param.data.to(precision.weights)
    return masters


class MasterWeightOptimizer(torch.optim.Optimizer):
    """An optimizer over float32 masters of lower-precision (bfloat16) weights.

    `build(groups)` makes the inner optimizer (AdamW, SGD, ...) over the same parameter groups
    with each bfloat16 weight replaced by its float32 master, so its state is float32 too.
    `step` moves each bfloat16 gradient into its master's float32 `.grad` (freeing the
    bfloat16 one), runs the inner step, and copies the updated masters, rounded to nearest,
    into the model. `param_groups` and `state` are the inner optimizer's, so an LR scheduler
    attached here drives it, and `state_dict` is the inner optimizer's own (the masters
    themselves are saved as the model's weights: `master_state_dict`).
    """

    def __init__(self, groups: list[dict[str, Any]], masters: dict[Tensor, Tensor],
                 build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> None:
        self.pairs = [(p, masters[p]) for group in groups for p in group["params"]
                      if p in masters]  # (model weight, its float32 master)
        self.inner = build([{**group, "params": [masters.get(p, p) for p in group["params"]]}
                            for group in groups])
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.state = self.inner.state

    def master_gradients(self) -> list[Tensor]:
        """Every parameter the inner optimizer updates that has a gradient, after moving the
        bfloat16 gradients onto the masters in float32 (so clipping and the gradient norm
        are computed in float32). Idempotent."""
        for param, master in self.pairs:
            if param.grad is not None:
                master.grad = param.grad.to(master.dtype)
                param.grad = None  # freed before the update: the step's peak is 4 B lower
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MasterWeightOptimizer.step takes no closure")
        self.master_gradients()
        self.inner.step()
        for param, master in self.pairs:
            param.copy_(master)
            master.grad = None
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for param, _ in self.pairs:
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        # load_state_dict makes new group dicts: share them again (the scheduler sets lr here)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state


def gradient_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[Tensor]:
    """The tensors whose gradients the step clips and measures: the float32 masters under
    `bf16-master` (gradients moved onto them), else the model's parameters with a gradient."""
    if isinstance(optimizer, MasterWeightOptimizer):
        return optimizer.master_gradients()
    return [p for p in model.parameters() if p.grad is not None]


def master_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer
                      ) -> dict[str, Tensor] | None:
    """The model's state dict with the float32 masters in place of their bfloat16 weights
    (what a `bf16-master` checkpoint saves), or None when there are no masters."""
    if not isinstance(optimizer, MasterWeightOptimizer):
        return None
    masters = {id(param): master for param, master in optimizer.pairs}
    state = model.state_dict()
    for name, param in model.named_parameters(remove_duplicate=False):  # tied: both names
        if id(param) in masters:
            state[name] = masters[id(param)]
    return state

