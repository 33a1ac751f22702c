"""`--threads` on every stage: it reaches torch, bad values get one line and write nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from .conftest import run_cli


def stage_args(command: str, tmp_path: Path) -> list[str]:
    """A command line that fails only after the stage starts (its input does not exist)."""
    missing = str(tmp_path / "missing")
    return {
        "cache-teacher": ["cache-teacher", "--teacher", "t", "--data", missing + ".jsonl",
                          "--out", str(tmp_path / "out")],
        "build-curriculum": ["build-curriculum", "--cache", missing, "--out",
                             str(tmp_path / "out" / "c.parquet")],
        "train-student": ["train-student", "--cache", missing, "--student", "s", "--out",
                          str(tmp_path / "out")],
        "evaluate": ["evaluate", "--student", "s", "--cache", missing],
    }[command]


STAGES = ("cache-teacher", "build-curriculum", "train-student", "evaluate")


@pytest.mark.parametrize("command", STAGES)
def test_threads_reach_torch(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kdpipe")
    assert torch.get_num_threads() != 3
    code, _, err = run_cli([*stage_args(command, tmp_path), "--threads", "3"], capsys)
    assert code == 2, err  # the missing input, after the threads were set
    assert torch.get_num_threads() == 3
    assert "torch uses 3 CPU thread(s) (--threads 3)" in caplog.text


@pytest.mark.parametrize("command", STAGES)
def test_negative_threads_are_refused_in_one_line(command: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([*stage_args(command, tmp_path), "--threads", "-1"], capsys)
    assert code == 2
    assert err.strip() == "kdpipe: error: --threads -1 must be >= 0 (0: auto)"
    assert not (tmp_path / "out").exists()


def test_threads_from_a_config_file_are_checked(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("threads: 1.5\n")
    code, _, err = run_cli([*stage_args("evaluate", tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "threads: expected an integer, found 1.5" in err


def test_demo_and_experiment_refuse_negative_threads(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    code, _, err = run_cli(["demo", "--threads", "-2", "--out", str(tmp_path / "demo")], capsys)
    assert code == 2 and err.strip() == "kdpipe: error: --threads -2 must be >= 0 (0: auto)"
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"setup: {{cache: {tmp_path / 'cache'}}}\narms: {{kd: {{}}}}\n")
    code, _, err = run_cli(["experiment", str(exp), "--threads", "-2", "--out",
                            str(tmp_path / "runs")], capsys)
    assert code == 2 and err.strip() == "kdpipe: error: --threads -2 must be >= 0 (0: auto)"
    assert not (tmp_path / "demo").exists() and not (tmp_path / "runs").exists()
