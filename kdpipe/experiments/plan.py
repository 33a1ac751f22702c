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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdpipe.embedded.timing import StageClock
from kdpipe.experiments.config import EMBEDDED_TEACHERS, ArmSpec, ExperimentConfig
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_text
from kdpipe.schemas.run_layout import RunLayout

log = logging.getLogger(__name__)

RUNS_DIR, CURRICULA_DIR, MODELS_DIR = "runs", "curricula", "models"
MAX_DECODED_BYTES = 1 << 30  # below this the whole cache stays decoded (--shuffle-window)


@dataclass(frozen=True)
class Inputs:
    """What every run shares: the caches, the default student, and where they came from.

    `cache` / `eval_cache` / `teacher` are the first teacher's (the one arms without
    `teachers:` use); `caches` / `eval_caches` map every teacher's name to its own
    (empty: the first teacher is the only one, named `a`)."""

    cache: str
    eval_cache: str | None
    student_config: str | None = None  # default student when no arm names one
    teacher: str | None = None
    setup_dir: str | None = None
    caches: dict[str, str] = field(default_factory=dict)
    eval_caches: dict[str, str] = field(default_factory=dict)

    def teacher_caches(self) -> dict[str, str]:
        return self.caches or {EMBEDDED_TEACHERS[0]: self.cache}

    def teacher_eval_caches(self) -> dict[str, str]:
        if self.eval_caches:
            return self.eval_caches
        return {} if self.eval_cache is None else {EMBEDDED_TEACHERS[0]: self.eval_cache}


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


def curriculum_path(out: Path, name: str, seed: int | None, teacher: str | None = None
                    ) -> Path:
    """OUT/curricula/NAME.parquet, or NAME/seed-S.parquet per seed; built on the cache of a
    teacher other than the setup's first, NAME@TEACHER (`@` is in no name, so no clash)."""
    folder = out / CURRICULA_DIR
    stem = name if teacher is None else f"{name}@{teacher}"
    return folder / f"{stem}.parquet" if seed is None else folder / stem / f"seed-{seed}.parquet"


def _curriculum_teacher(exp: ExperimentConfig, teacher: str) -> str | None:
    """The teacher part of a curriculum's path: None for the setup's first teacher."""
    return None if teacher == exp.setup.teachers()[0] else teacher


def resolve_inputs(exp: ExperimentConfig, out: Path, clock: StageClock, device: str,
                   progress: bool) -> Inputs:
    """Step 1: run the embedded setup (with its second teacher when asked), or check the
    given caches."""
    if exp.setup.embedded is not None:
        from kdpipe.embedded.prepare import prepare
        from kdpipe.embedded.presets import get_preset

        prepared = prepare(get_preset(exp.setup.embedded), out / "setup", clock, device,
                           progress, second_teacher=exp.setup.second_teacher)
        a, b = EMBEDDED_TEACHERS
        caches, eval_caches = {a: str(prepared.cache)}, {a: str(prepared.heldout_cache)}
        if prepared.cache_b is not None and prepared.heldout_b is not None:
            caches[b], eval_caches[b] = str(prepared.cache_b), str(prepared.heldout_b)
        return Inputs(cache=caches[a], eval_cache=eval_caches[a],
                      student_config=str(prepared.student_config), teacher=str(prepared.teacher),
                      setup_dir=str(prepared.root), caches=caches, eval_caches=eval_caches)
    caches, eval_caches = exp.setup.teacher_caches(), exp.setup.teacher_eval_caches()
    for key, named in (("cache", caches), ("eval_cache", eval_caches)):
        for name, path in named.items():
            flag = f"setup.{key}s.{name}" if exp.setup.caches else f"setup.{key}"
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{flag} {path}: no such cache folder (make one with "
                                        "`kdpipe cache-teacher`)")
    first = exp.setup.teachers()[0]
    return Inputs(cache=caches[first], eval_cache=eval_caches.get(first), caches=caches,
                  eval_caches=eval_caches)


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


