"""A write that fails for lack of space or permission ends in one line naming the file, not a
traceback.

A full disk (ENOSPC, EDQUOT, EFBIG), a read-only file system (EROFS) or a folder the user may
not write (EACCES, EPERM) is fixed outside kdpipe. `writing(path)` turns such a failure into a
`DiskError` naming the file being written: `io.atomic_path` (shards, manifests, curricula,
snapshots, every JSON record), checkpoints and the run logs use it. `at_command(argv)` wraps
a whole command in `kdpipe/cli.py`: it converts what no writer did, naming the file when the
error knows it and the command's `--out` otherwise, and says what to do next. Every writer
writes to a temporary name and renames it, and removes the temporary when the write fails, so
nothing half-written looks valid and the same command resumes.

The errno reaches us in three forms: pyarrow raises OSError(errno) without the path,
`torch.save` into a Python file a RuntimeError whose `__context__` is the OSError, and
safetensors an error whose message ends in "(os error 28)". `disk_errno` reads all three.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kdpipe.schemas.errors import DiskError

FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for its file system"}
DENIED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted"}
REASONS = FULL | DENIED
_ERRNO_TEXT = re.compile(r"(?:os error|errno) (\d+)", re.IGNORECASE)

# What to do after the failure, for the commands whose writes resume.
NEXT_STEP = {
    "cache-teacher": "re-run the same command to resume",
    "train-student": "re-run it; --resume continues from its last complete checkpoint",
    "build-curriculum": "re-run the same command",
}


def disk_errno(exc: BaseException) -> int | None:
    """The errno in `REASONS` that `exc` or an exception it came from carries, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in REASONS:
            return current.errno
        found = _ERRNO_TEXT.search(str(current))
        if found and int(found.group(1)) in REASONS:
            return int(found.group(1))
        current = current.__cause__ or current.__context__
    return None


def disk_error(code: int, path: str | Path) -> DiskError:
    """The one-line error for a write of `path` that failed with `code`."""
    remedy = "free space" if code in FULL else "make it writable"
    return DiskError(f"{REASONS[code]} writing {path}; {remedy} or choose another --out")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run a write of `path` (a file, or a folder being filled); a failure for lack of space
    or permission is raised as a DiskError naming the file (the error's own, else `path`)."""
    try:
        yield
    except DiskError:
        raise
    except Exception as exc:
        code = disk_errno(exc)
        if code is None or not _failed_write(code, exc, unnamed=True):
            raise
        raise disk_error(code, getattr(exc, "filename", None) or path) from exc


def _failed_write(code: int, exc: BaseException, unnamed: bool) -> bool:
    """Whether a failure with `code` was one of writing: any failure for lack of space or on a
    read-only file system; a permission error on a file it would create or could read (one it
    could not read was a failed read, reported as such), or naming no file when `unnamed`."""
    if code not in (errno.EACCES, errno.EPERM):
        return True
    filename = getattr(exc, "filename", None)
    if filename is None:
        return unnamed
    return not os.path.exists(filename) or os.access(filename, os.R_OK)


def _option(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _with_next_step(error: DiskError, command: str | None) -> DiskError:
    step = NEXT_STEP.get(command or "")
    return DiskError(f"{error} (nothing valid was lost: {step})" if step else str(error))


@contextmanager
def at_command(argv: Sequence[str]) -> Iterator[None]:
    """Run the kdpipe command `argv`; a write failing for lack of space or permission is
    raised as one DiskError that ends with what to do next."""
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        yield
    except DiskError as exc:
        raise _with_next_step(exc, command) from exc
    except Exception as exc:
        code = disk_errno(exc)
        if code is None or not _failed_write(code, exc, unnamed=False):
            raise
        out = _option(argv, "--out")
        path = getattr(exc, "filename", None) or (f"under {out}" if out else "its output")
        raise _with_next_step(disk_error(code, path), command) from exc
