"""--precision, --gradient-checkpointing, --compile and --attn-implementation: what each
changes (memory, dtypes, kernels) and what it must not (the loss and its gradients)."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.model_parts import ModelParts
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import CacheIndex, build_index, columns_for
from kdpipe.trainer import execution, precision
from kdpipe.trainer.config import EvalConfig, TrainConfig, read_config
from kdpipe.trainer.data import BatchLoader, GlobalBatch
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.execution import compile_body, enable_gradient_checkpointing
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.model import open_student, split_student
from kdpipe.trainer.objective import StudentObjective
from kdpipe.trainer.precision import resolve_precision
from kdpipe.trainer.reliance import StepLambdas
from kdpipe.trainer.train import accumulate_gradients, train

from .conftest import small_config

CPU = torch.device("cpu")
VOCAB = 320


# --- --precision --------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "expected"), [("auto", "auto"), ("float32", "fp32"),
                                                 ("bfloat16", "bf16-mixed")])
def test_a_run_folder_with_the_old_dtype_option_still_reads(tmp_path: Path, tiny_cache: Path,
                                                             dtype: str, expected: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = small_config(tiny_cache, run, student="s")
    old = cfg.to_json_dict()
    for name in ("precision", "optimizer", "momentum", "attn_implementation",
                 "gradient_checkpointing", "compile"):
        del old[name]  # options that came with --precision
    old["dtype"] = dtype  # what run folders held before
    RunLayout(run).config.write_text(json.dumps(old))
    assert read_config(run) == replace(cfg, precision=expected)


def test_checkpointing_and_compile_may_change_on_resume(tmp_path: Path, tiny_cache: Path,
                                                        tiny_student_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """They change how the body runs, not what it computes: a run resumed with them
    continues as it would have without."""
    monkeypatch.setattr(torch, "compile", lambda module: module)  # a compile that works
    cfg = small_config(tiny_cache, tmp_path / "full", student=str(tiny_student_dir),
                       max_steps=4, save_every=2, snapshots=False)
    straight = train(cfg)
    crashed = RunLayout(tmp_path / "crashed")
    shutil.copytree(tmp_path / "full", crashed.root)
    for folder in (crashed.checkpoint(4), crashed.final):
        shutil.rmtree(folder)
    crashed.final_metrics.unlink()
    resumed = train(replace(cfg, out=str(crashed.root), resume=True,
                            gradient_checkpointing=True, compile=True))
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)


def test_precisions_resolve_to_autocast_and_weight_dtypes() -> None:
    assert resolve_precision("auto", CPU) == precision.Precision("fp32", None, torch.float32)
    mixed = resolve_precision("bf16-mixed", CPU)
    assert (mixed.autocast, mixed.weights, mixed.master_weights) == (torch.bfloat16,
                                                                     torch.float32, False)
    master = resolve_precision("bf16-master", CPU)
    assert (master.autocast, master.weights, master.master_weights) == (torch.bfloat16,
                                                                        torch.bfloat16, True)


def test_bf16_on_a_cpu_without_it_is_one_line(tmp_path: Path, tiny_cache: Path,
                                              tiny_student_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "bf16_works", lambda device: False)
    for choice in ("bf16-mixed", "bf16-master"):
        with pytest.raises(ConfigError, match=f"--precision {choice}: this cpu device cannot "
                                              "compute in bfloat16; use --precision fp32"):
            train(small_config(tiny_cache, tmp_path / choice, student=str(tiny_student_dir),
                               precision=choice))
    assert resolve_precision("auto", CPU).name == "fp32"  # auto never asks for bfloat16 on CPU


def test_config_refusals(tmp_path: Path, tiny_cache: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student="s", precision="fp16")
    with pytest.raises(ConfigError, match="--precision 'fp16' is not one of"):
        cfg.validate()
    cfg = small_config(tiny_cache, tmp_path / "run", student="s", precision="bf16-master",
                       fsdp=True, optimizer="adafactor")
    problems = cfg.problems()
    assert any("--precision bf16-master does not work with --fsdp" in p for p in problems)
    assert any("--optimizer adafactor does not work with --fsdp" in p for p in problems)


def test_every_precision_trains_to_about_the_fp32_loss(tmp_path: Path, tiny_cache: Path,
                                                      tiny_student_dir: Path) -> None:
    results = {choice: train(small_config(tiny_cache, tmp_path / choice,
                                          student=str(tiny_student_dir), precision=choice,
                                          max_steps=4, snapshots=False, eval_fraction=0.2))
               for choice in ("fp32", "bf16-mixed", "bf16-master")}
    reference = results.pop("fp32")
    for result in results.values():
        for key in ("train_loss", "eval_loss"):
            assert result[key] != reference[key]  # computed in bfloat16 ...
            assert result[key] == pytest.approx(reference[key], rel=1e-3)  # ... and close


# --- the body: checkpointing, compile, attention -----------------------------------------

@pytest.fixture()
def index(tiny_cache: Path) -> CacheIndex:
    return build_index(open_cache(tiny_cache))


def _parts(student_dir: Path) -> ModelParts:
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    model.train()
    return split_student(model, "student")


def _batch(index: CacheIndex) -> GlobalBatch:
    columns = columns_for(index.cache, teacher=True, temperature=1.0)
    with BatchLoader(index, index.sample_ids[:4], columns, 4, 1, 1) as loader:
        (batch,) = list(loader)
    return batch


def _step(parts: ModelParts, batch: GlobalBatch) -> tuple[float, list[torch.Tensor]]:
    """The loss of one step and its gradients (saved-for-backward bytes in `SAVED`)."""
    parts.model.zero_grad(set_to_none=True)
    result = accumulate_gradients(StudentObjective(parts, VOCAB), batch,
                                  StepLambdas(np.full(4, 0.5, dtype=np.float32)),
                                  LossConfig(chunk_size=64), CPU, None)
    return result["loss"], [p.grad.clone() for p in parts.model.parameters()]


def _saved_activation_bytes(parts: ModelParts, batch: GlobalBatch) -> int:
    """Bytes autograd keeps for backward over one step, parameters left out: each storage
    once (views of one tensor share it)."""
    params = {p.untyped_storage().data_ptr() for p in parts.model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _step(parts, batch)
    return sum(storages.values())


def test_gradient_checkpointing_keeps_loss_and_gradients_and_cuts_activations(
        tiny_student_dir: Path, index: CacheIndex) -> None:
    batch = _batch(index)
    plain = _parts(tiny_student_dir)
    checkpointed = _parts(tiny_student_dir)
    enable_gradient_checkpointing(checkpointed.model, "student")
    loss, grads = _step(plain, batch)
    loss_ckpt, grads_ckpt = _step(checkpointed, batch)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    kept, kept_ckpt = (_saved_activation_bytes(p, batch) for p in (plain, checkpointed))
    # Two blocks keep their input only, not attention and MLP intermediates: measured ~7x.
    assert kept_ckpt < kept / 2, (kept, kept_ckpt)


def test_a_model_without_gradient_checkpointing_is_refused() -> None:
    with pytest.raises(ConfigError, match="--gradient-checkpointing: tiny .*does not support"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "tiny")


def test_compiled_body_gives_the_eager_loss(tiny_student_dir: Path, index: CacheIndex,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """torch.compile's graph capture with its `eager` backend: inductor's C++ build takes
    minutes on a small CPU, the capture (what fails for an unsupported model) seconds."""
    batch = _batch(index)
    loss, grads = _step(_parts(tiny_student_dir), batch)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = _parts(tiny_student_dir)
    compile_body(compiled)
    with caplog.at_level(logging.WARNING, logger="kdpipe.trainer.execution"):
        loss_compiled, grads_compiled = _step(compiled, batch)
    assert not caplog.records
    assert compiled.body.compiled is not None  # type: ignore[union-attr]
    assert loss_compiled == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, grads_compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("InductorError: no working C++ compiler found\nmore details")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    eager = train(small_config(tiny_cache, tmp_path / "eager", student=str(tiny_student_dir),
                               max_steps=2, snapshots=False))
    with caplog.at_level(logging.WARNING, logger="kdpipe.trainer.execution"):
        compiled = train(small_config(tiny_cache, tmp_path / "compiled",
                                      student=str(tiny_student_dir), max_steps=2,
                                      snapshots=False, compile=True))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no working C++ compiler found" in warnings[0]
    assert "running it without compiling" in warnings[0]
    assert compiled["train_loss"] == eager["train_loss"]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_attention_implementation_reaches_the_config_packing_reads(
        tiny_cache: Path, tiny_student_dir: Path, student_config_file: Path,
        implementation: str) -> None:
    cache = open_cache(tiny_cache)
    pretrained = open_student(cache, CPU, student=str(tiny_student_dir),
                              attn_implementation=implementation)
    scratch = open_student(cache, CPU, student=None, student_config=str(student_config_file),
                           attn_implementation=implementation)
    for student in (pretrained, scratch):
        assert student.model.config._attn_implementation == implementation


def test_evaluate_takes_the_attention_implementation(tiny_cache: Path, tiny_student_dir: Path
                                                     ) -> None:
    options = dict(cache=str(tiny_cache), student=str(tiny_student_dir), device="cpu",
                   max_samples=8, chunk_size=64)
    eager = evaluate(EvalConfig.from_options(attn_implementation="eager", **options))
    sdpa = evaluate(EvalConfig.from_options(attn_implementation="sdpa", **options))
    for key in ("ce", "kd", "loss"):  # the same attention, by two kernels
        assert eager[key] == pytest.approx(sdpa[key], rel=1e-4), key


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed")
def test_flash_attention_without_its_package_is_one_line(tmp_path: Path, tiny_cache: Path
                                                         ) -> None:
    cfg = TrainConfig.from_options(cache=str(tiny_cache), out=str(tmp_path / "run"),
                                   student="s", attn_implementation="flash_attention_2")
    assert execution.attention_problems(cfg.attn_implementation) == [
        "--attn-implementation flash_attention_2 needs the flash-attn package (pip install "
        "flash-attn, on a CUDA machine); use sdpa"]
    with pytest.raises(ConfigError, match="flash-attn package"):
        cfg.validate()
    with pytest.raises(ConfigError, match="flash-attn package"):
        EvalConfig.from_options(cache=str(tiny_cache), student="s",
                                attn_implementation="flash_attention_2").validate()
