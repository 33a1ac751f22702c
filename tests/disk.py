"""Run the kdpipe CLI in a child process on a small tmpfs or a read-only mount.

`unshare -rm` gives the child its own mount namespace (as root inside a user namespace, so no
privileges are needed where the kernel allows user namespaces), where it mounts the file
system over a folder of the test's; tests skip where that is not allowed. The mounted folder
vanishes with the namespace, so the commands to inspect it run in the same child.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                                f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(folder)}"],
                               capture_output=True, timeout=60)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="cannot mount a tmpfs here "
                                 "(unshare -rm not allowed)")


@dataclass
class Result:
    code: int
    err: str


def kdpipe_on_mount(mount: Path, options: str, *commands: list[str]
                    ) -> tuple[list[Result], list[str]]:
    """Run `kdpipe ARGS` for each of `commands`, in order, with a tmpfs mounted at `mount`
    (`options`, e.g. "size=96k" or "ro"); returns their results and the files they left
    under the mount (relative to it)."""
    mount.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="kdpipe-mount-"))
    lines = [f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} || exit 99",
             f"export PYTHONPATH={shlex.quote(str(REPO))}"]
    for i, args in enumerate(commands):
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "kdpipe", *args])
        lines.append(f"{command} 2> {logs}/{i}.err; echo $? > {logs}/{i}.code")
    lines.append(f"cd {shlex.quote(str(mount))} && find . -mindepth 1 > {logs}/files")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 99, done.stderr
    results = [Result(int((logs / f"{i}.code").read_text()), (logs / f"{i}.err").read_text())
               for i in range(len(commands))]
    files = sorted(f.removeprefix("./") for f in (logs / "files").read_text().split())
    shutil.rmtree(logs)
    return results, files


def kdpipe_error(err: str) -> str:
    """The one error line kdpipe printed, after whatever progress lines came before it."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("kdpipe: error: ")]
    assert len(errors) == 1, err
    return errors[0]
