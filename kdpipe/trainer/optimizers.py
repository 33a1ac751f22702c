"""`--optimizer`: AdamW, 8-bit AdamW, Adafactor or SGD, each from a maintained library.

* `adamw`: `torch.optim.AdamW`.
* `adamw-8bit`: bitsandbytes' `AdamW8bit` (optional extra `kdpipe[bnb]`): both moments
  quantized blockwise to 8 bits (tensors under 4096 values keep float32 moments, as in
  bitsandbytes). Chosen over torchao's `AdamW8bit` because its state is plain uint8/float32
  tensors, which `torch.load(weights_only=True)` reads in any process (torchao's is a tensor
  subclass, readable only once torchao has registered it as safe), it runs on CPU
  (bitsandbytes >= 0.50) without compiling a kernel per weight shape, and it is what
  transformers' Trainer uses (`adamw_bnb_8bit`). Not under --fsdp: its kernels take plain
  tensors, not FSDP's sharded DTensors.
* `adafactor`: `torch.optim.Adafactor` (torch >= 2.5): factored second moments (one row and
  one column vector per matrix), no first moment. Chosen over transformers' `Adafactor`
  because it is maintained in torch with foreach kernels and has no mode that silently
  ignores the LR schedule (transformers' default `relative_step=True`). In torch's version
  --lr is the largest *relative* step: each update is min(lr, 1/√t) times the weight's RMS.
  Not under --fsdp (its in-place updates of the factored statistics fail on DTensors).
* `sgd`: `torch.optim.SGD`, with --momentum (0: none, and no state at all).

Weight decay applies to matrices only (parameters with ≥ 2 dimensions), for every optimizer;
how each library applies it is in docs/training.md.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdpipe import extras
from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.choices import OPTIMIZERS
from kdpipe.trainer.precision import MasterWeightOptimizer

log = logging.getLogger(__name__)

BNB_HINT = "pip install 'kdpipe[bnb]'"
# The smallest tensor bitsandbytes quantizes (its default `min_8bit_size`): the probe uses one.
BNB_MIN_8BIT_SIZE = 4096


class OptimizerOptions(Protocol):
    """The options an optimizer is built from (a TrainConfig has them all)."""

    @property
    def optimizer(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def adam_beta1(self) -> float: ...
    @property
    def adam_beta2(self) -> float: ...
    @property
    def momentum(self) -> float: ...


def optimizer_problems(optimizer: str, momentum: float, fsdp: bool) -> list[str]:
    """Checks of --optimizer against the installed packages and the other options."""
    found = []
    if momentum > 0 and optimizer != "sgd":
        found.append(f"--momentum {momentum} applies to --optimizer sgd only (this run uses "
                     f"{optimizer}); leave it at 0")
    if optimizer == "adamw-8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            found.append(f"--optimizer adamw-8bit needs bitsandbytes: {BNB_HINT}")
        if fsdp:
            found.append("--optimizer adamw-8bit does not work with --fsdp (bitsandbytes' "
                         "kernels cannot update FSDP's sharded parameters); use --optimizer "
                         "adamw, or DDP (no --fsdp)")
    if optimizer == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        found.append(f"--optimizer adafactor needs torch >= 2.5 (torch.optim.Adafactor); "
                     f"this is torch {torch.__version__}")
    if optimizer == "adafactor" and fsdp:
        found.append("--optimizer adafactor does not work with --fsdp (torch's Adafactor "
                     "updates its factored statistics in place, which FSDP's sharded tensors "
                     "refuse); use --optimizer adamw or sgd, or DDP (no --fsdp)")
    return found


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices (≥ 2 dims) with `weight_decay`, the rest
    (biases, norms, other 1-D parameters) without."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerOptions, device: torch.device,
                    masters: dict[Tensor, Tensor] | None = None) -> torch.optim.Optimizer:
    """The --optimizer of `cfg` over `model`'s trainable parameters.

    `masters` ({weight: float32 master}, from `precision.to_training_precision`): when given,
    the optimizer updates the masters and copies them into the weights
    (`MasterWeightOptimizer`). Raises ConfigError (one line) when the optimizer cannot run
    here: bitsandbytes missing or without kernels for `device`.
    """
    groups = param_groups(model, cfg.weight_decay)

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return _make(cfg.optimizer, groups, cfg, device)

    if masters:
        return MasterWeightOptimizer(groups, masters, make)
    return make(groups)


def _make(name: str, groups: list[dict[str, Any]], cfg: OptimizerOptions, device: torch.device
          ) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)
    if name == "adamw-8bit":
        bnb = _bitsandbytes(device)
        optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=betas)
        return optimizer
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def _bitsandbytes(device: torch.device) -> Any:
    """bitsandbytes, checked to run an 8-bit AdamW step on `device` (a 4096-value probe)."""
    bnb = extras.require("bitsandbytes", "bnb", "--optimizer adamw-8bit")
    probe = torch.zeros(BNB_MIN_8BIT_SIZE, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    # Whatever a backend without 8-bit kernels raises (NotImplementedError, RuntimeError, a
    # missing native library) becomes one line; a working backend raises nothing here.
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"--optimizer adamw-8bit: bitsandbytes {getattr(bnb, '__version__', '?')} cannot "
            f"run 8-bit AdamW on {device.type} ({first}); upgrade it ({BNB_HINT}; on CPU, "
            "bitsandbytes 0.50 works), train on a CUDA GPU, or use --optimizer adamw") from exc
    return bnb
