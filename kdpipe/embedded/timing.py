"""Wall and CPU time per stage, kept in OUT/timings.json across re-runs.

A stage that finds its work already done (every kdpipe stage is idempotent) keeps the time it
took when it actually ran, so the table of a resumed demo or experiment still says what each
stage costs. CPU time is this process's user + system time: on an otherwise idle machine a
single-threaded stage's wall time is close to it, on a busy one wall time is larger.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdpipe.schemas.io import atomic_write_json

log = logging.getLogger(__name__)

TIMINGS_NAME = "timings.json"


class StageClock:
    """Records {stage: {"wall_s", "cpu_s"}} in ROOT/timings.json as stages finish."""

    def __init__(self, root: Path) -> None:
        self.path = root / TIMINGS_NAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.records = json.loads(self.path.read_text(encoding="utf-8"))
        self.fresh: set[str] = set()  # stages that ran in this process

    @contextmanager
    def stage(self, name: str, done: bool = False) -> Iterator[None]:
        """Time the block; when `done` (its output already exists) keep the earlier record."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        if done and name in self.records:
            log.info("%s: already done (took %.0f s when it ran)", name,
                     self.records[name]["wall_s"])
            return
        self.record(name, time.perf_counter() - wall, time.process_time() - cpu)

    def record(self, name: str, wall_s: float, cpu_s: float | None) -> None:
        self.records[name] = {"wall_s": round(wall_s, 3),
                              "cpu_s": None if cpu_s is None else round(cpu_s, 3)}
        self.fresh.add(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.records)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.records.get(name)
