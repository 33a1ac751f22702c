"""A preempted job keeps its work: a signal ends a run with a checkpoint it resumes from
exactly, a clock checkpoints, and old checkpoints and snapshots are pruned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer import checkpoint as ckpt
from kdpipe.trainer.config import read_config, write_config
from kdpipe.trainer.preemption import Interrupted
from kdpipe.trainer.train import train

from .conftest import small_config


class SignalAtStep:
    """λ = 0.5, and a signal to this process when step `at` starts (as a scheduler would)."""

    def __init__(self, at: int, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.at, self.signum, self.times = at, signum, times

    def __call__(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        if step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return np.full(len(sample_ids), 0.5, dtype=np.float32)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path, tiny_cache: Path,
                                                         tiny_student_dir: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "full", student=str(tiny_student_dir),
                       max_steps=8, eval_fraction=0.25)
    uninterrupted = train(cfg, lambda_fn=SignalAtStep(at=-1))

    stopped = replace(cfg, out=str(tmp_path / "stopped"))
    with pytest.raises(Interrupted, match=r"SIGTERM after step 3 of 8: checkpoint .*step-000003 "
                                          r"saved; continue with the same command and --resume"
                       ) as info:
        train(stopped, lambda_fn=SignalAtStep(at=3))
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in ckpt.list_checkpoints(Path(stopped.out))] == ["step-000003"]
    assert not RunLayout(Path(stopped.out)).final.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = train(replace(stopped, resume=True), lambda_fn=SignalAtStep(at=-1))
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert resumed["eval_kd"] == uninterrupted["eval_kd"]


def test_a_second_signal_acts_at_once(tmp_path: Path, tiny_cache: Path,
                                      tiny_student_dir: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir),
                       max_steps=8, save_every=2)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, lambda_fn=SignalAtStep(at=3, signum=signal.SIGINT, times=2))
    finally:
        signal.signal(signal.SIGINT, previous)
    # The step in progress never finished: the last good checkpoint is the one of step 2.
    assert [p.name for p in ckpt.list_checkpoints(Path(cfg.out))] == ["step-000002"]


def test_the_clock_checkpoints_and_keep_last_prunes(tmp_path: Path, tiny_cache: Path,
                                                    tiny_student_dir: Path) -> None:
    # A clock of ~0 minutes is due after every step.
    cfg = small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir),
                       max_steps=6, save_every_minutes=1e-9, keep_last=2)
    train(cfg)
    assert [p.name for p in ckpt.list_checkpoints(Path(cfg.out))] == ["step-000005",
                                                                       "step-000006"]
    off = replace(cfg, out=str(tmp_path / "off"), save_every_minutes=0.0, keep_last=0)
    train(off)
    assert [p.name for p in ckpt.list_checkpoints(Path(off.out))] == ["step-000006"]


def test_snapshots_of_old_epochs_are_pruned(tmp_path: Path, tiny_cache: Path,
                                            tiny_student_dir: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir),
                       max_steps=None, epochs=4, batch_size=32, keep_snapshots=2,
                       snapshot_every=1)
    train(cfg)
    assert {epoch for epoch, _, _ in snap.list_snapshots(cfg.out)} == {2, 3}
    # A snapshot curriculum reads every finished epoch's snapshot when it resumes.
    curriculum = replace(cfg, out=str(tmp_path / "cl"), curriculum=replace(
        cfg.curriculum, source="snapshot", pacing="none"))
    train(curriculum)
    found = snap.list_snapshots(curriculum.out)
    assert [epoch for epoch, step, _ in found if step is None] == [0, 1, 2, 3]
    assert {epoch for epoch, step, _ in found if step is not None} == {2, 3}


def test_old_run_folders_with_keep_checkpoints_still_read(tmp_path: Path, tiny_cache: Path
                                                          ) -> None:
    cfg = small_config(tiny_cache, tmp_path, student="s", keep_last=4)
    write_config(tmp_path, cfg)
    path = RunLayout(tmp_path).config
    data = json.loads(path.read_text())
    data["keep_checkpoints"] = data.pop("keep_last")
    path.write_text(json.dumps(data))
    assert read_config(tmp_path) == cfg


def test_ctrl_c_on_the_command_line_exits_130_with_one_line(tmp_path: Path, tiny_cache: Path,
                                                            tiny_student_dir: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, "-m", "kdpipe", "train-student", "--cache", str(tiny_cache),
            "--student", str(tiny_student_dir), "--out", str(run), "--device", "cpu",
            "--max-steps", "100000", "--batch-size", "2", "--no-progress", "--log-every", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            RunLayout(run).order.is_file() and RunLayout(run).order.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdpipe: error: SIGINT after step ") and "--resume" in last
    assert len(ckpt.list_checkpoints(run)) == 1
