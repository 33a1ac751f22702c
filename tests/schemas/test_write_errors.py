"""Failed writes for lack of space or permission: found in every form libraries raise them,
named in one line, and left alone when they are something else."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kdpipe.schemas.errors import DiskError, KdpipeError
from kdpipe.schemas.io import atomic_write_text
from kdpipe.schemas.write_errors import at_command, disk_errno, writing


def torch_style() -> RuntimeError:
    """What torch.save into a Python file raises on a full disk: the OSError only as the
    implicit context of a RuntimeError."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "  # noqa: B904
                               "576 vs 534")
    except RuntimeError as exc:
        return exc


def test_the_errno_is_found_in_every_form() -> None:
    pyarrow_style = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No "
                                          "space left on device")
    safetensors_style = Exception("Error while serializing: I/O error: Read-only file system "
                                  "(os error 30)")
    assert disk_errno(pyarrow_style) == errno.ENOSPC
    assert disk_errno(torch_style()) == errno.ENOSPC
    assert disk_errno(safetensors_style) == errno.EROFS
    assert disk_errno(RuntimeError("unexpected pos 576 vs 534")) is None
    assert disk_errno(OSError(errno.ENOENT, "No such file or directory")) is None


def test_a_failed_write_names_its_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record.json"

    def full(path: Path, text: str) -> None:
        path.write_text(text[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskError) as caught, writing(target):
        full(target, "{}")
    assert str(caught.value) == (f"no space left on device writing {target}; free space or "
                                 "choose another --out")
    assert isinstance(caught.value, KdpipeError) and isinstance(caught.value, OSError)

    def partial_write_text(self: Path, text: str, encoding: str = "utf-8") -> int:
        fd = os.open(self, os.O_WRONLY | os.O_CREAT)
        os.write(fd, text[:1].encode())
        os.close(fd)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    final = tmp_path / "config.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_text", partial_write_text)
        with pytest.raises(DiskError, match=r"disk quota exceeded writing .*\.config\.json\.tmp-"):
            atomic_write_text(final, "{}")
    assert list(tmp_path.iterdir()) == [target]  # neither the file nor its temporary


def test_other_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unexpected pos"), writing(tmp_path / "x"):
        raise RuntimeError("unexpected pos 576 vs 534")
    with pytest.raises(FileNotFoundError), at_command(["train-student"]):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "cache")


def test_the_command_boundary_names_what_to_do_next(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["cache-teacher", "--out", "big/cache", "--top-k", "8"]
    with pytest.raises(DiskError) as caught, at_command(args):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write naming no file
    assert str(caught.value) == (
        "no space left on device writing under big/cache; free space or choose another --out "
        "(nothing valid was lost: re-run the same command to resume)")
    with pytest.raises(DiskError, match=r"read-only file system writing runs/r; make it "
                                        r"writable .*--resume continues"), \
            at_command(["train-student", "--out=runs/r"]):
        raise OSError(errno.EROFS, "Read-only file system", "runs/r")
    # Permission denied: a write when the file would be created, a read when it exists and
    # cannot be read (then the error stays as it was).
    new = tmp_path / "new"
    with pytest.raises(DiskError, match=f"permission denied writing {new}"), \
            at_command(["build-curriculum"]):
        raise PermissionError(errno.EACCES, "Permission denied", str(new))
    unreadable = tmp_path / "secret"
    unreadable.write_text("x")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError), at_command(["train-student"]):
        raise PermissionError(errno.EACCES, "Permission denied", str(unreadable))
