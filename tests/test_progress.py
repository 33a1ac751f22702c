"""`kdpipe.progress`: a bar only on a terminal, status lines otherwise, libraries' bars off.

The CLI tests run stages in a subprocess whose stderr is a pseudo-terminal, so the bars that
`--no-progress` must silence would really be drawn without it (the first test checks that).
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from kdpipe.progress import Progress, bars_shown, format_duration, library_bars
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
BAR_MARKS = ("Loading weights", "Writing model shards", "it/s]", "█", "\r")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_status_lines_come_at_most_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    bar = Progress("train-student", 1000, unit="step", progress=False, every_s=30,
                   clock=clock)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        for _ in range(120):
            clock.now += 0.25
            bar.update(1)
            bar.set_postfix(loss="2.31")
    lines = [r.getMessage() for r in caplog.records]
    # 120 steps in 30 s: one line, at the step that reached 30 s; rate over those 30 s.
    assert lines == ["train-student: step 120/1,000 (12%), 4.00 step/s, loss 2.31, ETA 3m40s"]


def test_status_without_total_has_no_eta_and_report_false_is_silent(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    counting = Progress("cache-teacher", unit="doc", progress=False, every_s=10, clock=clock)
    silent = Progress("eval", 5, unit="batch", progress=False, report=False, every_s=10,
                      clock=clock)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"):
        clock.now = 20.0
        counting.update(50)
        silent.update(5)
    assert [r.getMessage() for r in caplog.records] == ["cache-teacher: doc 50, 2.50 doc/s"]
    counting.set_total(200)
    assert counting.status(40.0) == "cache-teacher: doc 50/200 (25%), 0.00 doc/s"


def test_bar_only_when_asked_and_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert bars_shown(True, Terminal()) and not bars_shown(False, Terminal())
    assert not bars_shown(True, io.StringIO()) and not bars_shown(True, object())  # type: ignore[arg-type]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"), \
            Progress("eval", 3, unit="batch", every_s=0) as bar:
        bar.update(3)
    drawn = terminal.getvalue()
    assert "eval: 100%" in drawn and caplog.records == []
    with caplog.at_level(logging.INFO, logger="kdpipe.progress"), \
            Progress("eval", 3, unit="batch", progress=False, every_s=0) as bar:
        bar.update(3)
    assert terminal.getvalue() == drawn
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["eval: batch 3/3 (100%)"]


def test_library_bars_are_off_inside_and_restored_after() -> None:
    assert hf_logging.is_progress_bar_enabled()
    with library_bars(True):
        assert hf_logging.is_progress_bar_enabled()
    with library_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # switched off by the user: stays off
    try:
        with library_bars(False):
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 45.9, 190, 3600 * 2 + 300)] == \
        ["0s", "45s", "3m10s", "2h05m"]


def run_on_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """`python -m kdpipe ARGS` with stderr on a pseudo-terminal; (exit code, stderr)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, cols
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "kdpipe", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks: list[bytes] = []

    def drain() -> None:  # a full terminal buffer would block the child
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    code = process.wait(timeout=300)
    reader.join(timeout=30)
    os.close(main)
    return code, b"".join(chunks).decode("utf-8", "replace")


def bar_marks(stderr: str) -> list[str]:
    """What only a progress bar writes (a terminal shows each newline as \\r\\n)."""
    return [mark for mark in BAR_MARKS if mark in stderr.replace("\r\n", "\n")]


@pytest.mark.slow
def test_no_progress_silences_every_bar_of_a_stage(
        tiny_teacher_dir: Path, tiny_gpt2_dir: Path, jsonl_corpus: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    common = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(jsonl_corpus),
              "--top-k", "8", "--max-length", "48", "--device", "cpu"]
    code, shown = run_on_terminal(common + ["--out", "shown"], tmp_path)
    assert code == 0, shown
    assert "Loading weights" in shown and "cache-teacher:" in shown  # bars on a terminal
    code, quiet = run_on_terminal(common + ["--out", "quiet", "--no-progress"], tmp_path)
    assert code == 0 and bar_marks(quiet) == [], quiet

    code, quiet = run_on_terminal(
        ["train-student", "--cache", "quiet", "--student", str(tiny_gpt2_dir), "--out", "run",
         "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress"], tmp_path)
    assert code == 0, quiet
    assert "Loading weights" not in quiet and "Writing model shards" not in quiet, quiet

    capfd.readouterr()
    evaluate(EvalConfig.from_options(student=str(tmp_path / "run" / "final"),
                                     cache=str(tmp_path / "quiet"), device="cpu",
                                     progress=False))
    assert bar_marks(capfd.readouterr().err) == []
