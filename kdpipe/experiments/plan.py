"""Planning an experiment: its inputs, one TrainConfig per arm × seed, and its curricula.

`plan_runs` turns the arms (over the common `train` options) into run configs whose curricula
are file paths; `check_runs` validates all of them and compares each with an existing run
folder before anything trains; `run_state` says whether a folder holds the finished run, an
interrupted one, or another run; `build_curricula` makes the named curricula (once, or once
per seed from another arm's runs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdpipe.embedded.timing import StageClock
from kdpipe.experiments.config import ExperimentConfig
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_text
from kdpipe.schemas.run_layout import RunLayout

log = logging.getLogger(__name__)

RUNS_DIR, CURRICULA_DIR, MODELS_DIR = "runs", "curricula", "models"
MAX_DECODED_BYTES = 1 << 30  # below this the whole cache stays decoded (--shuffle-window)


@dataclass(frozen=True)
class Inputs:
    """What every run shares: the caches, the default student, and where they came from."""

    cache: str
    eval_cache: str | None
    student_config: str | None = None  # default student when no arm names one
    teacher: str | None = None
    setup_dir: str | None = None


@dataclass(frozen=True)
class PlannedRun:
    arm: str
    seed: int
    config: Any  # TrainConfig (imported lazily: this module is imported by the CLI)

    @property
    def name(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / RUNS_DIR / arm / f"seed-{seed}"


def curriculum_path(out: Path, name: str, seed: int | None) -> Path:
    folder = out / CURRICULA_DIR
    return folder / f"{name}.parquet" if seed is None else folder / name / f"seed-{seed}.parquet"


def resolve_inputs(exp: ExperimentConfig, out: Path, clock: StageClock, device: str,
                   progress: bool) -> Inputs:
    """Step 1: run the embedded setup, or check the given caches."""
    if exp.setup.embedded is not None:
        from kdpipe.embedded.prepare import prepare
        from kdpipe.embedded.presets import get_preset

        prepared = prepare(get_preset(exp.setup.embedded), out / "setup", clock, device,
                           progress)
        return Inputs(cache=str(prepared.cache), eval_cache=str(prepared.heldout_cache),
                      student_config=str(prepared.student_config), teacher=str(prepared.teacher),
                      setup_dir=str(prepared.root))
    assert exp.setup.cache is not None
    for flag, path in (("setup.cache", exp.setup.cache), ("setup.eval_cache",
                                                          exp.setup.eval_cache)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such cache folder (make one with "
                                    "`kdpipe cache-teacher`)")
    return Inputs(cache=exp.setup.cache, eval_cache=exp.setup.eval_cache)


def default_shuffle_window(cache: str) -> int | None:
    """Every row group of a small cache stays decoded: curricula read in difficulty order."""
    from kdpipe.schemas.cache import open_cache

    m = open_cache(cache).manifest
    return None if m.decoded_bytes > MAX_DECODED_BYTES else max(1, m.num_row_groups)


def _student_file(value: Any, out: Path, label: str) -> Any:
    """An inline `student_config` mapping becomes OUT/models/<label>.json."""
    if not isinstance(value, dict):
        return value
    path = out / MODELS_DIR / f"{label}.json"
    text = json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return str(path)


def plan_runs(exp: ExperimentConfig, inputs: Inputs, out: Path, device: str, progress: bool
              ) -> list[PlannedRun]:
    """One TrainConfig per arm × seed (curricula referenced by name become their paths)."""
    from kdpipe.trainer.config import TrainConfig

    base: dict[str, Any] = {"device": device, "progress": progress}
    window = default_shuffle_window(inputs.cache)
    if window is not None:
        base["shuffle_window"] = window
    planned = []
    for arm in exp.arms:
        options = {**base, **exp.arm_options(arm)}
        options["student_config"] = _student_file(
            options.get("student_config"), out,
            arm.name if "student_config" in arm.options else "student")
        if options.get("student") is None and options.get("student_config") is None:
            if inputs.student_config is None:
                raise ConfigError(f"arm {arm.name}: no student; give train.student_config (a "
                                  "JSON file or mapping) or train.student in the experiment")
            options["student_config"] = inputs.student_config
        for seed in exp.seeds:
            opts = dict(options)
            name = opts.get("curriculum")
            spec = exp.curriculum(name) if isinstance(name, str) else None
            if spec is not None:
                opts["curriculum"] = str(curriculum_path(
                    out, spec.name, seed if spec.from_arm is not None else None))
            cfg = TrainConfig.from_options(cache=inputs.cache, eval_cache=inputs.eval_cache,
                                           out=str(run_dir(out, arm.name, seed)), seed=seed,
                                           **opts).with_cache_defaults()
            planned.append(PlannedRun(arm.name, seed, cfg))
    return planned


def run_state(cfg: Any) -> tuple[str, list[str]]:
    """("new" | "finished" | "unfinished" | "conflict", fields that differ)."""
    from kdpipe.trainer.config import COSMETIC_FIELDS, RESUMABLE_CHANGES, read_config

    layout = RunLayout(Path(cfg.out))
    if not layout.config.is_file():
        return "new", []
    changed = [f for f in read_config(layout.root).changed_fields(cfg)
               if f not in COSMETIC_FIELDS]
    if layout.final_metrics.is_file() and not changed:
        return "finished", []
    fixed = [f for f in changed if f not in RESUMABLE_CHANGES]
    return ("conflict", fixed) if fixed else ("unfinished", changed)


def check_runs(runs: list[PlannedRun], placeholder: Path) -> None:
    """Validate every run's options and refuse run folders made with other settings, before
    anything trains. Curricula not built yet are stood in for by an existing file."""
    problems = []
    for run in runs:
        cfg = run.config
        if cfg.curriculum.file is not None and not Path(cfg.curriculum.file).is_file():
            cfg = replace(cfg, curriculum=replace(cfg.curriculum, file=str(placeholder)))
        try:
            cfg.validate()
        except ConfigError as exc:
            problems.append(f"{run.name}: {exc}")
            continue
        state, fields = run_state(run.config)
        if state == "conflict":
            problems.append(f"{run.name}: {run.config.out} holds a run with other "
                            f"{', '.join(fields)}; delete it or use another --out")
    if problems:
        raise ConfigError("experiment cannot start: " + "; ".join(problems))
    budgets: dict[tuple[int | None, int | None, int], list[str]] = {}
    for run in runs:
        c = run.config
        budgets.setdefault((c.max_steps, c.epochs, c.batch_size * c.grad_accum), []).append(
            run.arm)
    if len(budgets) > 1:
        log.warning("arms differ in training length (max_steps, epochs, samples per step): %s; "
                    "their comparison is not at the same token budget",
                    {str(k): sorted(set(v)) for k, v in budgets.items()})


def build_curricula(exp: ExperimentConfig, inputs: Inputs, out: Path, clock: StageClock,
                    seeds: tuple[int, ...] | None, device: str, progress: bool) -> None:
    """Step 2 (seeds None: curricula without from_arm) or step 3 (per-seed curricula)."""
    from kdpipe.curriculum.build import build_curriculum
    from kdpipe.curriculum.config import BuildCurriculumConfig

    for spec in exp.curricula:
        if (spec.from_arm is None) != (seeds is None):
            continue
        for seed in seeds or (None,):
            options = {"device": device, "progress": progress, **spec.options}
            if spec.from_arm is not None:
                assert seed is not None
                source_run = run_dir(out, spec.from_arm, seed)
                if options.get("source") == "student":
                    options["student"] = str(RunLayout(source_run).final)
                else:
                    options["run"] = str(source_run)
            path = curriculum_path(out, spec.name, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            label = f"curriculum {spec.name}" + ("" if seed is None else f"/seed-{seed}")
            with clock.stage(label, done=path.is_file()):
                build_curriculum(BuildCurriculumConfig.from_options(
                    cache=inputs.cache, out=str(path), **options))
