"""`train-student --resume` with another `--threads`: threads never make a different run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kdpipe.experiments.plan import run_state
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.config import read_config

from ..conftest import run_cli


def test_resume_with_other_threads(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["train-student", "--cache", str(tiny_cache), "--student", str(tiny_student_dir),
            "--out", str(run), "--device", "cpu", "--batch-size", "4", "--chunk-size", "64",
            "--save-every", "1", "--no-progress", "--no-snapshots"]
    code, _, err = run_cli([*args, "--max-steps", "2", "--threads", "1"], capsys)
    assert code == 0, err
    RunLayout(run).final_metrics.unlink()  # as if stopped after step 2 of 3
    code, out, err = run_cli([*args, "--max-steps", "3", "--threads", "2", "--resume"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 3
    # The experiment runner recognises the finished run whatever its threads.
    cfg = read_config(run)
    assert cfg.threads == 2
    assert run_state(replace(cfg, threads=7)) == ("finished", [])
