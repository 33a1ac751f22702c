"""A preempted job keeps its work: SIGINT/SIGTERM end a run with a checkpoint, and a clock
saves one every few minutes.

Slurm preemption, spot instances and Ctrl-C all end a job with a signal. On the first SIGINT
or SIGTERM the loop finishes the step it is in, writes a resumable checkpoint and exits with
128 + the signal's number (`Interrupted`); a second one acts at once. Time-based checkpoints
(`--save-every-minutes`) bound what a kill without warning (SIGKILL, a node lost) can cost.
Under torchrun every rank gets the signal, and the ranks agree on when to stop and save by
summing their flags (`Distributed.sum`), so they save the same step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from kdpipe.schemas.errors import KdpipeError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KdpipeError):
    """The run stopped on a signal after saving a checkpoint; exits 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Records the first SIGINT/SIGTERM; the loop reads `signum` after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))  # a second acts at once
        log.warning("%s: finishing the current step, then saving a checkpoint (send it again to "
                    "stop at once)", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM for the duration of a run (the handlers are restored after).

    Only the main thread can install handlers; a run started from another thread (several
    students in one process) keeps the process's own handling of signals.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    request.previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, request)
    try:
        yield request
    finally:
        for signum, handler in request.previous.items():
            signal.signal(signum, handler)


class CheckpointClock:
    """Whether `minutes` have passed since the last checkpoint (0: never)."""

    def __init__(self, minutes: float) -> None:
        self.seconds, self.last = minutes * 60.0, time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()
