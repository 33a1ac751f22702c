"""The run folder of `kdpipe train-student`: where every file of a run lives, in one class.

    RUN/
      config.json            the run's TrainConfig (how --resume and re-runs recognise it)
      metrics.jsonl          train and eval records, one JSON object per line
      order.jsonl            per optimizer step: its sample ids (and their λ when they vary)
      final_metrics.json     written when the run finished
      checkpoints/step-XXXXXX/   resumable checkpoints (trainer/checkpoint.py)
      final/                 the trained student (save_pretrained) and its tokenizer
      snapshots/             per-sample loss and confidence (snapshot.py)
      tensorboard/           the same scalars, when TensorBoard is installed

The trainer writes through it; experiments, reports and snapshot curricula read through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG_NAME

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def order(self) -> Path:
        return self.root / "order.jsonl"

    @property
    def final_metrics(self) -> Path:
        return self.root / "final_metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint of optimizer step `step` (names sort by step)."""
        return self.checkpoints / f"step-{step:06d}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"
