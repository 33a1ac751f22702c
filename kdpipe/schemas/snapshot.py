"""Per-sample training snapshots: the student's own loss and confidence on each sample it saw.

Written by `kdpipe train-student` to `RUN/snapshots/epoch-XXXX.parquet` after each epoch (and
`epoch-XXXX-step-XXXXXX.parquet` every `--snapshot-every` steps), read by
`kdpipe build-curriculum --source snapshot` for student-generated curricula and data maps.

One row per sample seen in the epoch so far. `loss` is the mean cross-entropy of the true next
tokens, `confidence` the mean student probability of them, both measured in the training
forward pass of the step that used the sample (before that step's update). A sample seen
several times in one epoch is averaged over its occurrences (`seen` counts them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.io import atomic_path
from kdpipe.schemas.run_layout import RunLayout

SNAPSHOT_SCHEMA_VERSION = 1

# Column names.
SAMPLE_ID = "sample_id"
EPOCH = "epoch"
STEP = "step"  # optimizer step (1-based) that last used the sample
LOSS = "loss"
CONFIDENCE = "confidence"
TOKENS = "tokens"  # target tokens of the sample
SEEN = "seen"  # occurrences in this epoch so far

# File-level metadata keys.
VERSION_KEY = b"kdpipe.snapshot_schema_version"
EPOCH_KEY = b"kdpipe.epoch"
STEP_KEY = b"kdpipe.step"  # optimizer steps done when the snapshot was written
COMPLETE_KEY = b"kdpipe.epoch_complete"  # "true" once the whole epoch was seen
CACHE_KEY = b"kdpipe.cache_fingerprint"  # the cache manifest's settings_fingerprint

SNAPSHOT_SCHEMA = pa.schema([
    pa.field(SAMPLE_ID, pa.int64(), nullable=False),
    pa.field(EPOCH, pa.int32(), nullable=False),
    pa.field(STEP, pa.int64(), nullable=False),
    pa.field(LOSS, pa.float32(), nullable=False),
    pa.field(CONFIDENCE, pa.float32(), nullable=False),
    pa.field(TOKENS, pa.int32(), nullable=False),
    pa.field(SEEN, pa.int32(), nullable=False),
])

_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{6,}))?\.parquet$")


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    epoch: int
    step: int
    epoch_complete: bool
    cache_fingerprint: str


def snapshot_name(epoch: int, step: int | None = None) -> str:
    """epoch-XXXX.parquet for an epoch's end, epoch-XXXX-step-XXXXXX.parquet within one."""
    return f"epoch-{epoch:04d}.parquet" if step is None else \
        f"epoch-{epoch:04d}-step-{step:06d}.parquet"


def write_snapshot(path: Path, table: pa.Table, epoch: int, step: int, epoch_complete: bool,
                   cache_fingerprint: str) -> None:
    """Write one snapshot atomically; `table` must have exactly SNAPSHOT_SCHEMA's columns."""
    if not table.schema.remove_metadata().equals(SNAPSHOT_SCHEMA):
        raise ValueError(f"snapshot table schema {table.schema} is not SNAPSHOT_SCHEMA")
    metadata = {VERSION_KEY: str(SNAPSHOT_SCHEMA_VERSION).encode(),
                EPOCH_KEY: str(epoch).encode(), STEP_KEY: str(step).encode(),
                COMPLETE_KEY: b"true" if epoch_complete else b"false",
                CACHE_KEY: cache_fingerprint.encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")


def read_snapshot(path: str | Path) -> tuple[pa.Table, SnapshotInfo]:
    """Read and validate a snapshot: version first, then the exact schema."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {path} not found; train with snapshots enabled")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CacheFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    meta = table.schema.metadata or {}
    version = meta.get(VERSION_KEY)
    if version != str(SNAPSHOT_SCHEMA_VERSION).encode():
        shown = version.decode() if version else "none"
        raise CacheFormatError(f"{path}: snapshot schema version {shown}, this kdpipe reads "
                               f"version {SNAPSHOT_SCHEMA_VERSION}")
    if not table.schema.remove_metadata().equals(SNAPSHOT_SCHEMA):
        raise CacheFormatError(f"{path}: columns {table.schema.remove_metadata()} do not match "
                               f"the snapshot schema {SNAPSHOT_SCHEMA}")
    try:
        info = SnapshotInfo(path=path, epoch=int(meta[EPOCH_KEY]), step=int(meta[STEP_KEY]),
                            epoch_complete=meta[COMPLETE_KEY] == b"true",
                            cache_fingerprint=meta[CACHE_KEY].decode())
    except (KeyError, ValueError) as exc:
        raise CacheFormatError(f"{path}: snapshot metadata incomplete ({exc})") from exc
    return table.replace_schema_metadata(None), info


def list_snapshots(run_dir: str | Path) -> list[tuple[int, int | None, Path]]:
    """(epoch, step or None for an epoch's end, path) of a run's snapshots, in order."""
    folder = RunLayout(Path(run_dir)).snapshots
    found = []
    for path in folder.glob("epoch-*.parquet") if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match:
            step = int(match.group(2)) if match.group(2) else None
            found.append((int(match.group(1)), step, path))
    # Within an epoch, step snapshots come before the epoch's end.
    return sorted(found, key=lambda e: (e[0], e[1] is None, e[1] or 0))
