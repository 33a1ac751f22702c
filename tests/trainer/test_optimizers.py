"""--optimizer: each one resumes exactly, decays matrices only, holds the state docs/training.md
says, and is refused with one line where it cannot run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer import optimizers
from kdpipe.trainer.checkpoint import OPTIMIZER_KEY, TRAINING_STATE_NAME
from kdpipe.trainer.choices import OPTIMIZERS
from kdpipe.trainer.optimizers import build_optimizer
from kdpipe.trainer.precision import Precision, to_training_precision
from kdpipe.trainer.train import train

from .conftest import small_config

CPU = torch.device("cpu")
NO_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                            reason="bitsandbytes is not installed (pip install 'kdpipe[bnb]')")


def _needs(name: str) -> Any:
    return pytest.param(name, marks=NO_BNB) if name == "adamw-8bit" else name


RUNS = [pytest.param(optimizer, precision, id=f"{optimizer}-{precision}",
                     marks=[NO_BNB] if optimizer == "adamw-8bit" else [])
        for optimizer, precision in [("adamw", "fp32"), ("adamw-8bit", "fp32"),
                                     ("adafactor", "fp32"), ("sgd", "fp32"),
                                     ("adamw", "bf16-master"), ("adamw-8bit", "bf16-master")]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("optimizer", "precision"), RUNS)
def test_resume_is_exact(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                         optimizer: str, precision: str) -> None:
    """3 steps, a checkpoint, resumed to 6: the same metrics and bit-identical weights as 6
    steps without a stop. The optimizer state loads with weights_only=True (resume does)."""
    full = tmp_path / "full"
    cfg = small_config(tiny_cache, full, student=str(tiny_student_dir), max_steps=6,
                       save_every=3, optimizer=optimizer, precision=precision,
                       momentum=0.9 if optimizer == "sgd" else 0.0, lr=1e-2, snapshots=False)
    uninterrupted = train(cfg)
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    layout = RunLayout(crashed)
    shutil.rmtree(layout.checkpoint(6))
    shutil.rmtree(layout.final)
    layout.final_metrics.unlink()
    state = torch.load(layout.checkpoint(3) / TRAINING_STATE_NAME, weights_only=True)
    assert state[OPTIMIZER_KEY]["state"], "the optimizer saved its state"

    resumed = train(replace(cfg, out=str(crashed), resume=True))
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert _jsonl(crashed / "metrics.jsonl") == _jsonl(full / "metrics.jsonl")
    a = load_file(RunLayout(full).final / "model.safetensors")
    b = load_file(layout.final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tiny_student_dir / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a), "training moved the weights"
    # bf16-master saves the float32 masters, not their bfloat16 copies
    assert all(v.dtype == torch.float32 for v in a.values())


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 128), nn.LayerNorm(128), nn.Linear(128, 64))


@pytest.mark.parametrize("name", [_needs(name) for name in OPTIMIZERS])
def test_weight_decay_applies_to_matrices_only(tmp_path: Path, tiny_cache: Path,
                                               name: str) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student="x", optimizer=name,
                       weight_decay=0.3)
    model = _tiny()
    opt = build_optimizer(model, cfg, CPU)
    decay = {id(p): group["weight_decay"] for group in opt.param_groups
             for p in group["params"]}
    for param in model.parameters():
        assert decay[id(param)] == (0.3 if param.dim() >= 2 else 0.0)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in opt.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(("name", "momentum"), [("adamw", 0.0),
                                                pytest.param("adamw-8bit", 0.0, marks=NO_BNB),
                                                ("adafactor", 0.0), ("sgd", 0.0),
                                                ("sgd", 0.9)])
def test_state_bytes_are_as_documented(tmp_path: Path, tiny_cache: Path, name: str,
                                       momentum: float) -> None:
    """docs/training.md's bytes per parameter, on an embedding (64 × 128 = 8192 values, which
    bitsandbytes quantizes), a norm and a linear layer (8192 + 64 values)."""
    cfg = small_config(tiny_cache, tmp_path / "run", student="x", optimizer=name,
                       momentum=momentum)
    model = _tiny()
    opt = build_optimizer(model, cfg, CPU)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    per_tensor = {  # bytes of each tensor's state, formula of the docs' table
        "adamw": lambda s: 8 * _numel(s) + 4,  # m, v in float32, step
        # m, v in 8 bits, one float32 absmax per 256-value block each, two 256-entry float32
        # code books; tensors under 4096 values keep float32 m and v
        "adamw-8bit": lambda s: (2 * _numel(s) + 2 * 4 * -(-_numel(s) // 256) + 2 * 256 * 4
                                 if _numel(s) >= 4096 else 8 * _numel(s)),
        # a row and a column mean of squares per matrix (float32); a 1-D tensor keeps one
        # value per entry; step
        "adafactor": lambda s: 4 * (s[0] + s[1] if len(s) == 2 else s[0]) + 4,
        "sgd": lambda s: 4 * _numel(s) if momentum else 0,  # the momentum buffer
    }[name]
    assert _state_bytes(opt) == sum(per_tensor(s) for s in shapes)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def test_master_weights_update_in_float32_and_round_to_the_model() -> None:
    """A bf16-master step is AdamW on the float32 masters with the bfloat16 gradients; the
    model then holds the masters rounded to bfloat16."""
    model = _tiny()
    reference = [p.detach().clone() for p in model.parameters()]
    masters = to_training_precision(model, Precision("bf16-master", torch.bfloat16,
                                                     torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cfg = types.SimpleNamespace(optimizer="adamw", lr=1e-2, weight_decay=0.1, adam_beta1=0.9,
                                adam_beta2=0.95, momentum=0.0)
    opt = build_optimizer(model, cfg, CPU, masters)
    ref_params = [nn.Parameter(p) for p in reference]
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref_params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref_params if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.tensor([[1, 2, 3]])).float().sum().backward()
        for ref, param in zip(ref_params, model.parameters(), strict=True):
            ref.grad = param.grad.float()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        assert all(p.grad is None for p in model.parameters())
        for ref, param in zip(ref_params, model.parameters(), strict=True):
            assert torch.equal(masters[param], ref.detach())
            assert torch.equal(param.detach(), ref.detach().to(torch.bfloat16))


def test_config_problems(tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
                         ) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student="x", optimizer="adamw-8bit",
                       fsdp=True, momentum=0.5)
    problems = cfg.problems()
    assert any("--momentum 0.5 applies to --optimizer sgd only" in p for p in problems)
    assert any("adamw-8bit does not work with --fsdp" in p for p in problems)
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    assert any("pip install 'kdpipe[bnb]'" in p for p in replace(cfg, fsdp=False).problems())
    monkeypatch.delattr(torch.optim, "Adafactor")
    problems = replace(cfg, optimizer="adafactor", momentum=0.0).problems()
    assert any("adafactor needs torch >= 2.5" in p for p in problems)


def test_bitsandbytes_without_kernels_for_the_device_is_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class NoKernel:
        def __init__(self, params: Any, lr: float) -> None:
            pass

        def step(self) -> None:
            raise NotImplementedError("No kernel for optimizer_update_8bit_blockwise on cpu\n"
                                      "traceback details")

    fake = types.SimpleNamespace(__version__="0.42.0", optim=types.SimpleNamespace(
        AdamW8bit=NoKernel))
    monkeypatch.setattr(optimizers.extras, "require", lambda *args: fake)
    with pytest.raises(ConfigError) as caught:
        optimizers._bitsandbytes(CPU)
    message = str(caught.value)
    assert "\n" not in message and "bitsandbytes 0.42.0 cannot run 8-bit AdamW on cpu" in message
    assert "No kernel for" in message and "--optimizer adamw" in message
