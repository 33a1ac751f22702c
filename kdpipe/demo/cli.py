"""Typer command `demo` (registered by `kdpipe/cli.py`): build the options, call `run_demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdpipe.embedded.presets import DEFAULT_PRESET, PRESETS
from kdpipe.options import THREADS_HELP


def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artifact and the table.")
                   ] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(
        help=f"Size: {', '.join(PRESETS)} (tiny: < 3 min, CI; small: < 10 min on 2 CPU "
        "cores; full: a stronger teacher, about an hour; chat: conversations about the stdlib "
        "with assistant-only targets, CE and KD students, < 10 min; chat-tiny: CI)."
    )] = DEFAULT_PRESET,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(
        help="Show progress bars on a terminal (else, and in logs: a status line every 30 s)."
    )] = True,
    overwrite: Annotated[bool, typer.Option(
        help="Delete a previous demo in --out and start over.")] = False,
    second_teacher: Annotated[str | None, typer.Option(
        help="Also make a teacher B, cached over the same sequences as the teacher, and "
        "students of B alone and of both teachers: half (the teacher's shape, trained on the "
        "leading half of the train split) or small (a smaller shape trained on all of it).")
    ] = None,
) -> None:
    """Run every stage on the Python stdlib's source; compare CE/KD/KD-CL/KD-CL-SR students
    (chat presets: CE and KD on conversations answered by the stdlib's docstrings)."""
    from kdpipe.demo.run import TABLE_MD, run_demo

    run_demo(out, preset, threads or None, device, progress, overwrite, second_teacher)
    typer.echo((out / TABLE_MD).read_text(encoding="utf-8"))
