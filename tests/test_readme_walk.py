"""The README's walk through the three stages, run as a newcomer would run it.

The blocks marked `<!-- walk: creates FILE ... -->` are run in order, by bash, in one empty
folder, with `kdpipe` on the PATH. Each must exit 0 and leave the files its marker names.
The walk starts from what the quick start's demo leaves in `runs/demo`; the demo itself takes
minutes, so the folder gets a tiny teacher and a short corpus at the paths the demo writes them
to — taken from the code that writes them, so if the demo moves them, the README's paths fail
here as they would for a reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdpipe.embedded.corpus import HELDOUT_NAME, TRAIN_NAME
from kdpipe.embedded.prepare import TEACHER_RUN
from kdpipe.schemas.run_layout import RunLayout

from .conftest import stdlib_texts

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
WALK = re.compile(r"<!-- walk: creates (?P<files>[^>]*?) -->\n```bash\n(?P<script>.*?)```",
                  re.DOTALL)
DEMO = Path("runs/demo")  # `kdpipe demo --out runs/demo`, the quick start's command
STAGES = ("cache-teacher", "inspect", "verify", "build-curriculum", "train-student", "evaluate")


def walk_blocks() -> list[tuple[list[str], str]]:
    """(files the block creates, its bash script) for each walk block of the README."""
    return [(m["files"].split(), m["script"]) for m in WALK.finditer(README.read_text("utf-8"))]


def test_the_walk_runs_every_stage_from_the_demos_outputs() -> None:
    script = "\n".join(block for _, block in walk_blocks())
    assert [stage for stage in STAGES if f"kdpipe {stage} " not in script] == []
    demo_outputs = (RunLayout(DEMO / TEACHER_RUN).final, DEMO / "corpus" / TRAIN_NAME,
                    DEMO / "corpus" / HELDOUT_NAME)
    assert [str(p) for p in demo_outputs if str(p) not in script] == []


def write_corpus(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text[:1500]}) + "\n" for text in texts),
                    encoding="utf-8")


@pytest.mark.slow
def test_readme_walk(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    texts = stdlib_texts()
    shutil.copytree(tiny_teacher_dir, tmp_path / RunLayout(DEMO / TEACHER_RUN).final)
    write_corpus(tmp_path / DEMO / "corpus" / TRAIN_NAME, texts[:6])
    write_corpus(tmp_path / DEMO / "corpus" / HELDOUT_NAME, texts[6:8])
    bin_dir = tmp_path / "bin"  # `kdpipe` as an installed console script would be
    bin_dir.mkdir()
    (bin_dir / "kdpipe").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdpipe "$@"\n')
    (bin_dir / "kdpipe").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # tiny models: threads only spin
    blocks = walk_blocks()
    assert blocks, "README.md has no <!-- walk: creates ... --> blocks"
    for creates, script in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{script}\nfailed:\n{done.stderr[-3000:]}"
        assert [f for f in creates if not (tmp_path / f).exists()] == [], script
    final = json.loads(done.stdout.strip().splitlines()[-1])  # `kdpipe evaluate` ends the walk
    assert Path(final["cache"]) == Path("heldout-cache") and final["ppl"] > 1
