"""`BuildCurriculumConfig`: every option of `kdpipe build-curriculum`, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import options
from kdpipe.options import (
    DEVICE_HELP,
    LOCAL_CACHE_HELP,
    PROGRESS_HELP,
    REMOTE_CODE_HELP,
    THREADS_HELP,
    VERIFY_READS_HELP,
    option,
)
from kdpipe.schemas.curriculum import METRICS, SOURCES


@dataclass(frozen=True)
class BuildCurriculumConfig:
    """Every option of `kdpipe build-curriculum`; `kdpipe build-curriculum --help` shows them."""

    cache: str = option(help="Teacher cache folder to rank.")
    out: str = option(help="Curriculum file to write, e.g. curriculum.parquet.")
    source: str = option(
        "teacher", "teacher (cached stats, no model), student (--student scoring pass), "
        "snapshot (--run's per-sample training losses), length (baseline).", choices=SOURCES)
    metric: str | None = option(
        None, "teacher: nll|entropy|confidence; student: nll|confidence|entropy; snapshot: "
        "nll|confidence|variability. Default nll. Higher score = harder.")
    student: str | None = option(
        None, "--source student: the checkpoint to score with (e.g. RUN/final).")
    run: str | None = option(None, "--source snapshot: a train-student run folder.")
    epochs: tuple[int, ...] = option(
        (), "--source snapshot: epoch(s) to use (repeat for a data map; default: the last "
        "finished epoch).", flag="epoch", ge=0)
    buckets: int = option(10, "Equal-size difficulty buckets.", ge=1)
    tokenizer: str | None = option(
        None, "--source student: tokenizer if not stored with the student.")
    batch_size: int = option(8, "Sequences per scoring batch.", ge=1)
    device: str = option("auto", DEVICE_HELP)
    threads: int = option(0, THREADS_HELP, ge=0)
    dtype: str = option("auto", "Autocast dtype of the scoring pass: auto, float32, bfloat16, "
                        "float16.", choices=("auto", "float32", "bfloat16", "float16"))
    chunk_size: int = option(1024, "Target tokens per head chunk.", ge=1)
    overwrite: bool = option(False, "Replace an existing curriculum built with other "
                             "settings.")
    progress: bool = option(True, PROGRESS_HELP)
    verify_reads: bool = option(True, VERIFY_READS_HELP)
    local_cache: str | None = option(None, LOCAL_CACHE_HELP)
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)

    @classmethod
    def from_options(cls, **values: Any) -> BuildCurriculumConfig:
        """A BuildCurriculumConfig from option names, as on the command line."""
        return options.build(cls, values)

    @property
    def resolved_metric(self) -> str:
        return self.metric or METRICS.get(self.source, ("?",))[0]

    def problems(self) -> list[str]:
        """Checks across options (each option's own checks are declared with it)."""
        found = []
        if self.source in SOURCES and self.resolved_metric not in METRICS[self.source]:
            found.append(f"--metric {self.resolved_metric!r} is not one of "
                         f"{', '.join(METRICS[self.source])} for --source {self.source}")
        if (self.source == "student") != (self.student is not None):
            found.append("--student PATH is needed with --source student, and only there")
        if (self.source == "snapshot") != (self.run is not None):
            found.append("--run RUN_DIR is needed with --source snapshot, and only there")
        if self.epochs and self.source != "snapshot":
            found.append("--epoch applies only to --source snapshot")
        if len(set(self.epochs)) != len(self.epochs):
            found.append(f"--epoch values {list(self.epochs)} must be distinct")
        if self.source == "snapshot" and self.resolved_metric == "variability" and \
                len(self.epochs) < 2:
            found.append("--metric variability needs at least two --epoch values")
        if Path(self.out).is_dir():
            found.append(f"--out {self.out} is a folder; give a file name such as "
                         "curriculum.parquet")
        return found

    def validate(self) -> None:
        """Raise one ConfigError listing every problem."""
        options.raise_problems("build-curriculum",
                               options.field_problems(self) + self.problems())
