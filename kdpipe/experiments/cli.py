"""Typer commands `experiment` and `report` (registered by `kdpipe/cli.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdpipe.options import THREADS_HELP


def experiment(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (docs/experiments.md).")],
    out: Annotated[str | None, typer.Option(
        help="Experiment folder (default: the file's `out:`, else runs/NAME).")] = None,
    parallel: Annotated[int, typer.Option(
        help="Runs trained at the same time, each in its own process.")] = 1,
    threads: Annotated[int, typer.Option(
        help=THREADS_HELP + " Each of the --parallel runs gets this many.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars (sequential runs).")
                        ] = True,
) -> None:
    """Train arms × seeds on one cache (finished runs are skipped); summary with 95% CIs."""
    from kdpipe.experiments.config import load_experiment
    from kdpipe.experiments.runner import SUMMARY_MD, run_experiment
    from kdpipe.progress import bars_shown, library_bars

    exp = load_experiment(config, out)
    # transformers' own bars (loading and saving the setup's models) only where ours are
    # drawn: a captured log gets status lines, not redraws.
    with library_bars(bars_shown(progress)):
        run_experiment(exp, parallel=parallel, threads=threads or None, device=device,
                       progress=progress)
    typer.echo((Path(exp.out) / SUMMARY_MD).read_text(encoding="utf-8"))
    typer.echo(f"plots and curves: kdpipe report {exp.out}")


def report(
    run_dir: Annotated[Path, typer.Argument(
        help="An experiment or demo folder (or one train-student run folder).")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default RUN_DIR/report).")
                   ] = None,
    plots: Annotated[bool, typer.Option(
        help="Draw PNG plots (needs matplotlib: pip install 'kdpipe[report]').")] = True,
) -> None:
    """Markdown + PNG plots of an experiment: eval curves, difficulty, λ, curriculum pool."""
    from kdpipe.experiments.report import render_report

    path = render_report(run_dir, plots=plots, out=out)
    typer.echo(f"report: {path}")