def arm_caches(exp: ExperimentConfig, inputs: Inputs, arm: ArmSpec
               ) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(train caches, held-out caches or None) of the arm's teachers, in its teachers' order:
    the run's --cache and --eval-cache lists. Raises ConfigError when a teacher the arm
    names has no cache in `inputs`, or only some of its teachers have a held-out cache."""
    caches, eval_caches = inputs.teacher_caches(), inputs.teacher_eval_caches()
    teachers = exp.arm_teachers(arm)
    missing = [t for t in teachers if t not in caches]
    if missing:
        raise ConfigError(f"arm {arm.name}: no cache for teacher(s) {', '.join(missing)} (the "
                          f"setup has {', '.join(caches)})")
    held = [t for t in teachers if t in eval_caches]
    if held and len(held) != len(teachers):
        raise ConfigError(f"arm {arm.name}: held-out caches for {', '.join(held)} only; give "
                          "one per teacher (setup.eval_caches) or none")
    return tuple(caches[t] for t in teachers), \
        (tuple(eval_caches[t] for t in teachers) if held else None)


def cache_options(caches: tuple[str, ...], eval_caches: tuple[str, ...] | None,
                  where: str) -> dict[str, Any]:
    """{"cache": ..., "eval_cache": ...} as TrainConfig declares them (one path, or a tuple of
    paths, one per teacher); no eval_cache without held-out caches. ConfigError when
    train-student takes one --cache and more are given."""
    from kdpipe.options import convert_value, flags
    from kdpipe.trainer.config import TrainConfig

    declared = {f.name: f for f in flags(TrainConfig)}
    values: dict[str, Any] = {}
    for name, paths in (("cache", caches), ("eval_cache", eval_caches)):
        if paths is None:
            continue
        try:  # a tuple field wraps a single path; a plain one takes no list
            values[name] = convert_value(declared[name], paths[0] if len(paths) == 1
                                         else list(paths), f"{where} --{name}")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {len(paths)} teachers, but train-student takes one "
                              f"--{name.replace('_', '-')} ({exc})") from exc
    return values


def plan_runs(exp: ExperimentConfig, inputs: Inputs, out: Path, device: str, progress: bool
              ) -> list[PlannedRun]:
    """One TrainConfig per arm × seed (curricula referenced by name become their paths;
    the arm's teachers become its --cache and --eval-cache lists, `arm_caches`)."""
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
        caches = cache_options(*arm_caches(exp, inputs, arm), f"arm {arm.name}")
        for seed in exp.seeds:
            opts = dict(options)
            name = opts.get("curriculum")
            spec = exp.curriculum(name) if isinstance(name, str) else None
            if spec is not None:  # the build on this arm's first teacher's cache
                opts["curriculum"] = str(curriculum_path(
                    out, spec.name, seed if spec.from_arm is not None else None,
                    _curriculum_teacher(exp, exp.arm_teachers(arm)[0])))
            cfg = TrainConfig.from_options(out=str(run_dir(out, arm.name, seed)), seed=seed,
                                           **caches, **opts).with_cache_defaults()
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


def check_teachers_aligned(exp: ExperimentConfig, inputs: Inputs) -> None:
    """Refuse, before anything trains, arms whose teachers' caches do not cover the same
    sequences (train-student's own check, `trainer.teachers.check_aligned`, on the train and
    the held-out caches). Each cache is indexed once; each (first, other) pair checked once.
    Raises ConfigError naming the arms, their teachers and the first difference."""
    from kdpipe.schemas.cache import open_cache
    from kdpipe.schemas.shard_reader import CacheIndex, build_index
    from kdpipe.trainer.teachers import check_aligned

    indexes: dict[str, CacheIndex] = {}

    def index(path: str) -> CacheIndex:
        if path not in indexes:
            indexes[path] = build_index(open_cache(path))
        return indexes[path]

    pairs: dict[tuple[str, str, str], list[str]] = {}  # (kind, first, other) -> arms
    for arm in exp.arms:
        teachers = exp.arm_teachers(arm)
        for kind, named in (("cache", inputs.teacher_caches()),
                            ("eval_cache", inputs.teacher_eval_caches())):
            if all(t in named for t in teachers):
                for other in teachers[1:]:
                    pairs.setdefault((kind, teachers[0], other), []).append(arm.name)
    problems = []
    for (kind, first, other), arms in pairs.items():
        named = inputs.teacher_caches() if kind == "cache" else inputs.teacher_eval_caches()
        label = "train" if kind == "cache" else "held-out"
        try:
            check_aligned(index(named[first]), index(named[other]),
                          (f"teacher {first}'s {label} cache {named[first]}",
                           f"teacher {other}'s {label} cache {named[other]}"))
        except ConfigError as exc:
            problems.append(f"arm{'s' if len(arms) > 1 else ''} {', '.join(arms)} (teachers "
                            f"{first}, {other}): {exc}")
    if problems:
        raise ConfigError("experiment cannot start: " + " | ".join(problems))


def build_curricula(exp: ExperimentConfig, inputs: Inputs, out: Path, clock: StageClock,
                    seeds: tuple[int, ...] | None, device: str, progress: bool) -> None:
    """Step 2 (seeds None: curricula without from_arm) or step 3 (per-seed curricula), each
    once per teacher whose cache it ranks (`ExperimentConfig.curriculum_teachers`)."""
    from kdpipe.curriculum.build import build_curriculum
    from kdpipe.curriculum.config import BuildCurriculumConfig

    caches = inputs.teacher_caches()
    for spec in exp.curricula:
        if (spec.from_arm is None) != (seeds is None):
            continue
        for teacher, seed in ((t, s) for t in exp.curriculum_teachers(spec)
                              for s in seeds or (None,)):
            options = {"device": device, "progress": progress, **spec.options}
            if spec.from_arm is not None:
                assert seed is not None
                source_run = run_dir(out, spec.from_arm, seed)
                if options.get("source") == "student":
                    options["student"] = str(RunLayout(source_run).final)
                else:
                    options["run"] = str(source_run)
            tag = _curriculum_teacher(exp, teacher)
            path = curriculum_path(out, spec.name, seed, tag)
            path.parent.mkdir(parents=True, exist_ok=True)
            label = f"curriculum {spec.name}" + ("" if tag is None else f"@{tag}") + \
                ("" if seed is None else f"/seed-{seed}")
            with clock.stage(label, done=path.is_file()):
                build_curriculum(BuildCurriculumConfig.from_options(
                    cache=caches[teacher], out=str(path), **options))
