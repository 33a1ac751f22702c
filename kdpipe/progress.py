"""Progress of a long stage: a bar on a terminal, a periodic one-line log status elsewhere.

A tqdm bar redrawn ten times a second suits a person watching a terminal and nothing else:
captured in a file or a CI log its redraws are most of the output, and `--no-progress` used to
leave a long stage silent between its first and last line. So `Progress` draws a bar only when
one is asked for (`--progress`, the default) and stderr is a terminal; otherwise it logs a
status line at most every `LOG_EVERY_S` seconds:

    train-student: step 120/1000 (12%), 2.10 step/s, loss 2.31, ETA 6m59s

`library_bars` does the same for the bars transformers and huggingface_hub draw themselves
("Loading weights", "Writing model shards"): off for a block unless kdpipe's own bars are on.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # at most one status line per stage this often when no bar is drawn


def bars_shown(progress: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw bars: asked for (`progress`) and `stream` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return progress and callable(isatty) and bool(isatty())


@contextmanager
def library_bars(shown: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off for the block unless `shown`;
    the previous setting of each is restored after it."""
    if shown:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    transformers_on = hf_logging.is_progress_bar_enabled()
    hub_off = hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # both libraries': transformers forwards it to the hub
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_off:
            hub.disable_progress_bars()


def format_duration(seconds: float) -> str:
    """`45s`, `3m10s`, `2h05m` (rounded down to the unit shown last)."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


class Progress:
    """A stage's progress: a tqdm bar when `bars_shown(progress)`, else a status line logged at
    most every `every_s` seconds of `clock` (default `LOG_EVERY_S`; also under
    `progress=False`).

    The interface is tqdm's (`update`, `set_postfix`, `close`, a context manager), so a stage
    swaps its `tqdm(...)` for `Progress(...)`. `report=False` makes it silent altogether (a
    non-main rank under torchrun); `leave=False` clears the bar when done (a bar under
    another). `total` may be unknown (None) and set later.
    """

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "it",
                 initial: int = 0, progress: bool = True, report: bool = True,
                 leave: bool = True, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n: float = initial
        self._report = report
        self._every = LOG_EVERY_S if every_s is None else every_s
        self._clock = clock
        self._postfix: dict[str, str] = {}
        self._mark = (clock(), float(initial))  # (time, count) of the last status line
        shown = report and bars_shown(progress)
        self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                          dynamic_ncols=True) if shown else None)

    def update(self, n: float = 1) -> None:
        """`n` more units done; a status line when `every_s` passed since the last one."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if self._report and now - self._mark[0] >= self._every:
            log.info("%s", self.status(now))
            self._mark = (now, self.n)

    def set_postfix(self, **values: object) -> None:
        """Figures shown after the count (`loss=2.31`), as tqdm's `set_postfix`."""
        self._postfix = {key: str(value) for key, value in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def status(self, now: float | None = None) -> str:
        """The one-line status: count, share of the total, rate since the last line, ETA."""
        now = self._clock() if now is None else now
        since, done = self._mark
        rate = (self.n - done) / max(now - since, 1e-9)
        count = f"{self.unit} {self.n:,.0f}"
        parts = [count if not self.total else
                 f"{count}/{self.total:,} ({100 * self.n / self.total:.0f}%)",
                 f"{_number(rate)} {self.unit}/s"]
        parts += [f"{key} {value}" for key, value in self._postfix.items()]
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration(max(self.total - self.n, 0) / rate)}")
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
