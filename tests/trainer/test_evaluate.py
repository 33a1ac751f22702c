"""Evaluation reports the objective of the run's mode: the λ-mix for kd, plain CE for ce."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.shard_reader import build_index
from kdpipe.trainer.evaluate import run_evaluation
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.model import split_student


@pytest.mark.parametrize("mode", ["ce", "kd"])
def test_eval_loss_is_the_mode_objective(tiny_cache: Path, tiny_student_dir: Path,
                                         mode: str) -> None:
    parts = split_student(AutoModelForCausalLM.from_pretrained(tiny_student_dir), "student")
    index = build_index(open_cache(tiny_cache))
    result = run_evaluation(parts, index, index.sample_ids[:20],
                            LossConfig(mode=mode, kd_weight=0.25), parts.model.device, None,
                            batch_size=4, pad_id=1)
    expected = result["ce"] if mode == "ce" else 0.75 * result["ce"] + 0.25 * result["kd"]
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["kd"] > 0 and 0 <= result["top1_agreement"] <= 1
