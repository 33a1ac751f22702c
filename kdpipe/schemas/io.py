"""Crash-safe writes and checksums: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdpipe.schemas.write_errors import writing

HASH_BLOCK = 4 << 20  # hashlib releases the GIL on large blocks: threads hash in parallel


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def temp_path_for(path: Path) -> Path:
    """A temporary sibling of `path` that no reader will mistake for the real file, unique to
    this call: two writers of one file never share it, whether threads of one process or
    processes of one pid on two machines sharing the folder."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it over `path`, else delete it.

    A full disk or a folder that cannot be written raises DiskError naming the temporary.
    """
    final = Path(path)
    tmp = temp_path_for(final)
    try:
        with writing(tmp):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON: a NaN or infinity raises instead of writing `NaN`, which JSON parsers
    other than Python's reject."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def nonfinite_as_null(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (JSON null), for records where
    a number can be missing for a reason (a one-seed interval has no width) and the file must
    still be strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nonfinite_as_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nonfinite_as_null(v) for v in obj]
    return obj


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temporaries left by a crashed writer (`.<name>.tmp-<pid>-<id>`, files or folders);
    returns how many."""
    removed = 0
    for stale in folder.glob(".*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed
