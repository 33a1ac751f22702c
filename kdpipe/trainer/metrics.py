"""What a run records: metrics and sample order as JSON lines, per-sample statistics.

`RUN/metrics.jsonl` has one record per logged train step (`"split": "train"`) and per eval
(`"split": "eval"`); `RUN/order.jsonl` has, for every optimizer step, the sample ids it used
(and their λ when they vary), so a run can prove the order it followed. TensorBoard gets the
same scalars when `torch.utils.tensorboard` is importable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.io import atomic_write_text
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.write_errors import writing

log = logging.getLogger(__name__)



class JsonLines:
    """Append-only JSON lines, written through per record (a crashed run keeps what it logged).

    Unbuffered, so a write that fails (a full disk) leaves nothing to flush at close; the part
    of the record that did get written is cut off again, so no torn line stays.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("ab", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        line = memoryview((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"))
        end = self.file.seek(0, os.SEEK_END)
        try:
            with writing(self.path):
                while line:  # a raw write may take part of it
                    line = line[self.file.write(line):]
        except BaseException:
            os.ftruncate(self.file.fileno(), end)
            raise

    def close(self) -> None:
        self.file.close()


def truncate_after_step(path: Path, step: int) -> None:
    """Drop records of steps after `step`: on resume, those came from the interrupted run."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        json.loads(lines[-1] if lines else "{}")
    except json.JSONDecodeError:  # the last record was cut short by a crash
        lines.pop()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def record_at(path: Path, split: str, step: int) -> dict[str, Any] | None:
    """The last `split` record ("train", "eval") of `step` in a metrics log, or None (no
    such record, or no log). A line cut short by a crash is skipped."""
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("split") == split \
                and record.get("step") == step:
            found = record
    return found


class RunLogger:
    """metrics.jsonl + order.jsonl (+ TensorBoard) of one run folder."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        layout = RunLayout(run_dir)
        self.metrics = JsonLines(layout.metrics)
        self.order = JsonLines(layout.order)
        self.tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.debug("tensorboard not installed; metrics go to %s only", layout.metrics)
            else:
                self.tb = SummaryWriter(str(layout.tensorboard))

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.tb is not None:
            split, step = record.get("split", "train"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def log_order(self, step: int, epoch: int, sample_ids: np.ndarray,
                  lam_per_sample: np.ndarray | None) -> None:
        """The step's (S,) sample ids and, when λ varies, their (S,) λ (key `kd_weight`)."""
        record: dict[str, Any] = {"step": step, "epoch": epoch,
                                  "sample_ids": [int(s) for s in sample_ids]}
        if lam_per_sample is not None:
            record["kd_weight"] = [round(float(w), 6) for w in lam_per_sample]
        self.order.write(record)

    def close(self) -> None:
        self.metrics.close()
        self.order.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Throughput:
    """Tokens per second over a window of steps, not counting paused time (evaluation,
    snapshots, checkpoints), so the logged rate is the training rate."""

    def __init__(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        """The window's tokens per second; starts the next window."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began


class SampleStats:
    """Per-sample sums of CE and confidence over one epoch, for snapshots."""

    def __init__(self) -> None:
        # sample_id -> [Σ mean CE, Σ mean confidence, tokens, occurrences, last step]
        self.rows: dict[int, list[float]] = {}

    def add(self, sample_ids: torch.Tensor, target_row: torch.Tensor, ce: torch.Tensor,
            step: int) -> None:
        """Fold one micro-batch in: (B,) ids, (N,) row of each target, (N,) per-token CE."""
        b = sample_ids.shape[0]
        row = target_row.to(ce.device)
        ce_sum = torch.zeros(b, dtype=torch.float64, device=ce.device).index_add_(
            0, row, ce.double())
        conf_sum = torch.zeros(b, dtype=torch.float64, device=ce.device).index_add_(
            0, row, torch.exp(-ce.double()))
        tokens = torch.bincount(row, minlength=b)
        for sid, c, p, n in zip(sample_ids.tolist(), ce_sum.tolist(), conf_sum.tolist(),
                                tokens.tolist(), strict=True):
            entry = self.rows.setdefault(int(sid), [0.0, 0.0, 0.0, 0.0, 0.0])
            if entry[3] == 0:
                entry[2] = n
            entry[0] += c / max(n, 1)
            entry[1] += p / max(n, 1)
            entry[3] += 1
            entry[4] = step

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def merged(cls, parts: list[dict[int, list[float]]]) -> SampleStats:
        """One SampleStats from several ranks' `rows` (a sample seen on two ranks counts twice,
        as it would have on one process)."""
        out = cls()
        for rows in parts:
            for sid, (ce, conf, tokens, seen, step) in rows.items():
                entry = out.rows.setdefault(int(sid), [0.0, 0.0, tokens, 0.0, 0.0])
                entry[0] += ce
                entry[1] += conf
                entry[3] += seen
                entry[4] = max(entry[4], step)
        return out

    def table(self, epoch: int) -> pa.Table:
        """The snapshot rows (sorted by sample id) in the schemas.snapshot layout."""
        ids = sorted(self.rows)
        data = np.array([self.rows[i] for i in ids], dtype=np.float64).reshape(-1, 5)
        seen = np.maximum(data[:, 3], 1)
        return pa.Table.from_arrays([
            pa.array(np.asarray(ids, dtype=np.int64), pa.int64()),
            pa.array(np.full(len(ids), epoch, dtype=np.int32), pa.int32()),
            pa.array(data[:, 4].astype(np.int64), pa.int64()),
            pa.array((data[:, 0] / seen).astype(np.float32), pa.float32()),
            pa.array((data[:, 1] / seen).astype(np.float32), pa.float32()),
            pa.array(data[:, 2].astype(np.int32), pa.int32()),
            pa.array(data[:, 3].astype(np.int32), pa.int32()),
        ], schema=snap.SNAPSHOT_SCHEMA)

    def state_dict(self) -> dict[str, torch.Tensor]:
        ids = sorted(self.rows)
        values = torch.tensor([self.rows[i] for i in ids], dtype=torch.float64).reshape(-1, 5)
        return {"sample_ids": torch.tensor(ids, dtype=torch.int64), "values": values}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rows = {int(i): [float(v) for v in row] for i, row in
                     zip(state["sample_ids"].tolist(), state["values"].tolist(), strict=True)}


def summarise(sums: dict[str, float], tokens: int) -> dict[str, float]:
    """Per-token means from summed losses; ppl from the mean CE."""
    n = max(tokens, 1)
    ce = sums["ce"] / n
    return {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "kd": sums["kd"] / n,
            "top1_agreement": sums["correct_top1"] / n, "tokens": tokens}


def teacher_metrics(per_teacher: Sequence[float]) -> dict[str, float]:
    """{"kd_teacher_1": mean KD against teacher 1, ...} from per-token means, teachers in
    --cache order ({} for one teacher, whose KD is `kd`)."""
    return {f"kd_teacher_{j}": value for j, value in enumerate(per_teacher, start=1)}
