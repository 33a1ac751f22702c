"""The run folder's life cycle: recognise it, resume it or refuse to mix two runs, then claim it.

`plan_run_dir` only reads, so a run refused for any reason (a bad option, a cache or a
tokenizer that does not fit) has written nothing; `claim_run_dir` writes, once every check of
the run has passed.

A run folder holds `config.json`; a finished run also `final_metrics.json`. Re-running the same
command on a finished run returns its results without training; a different config in an
existing run folder is refused unless `--overwrite` (start over) or `--resume` (continue; only
the fields in `config.RESUMABLE_CHANGES` may differ). On resume, records written after the
checkpoint by the interrupted run are dropped, so the logs read like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.options import flat_values
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import remove_stale_temp_files
from kdpipe.schemas.run_layout import RUN_CONFIG_NAME, RunLayout
from kdpipe.trainer.checkpoint import latest_checkpoint, read_trainer_state
from kdpipe.trainer.config import (
    COSMETIC_FIELDS,
    RESUMABLE_CHANGES,
    TrainConfig,
    read_config,
    write_config,
)
from kdpipe.trainer.metrics import truncate_after_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunStart:
    """What a run does with its folder, decided before anything is written."""

    checkpoint: Path | None  # resume from here; None: start from step 0
    finished: dict[str, Any] | None  # the results of an already finished identical run
    replace: bool = False  # --overwrite: the run there is deleted when the folder is claimed


def plan_run_dir(cfg: TrainConfig, world_size: int = 1) -> RunStart:
    """Decide what this run does with `cfg.out`, reading only: start, resume, replace the run
    there, or return a finished identical run's results. Raises ConfigError for a folder this
    run must not touch, or a --resume with nothing to resume.

    world_size: the processes of this run; --resume refuses a checkpoint written by another
    number (the data would be split differently).
    """
    run_dir = Path(cfg.out)
    layout = RunLayout(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        if cfg.resume:
            raise ConfigError(f"--resume {run_dir}: there is no run to resume (the folder is "
                              "missing or empty); drop --resume to start one")
        return RunStart(checkpoint=None, finished=None)
    if not layout.config.is_file():
        raise ConfigError(f"--out {run_dir} exists and is not a kdpipe run folder (no "
                          f"{RUN_CONFIG_NAME}); choose an empty or new folder")
    previous = read_config(run_dir)
    changed = [f for f in previous.changed_fields(cfg) if f not in COSMETIC_FIELDS]
    if cfg.overwrite:
        return RunStart(checkpoint=None, finished=None, replace=True)
    if layout.final_metrics.is_file() and not changed:
        log.info("%s already holds this finished run; nothing to do", run_dir)
        results = json.loads(layout.final_metrics.read_text(encoding="utf-8"))
        return RunStart(checkpoint=None, finished=results)
    if not cfg.resume:
        raise ConfigError(
            f"--out {run_dir} holds a run with a different config ({', '.join(changed)}); pass "
            "--resume to continue it, --overwrite to replace it, or choose another --out"
            if changed else f"--out {run_dir} holds an unfinished run with this config; pass "
            "--resume to continue it or --overwrite to start over")
    fixed = [f for f in changed if f not in RESUMABLE_CHANGES]
    if fixed:
        raise ConfigError(
            f"--resume {run_dir}: the run was made with different "
            f"{_differences(previous, cfg, fixed)}; only run length and reporting options may "
            "change on resume (use --overwrite or another --out to start a different run)")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"--resume {run_dir}: the run wrote no checkpoint to resume from; "
                          "pass --overwrite to start it over")
    _check_world_size(run_dir, checkpoint, world_size)
    if changed:
        length = " (the LR schedule follows the new length)" if {"max_steps", "epochs"} & set(
            changed) else ""
        log.warning("resuming %s with changed %s%s", run_dir, ", ".join(changed), length)
    return RunStart(checkpoint=checkpoint, finished=None)


def _differences(previous: TrainConfig, cfg: TrainConfig, names: list[str]) -> str:
    """'lora_r (run: 8, now: 0), seed (run: 1, now: 2)': what to repeat to resume."""
    was, now = flat_values(previous), flat_values(cfg)
    return ", ".join(f"{name} (run: {was[name]!r}, now: {now[name]!r})" for name in names)


def claim_run_dir(cfg: TrainConfig, start: RunStart) -> None:
    """Make `cfg.out` this run's folder, once every check has passed: delete the run it
    replaces, write `config.json`, and clear what an interrupted run left (its half-written
    checkpoints, and the final metrics of a run now resumed)."""
    layout = RunLayout(Path(cfg.out))
    if start.replace:
        log.info("--overwrite: deleting the previous run in %s", layout.root)
        shutil.rmtree(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_config(layout.root, cfg)
    layout.final_metrics.unlink(missing_ok=True)
    for folder in (layout.root, layout.checkpoints):
        if folder.is_dir():
            remove_stale_temp_files(folder)


def _check_world_size(run_dir: Path, checkpoint: Path | None, world_size: int) -> None:
    if checkpoint is None:
        return
    written = read_trainer_state(checkpoint).world_size
    if written != world_size:
        raise ConfigError(
            f"--resume {run_dir}: {checkpoint.name} was written by {written} process(es), this "
            f"run has {world_size}; resume with torchrun --nproc-per-node (x nodes) = "
            f"{written}, or start a new --out")


def rewind_logs(run_dir: Path, step: int, epoch: int) -> None:
    """Forget what the interrupted run logged after the checkpoint at `step` (in `epoch`)."""
    layout = RunLayout(run_dir)
    for path in (layout.metrics, layout.order):
        truncate_after_step(path, step)
    for snap_epoch, snap_step, path in snap.list_snapshots(run_dir):
        stale = snap_epoch >= epoch if snap_step is None else snap_step > step
        if stale:
            path.unlink()
