"""Typer commands `train-student` and `evaluate`, generated from `TrainConfig` / `EvalConfig`.

Registered by `kdpipe/cli.py`. Every option is declared once, on its config field
(`kdpipe/options.py`); these functions only run the stage and print its result.
"""

from __future__ import annotations

import json

import typer

from kdpipe import options
from kdpipe.progress import bars_shown, library_bars
from kdpipe.trainer.config import EvalConfig, TrainConfig


def _train(cfg: TrainConfig) -> None:
    from kdpipe.torch_runtime import set_threads
    from kdpipe.trainer.distributed import is_main_process
    from kdpipe.trainer.train import train

    set_threads(cfg.threads)
    if cfg.dry_run:
        from kdpipe.trainer.memory_plan import dry_run, render

        plan = dry_run(cfg)
        if is_main_process():  # every process plans the same: rank 0 prints it
            typer.echo(render(plan))
        return
    with library_bars(bars_shown(cfg.progress and is_main_process())):  # "Loading weights"
        final = train(cfg)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        typer.echo(json.dumps(final, allow_nan=False))


def _evaluate(cfg: EvalConfig) -> None:
    from kdpipe.torch_runtime import set_threads
    from kdpipe.trainer.distributed import is_main_process
    from kdpipe.trainer.evaluate import evaluate

    set_threads(cfg.threads)
    result = evaluate(cfg)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        typer.echo(json.dumps(result, allow_nan=False))


train_student = options.command(
    TrainConfig, _train,
    "Train a student from a teacher cache (no teacher is loaded); prints final metrics.")
evaluate = options.command(
    EvalConfig, _evaluate,
    "One pass of a student over a cache; prints one JSON object (ce, ppl, kd, top1...).\n\n"
    "Under torchrun the processes split the samples and reduce the sums.")
