"""A refused train-student writes nothing; --resume says when there is nothing to resume."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.run_dir import claim_run_dir, plan_run_dir
from kdpipe.trainer.train import train

from ..families import permuted_tokenizer
from .conftest import small_config


@pytest.mark.parametrize("case", ["tokenizer", "not-a-cache", "eval-fraction", "narrow-head"])
def test_a_refused_run_writes_nothing(case: str, tmp_path: Path, tiny_cache: Path,
                                      tiny_student_dir: Path, tiny_tokenizer_dir: Path,
                                      student_config_file: Path) -> None:
    run = tmp_path / "runs" / "s1"
    options: dict[str, object] = {"student": str(tiny_student_dir)}
    cache = tiny_cache
    if case == "tokenizer":
        options["tokenizer"] = str(permuted_tokenizer(tiny_tokenizer_dir, tmp_path / "tok", 5, 6))
    elif case == "not-a-cache":
        cache = tmp_path / "not-a-cache"
        cache.mkdir()
    elif case == "eval-fraction":
        options["eval_fraction"] = 1.5
    else:
        spec = json.loads(student_config_file.read_text())
        narrow = tmp_path / "narrow.json"
        narrow.write_text(json.dumps({**spec, "vocab_size": 100}))
        options = {"student_config": str(narrow)}
    with pytest.raises((ConfigError, FileNotFoundError)):
        train(small_config(cache, run, **options))
    assert not run.exists() and not run.parent.exists()
    # The corrected command is not refused for a run that never trained.
    result = train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=2))
    assert result["step"] == 2


def test_resume_needs_something_to_resume(tmp_path: Path, tiny_cache: Path,
                                          tiny_student_dir: Path) -> None:
    run = tmp_path / "run"
    cfg = small_config(tiny_cache, run, student=str(tiny_student_dir), resume=True)
    with pytest.raises(ConfigError, match="no run to resume"):
        plan_run_dir(cfg)
    fresh = small_config(tiny_cache, run, student=str(tiny_student_dir)).with_cache_defaults()
    claim_run_dir(fresh, plan_run_dir(fresh))
    assert RunLayout(run).config.is_file()  # a run that stopped before its first checkpoint
    with pytest.raises(ConfigError, match="wrote no checkpoint to resume from.*--overwrite"):
        train(cfg)


def test_resuming_a_finished_run_to_change_reporting_keeps_its_results(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=2)
    first = train(cfg)
    assert "train_loss" in first
    with caplog.at_level(logging.WARNING, logger="kdpipe.trainer.run_dir"):
        again = train(replace(cfg, log_every=7, resume=True))  # no step left to run
    assert again["step"] == 2
    saved = json.loads(RunLayout(run).final_metrics.read_text())
    for key, value in first.items():
        if key.startswith("train_"):
            assert saved[key] == again[key] == value, key
    warning = next(r.getMessage() for r in caplog.records if "resuming" in r.getMessage())
    assert "changed log_every" in warning and "LR schedule" not in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdpipe.trainer.run_dir"):
        train(replace(cfg, max_steps=3, resume=True))
    assert any("the LR schedule follows the new length" in r.getMessage()
               for r in caplog.records)
