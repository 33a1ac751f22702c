"""The gradient of one step: independent of padding, masked tokens and accumulation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.model_parts import ModelParts
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.shard_reader import CacheIndex, build_index, columns_for
from kdpipe.trainer.data import BatchLoader, GlobalBatch
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.model import split_student
from kdpipe.trainer.objective import StudentObjective
from kdpipe.trainer.reliance import StepLambdas
from kdpipe.trainer.train import accumulate_gradients

CPU = torch.device("cpu")


@pytest.fixture()
def setup(tiny_cache: Path, tiny_student_dir: Path) -> tuple[ModelParts, CacheIndex]:
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    return split_student(model, "student"), build_index(open_cache(tiny_cache))


def _batches(index: CacheIndex, ids: np.ndarray, batch_size: int, grad_accum: int,
             teacher: bool = True, pad_id: int = 1) -> GlobalBatch:
    columns = columns_for(index.cache, teacher=teacher, temperature=2.0)
    with BatchLoader(index, ids, columns, batch_size, grad_accum, pad_id) as loader:
        (global_batch,) = list(loader)
    return global_batch


def _grads(parts: ModelParts, batch: GlobalBatch, lam: np.ndarray, cfg: LossConfig
           ) -> tuple[dict[str, float], list[torch.Tensor]]:
    parts.model.zero_grad(set_to_none=True)
    result = accumulate_gradients(StudentObjective(parts, 320), batch, StepLambdas(lam), cfg,
                                  CPU, None)
    return result, [p.grad.clone() for p in parts.model.parameters() if p.grad is not None]


def _assert_same(a: tuple[dict[str, float], list[torch.Tensor]],
                 b: tuple[dict[str, float], list[torch.Tensor]]) -> None:
    for key in ("loss", "ce", "kd", "top1_agreement", "tokens"):
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-7), key
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_accumulation_split_does_not_change_the_gradient(setup: tuple[ModelParts, CacheIndex],
                                                         kind: str) -> None:
    parts, index = setup
    ids = index.sample_ids[:6]
    lam = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2], dtype=np.float32)  # per-sample λ
    cfg = LossConfig(kind=kind, temperature=2.0, chunk_size=16)
    one = _grads(parts, _batches(index, ids, 6, 1), lam, cfg)
    _assert_same(one, _grads(parts, _batches(index, ids, 1, 6), lam, cfg))
    _assert_same(one, _grads(parts, _batches(index, ids, 2, 3), lam, cfg))
    _assert_same(one, _grads(parts, _batches(index, ids, 4, 2), lam, cfg))  # uneven: 4 + 2


def test_padding_and_masked_positions_change_nothing(setup: tuple[ModelParts, CacheIndex]
                                                     ) -> None:
    parts, index = setup
    lengths = index.num_targets
    short = index.sample_ids[lengths.argmin()]
    long = index.sample_ids[lengths.argmax()]
    assert lengths.min() < lengths.max()
    cfg = LossConfig(chunk_size=8)
    lam = np.array([0.5, 0.5], dtype=np.float32)
    padded = _batches(index, np.array([short, long]), 2, 1)  # short is right-padded
    alone = _batches(index, np.array([short, long]), 1, 2)  # no padding at all
    reference = _grads(parts, alone, lam, cfg)
    _assert_same(reference, _grads(parts, padded, lam, cfg))
    # Whatever sits in the padded positions (pad id, garbage ids) is never seen.
    garbage = _batches(index, np.array([short, long]), 2, 1, pad_id=7)
    micro = garbage.micro[0]
    micro.input_ids[~micro.attention_mask.bool()] = torch.randint_like(
        micro.input_ids[~micro.attention_mask.bool()], 0, 300)
    _assert_same(reference, _grads(parts, garbage, lam, cfg))


def test_ce_mode_equals_the_model_own_cross_entropy(setup: tuple[ModelParts, CacheIndex]
                                                    ) -> None:
    parts, index = setup
    batch = _batches(index, index.sample_ids[:5], 5, 1, teacher=False)
    micro = batch.micro[0]
    result, _ = _grads(parts, batch, np.zeros(5, np.float32), LossConfig(mode="ce",
                                                                         chunk_size=16))
    labels = micro.input_ids.clone()
    labels[micro.attention_mask == 0] = -100  # HF shifts labels inside the model
    with torch.no_grad():
        expected = parts.model(input_ids=micro.input_ids, attention_mask=micro.attention_mask,
                               labels=labels).loss
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["ce"] == pytest.approx(float(expected), rel=1e-5)
    assert result["kd"] == 0.0
