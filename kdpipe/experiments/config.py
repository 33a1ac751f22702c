"""`ExperimentConfig`: a grid of arms × seeds over one cache, read from YAML and checked at once.

    name: seed-question
    out: runs/seed-question            # --out overrides
    setup: {embedded: small}           # or {cache: PATH, eval_cache: PATH}
    seeds: [0, 1, 2]
    baseline: kd                       # differences are arm − baseline
    metric: eval_ce                    # the headline metric of the summary
    train: {epochs: 2, batch_size: 16} # train-student options shared by every arm
    curricula:                         # build-curriculum options, by name
      teacher-nll: {source: teacher, metric: nll}
      ce-snapshot: {source: snapshot, from_arm: ce}   # per seed, from that seed's `ce` run
    arms:                              # train-student options of each arm, over `train`
      ce: {mode: ce}
      kd: {}
      kd-cl: {curriculum: teacher-nll}

Option names are the flags' names (`kd-weight` or `kd_weight`); values are checked and
converted to each option's type. `curriculum:` in an arm names an entry of `curricula`, is a
file path, or is a mapping of build-curriculum options for that arm alone (named after the
arm). A curriculum with `from_arm` is built once per seed from the run of that arm with the
same seed (`--run` for `source: snapshot`, `--student RUN/final` for `source: student`); those
arms run first. `student_config` may be a JSON file path or an inline mapping. Relative paths
are relative to the working directory, as for any flag.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.options import convert_value, did_you_mean, flags
from kdpipe.schemas.errors import ConfigError, choice_problems

# Options the runner sets for every run; an arm cannot (threads: `kdpipe experiment --threads`).
RUNNER_TRAIN_OPTIONS = ("cache", "out", "seed", "eval_cache", "resume", "overwrite", "threads")
RUNNER_CURRICULUM_OPTIONS = ("cache", "out", "overwrite", "threads")
TOP_LEVEL_KEYS = ("name", "description", "out", "setup", "seeds", "baseline", "comparisons",
                  "metric", "train", "curricula", "arms")
SETUP_KEYS = ("embedded", "cache", "eval_cache")
SUMMARY_METRICS = ("eval_ce", "eval_ppl", "eval_top1_agreement", "eval_kd", "eval_loss",
                   "train_loss", "train_tokens_per_s", "wall_s", "tokens_seen")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Setup:
    """Where the cache comes from: the embedded demo stages (a preset) or existing caches."""

    embedded: str | None = None  # a `kdpipe demo` preset: corpus → tokenizer → teacher → caches
    cache: str | None = None
    eval_cache: str | None = None


@dataclass(frozen=True)
class CurriculumSpec:
    """A named `build-curriculum` call; with `from_arm`, one per seed from that arm's run."""

    name: str
    options: dict[str, Any]  # BuildCurriculumConfig fields (not cache/out)
    from_arm: str | None = None


@dataclass(frozen=True)
class ArmSpec:
    """A named set of train-student options (over the experiment's common `train`)."""

    name: str
    options: dict[str, Any]  # TrainConfig fields (not cache/out/seed/eval_cache)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything `kdpipe experiment` needs; `load_experiment` builds and checks it."""

    name: str
    out: str
    setup: Setup
    seeds: tuple[int, ...]
    arms: tuple[ArmSpec, ...]
    curricula: tuple[CurriculumSpec, ...] = ()
    train: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    comparisons: tuple[tuple[str, str], ...] = ()  # (A, B): also report A − B, paired by seed
    metric: str = "eval_ce"
    description: str = ""

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.arms if a.name == name)

    def curriculum(self, name: str) -> CurriculumSpec | None:
        return next((c for c in self.curricula if c.name == name), None)

    def arm_options(self, arm: ArmSpec) -> dict[str, Any]:
        """The common options overridden by the arm's own."""
        return {**self.train, **arm.options}

    def dependencies(self) -> set[str]:
        """Arms whose runs per-seed curricula are built from (they run first)."""
        return {c.from_arm for c in self.curricula if c.from_arm is not None}

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key(name: Any) -> str:
    return str(name).replace("-", "_")


def convert_options(cls: type, raw: Any, where: str, reserved: tuple[str, ...],
                    extra: tuple[str, ...] = (), problems: list[str] | None = None
                    ) -> dict[str, Any]:
    """Check option names against `cls`'s options (flat flag names, as on the command line)
    and convert values; problems are collected."""
    problems = problems if problems is not None else []
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of option names to values")
        return {}
    known = {flag.name: flag for flag in flags(cls)}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = _key(name)
        if key in reserved:
            problems.append(f"{where}.{name}: set by the experiment runner, not per arm")
        elif key in extra:
            out[key] = value
        elif key not in known:
            problems.append(f"{where}.{name}: unknown option{did_you_mean(name, [*known, *extra])}")
        elif key == "student_config" and isinstance(value, dict):
            out[key] = dict(value)  # an inline model config: written to a file by the runner
        else:
            try:
                out[key] = convert_value(known[key], value, f"{where}.{name}")
            except ConfigError as exc:
                problems.append(str(exc))
    return out


def _check_name(kind: str, name: Any, problems: list[str]) -> str:
    text = str(name)
    if not _NAME.match(text):
        problems.append(f"{kind} name {text!r}: use letters, digits, '-', '_' or '.'")
    return text


def parse_experiment(data: Any, source: str, out: str | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from parsed YAML; one ConfigError lists every problem."""
    from kdpipe.curriculum.config import BuildCurriculumConfig
    from kdpipe.trainer.config import TrainConfig

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a YAML mapping (name, setup, seeds, arms, ...)")
    problems: list[str] = [f"unknown key {k!r}{did_you_mean(k, TOP_LEVEL_KEYS)} (known: "
                           f"{', '.join(TOP_LEVEL_KEYS)})" for k in data if k not in TOP_LEVEL_KEYS]
    name = _check_name("experiment", data.get("name", Path(source).stem), problems)
    setup = _setup(data.get("setup") or {}, problems)
    seeds = _seeds(data.get("seeds", [0]), problems)
    train = convert_options(TrainConfig, data.get("train"), "train", RUNNER_TRAIN_OPTIONS,
                            problems=problems)
    raw_curricula = data.get("curricula") or {}
    curricula = []
    if not isinstance(raw_curricula, dict):
        problems.append("curricula must map names to build-curriculum options")
        raw_curricula = {}
    for cname, options in raw_curricula.items():
        cname = _check_name("curriculum", cname, problems)
        opts = convert_options(BuildCurriculumConfig, options, f"curricula.{cname}",
                               RUNNER_CURRICULUM_OPTIONS, extra=("from_arm",),
                               problems=problems)
        from_arm = opts.pop("from_arm", None)
        curricula.append(CurriculumSpec(cname, opts, None if from_arm is None else str(from_arm)))
    raw_arms = data.get("arms")
    arms = []
    if not isinstance(raw_arms, dict) or not raw_arms:
        problems.append("arms must map at least one arm name to train-student "
                        "options")
        raw_arms = {}
    for aname, options in raw_arms.items():
        aname = _check_name("arm", aname, problems)
        inline = options.get("curriculum") if isinstance(options, dict) else None
        if isinstance(inline, dict):  # build-curriculum options of this arm alone
            if any(c.name == aname for c in curricula):
                problems.append(f"arms.{aname}.curriculum: an inline curriculum is named after "
                                f"its arm, and curricula.{aname} exists")
            opts = convert_options(BuildCurriculumConfig, inline, f"arms.{aname}.curriculum",
                                   RUNNER_CURRICULUM_OPTIONS, extra=("from_arm",),
                                   problems=problems)
            from_arm = opts.pop("from_arm", None)
            curricula.append(CurriculumSpec(aname, opts,
                                            None if from_arm is None else str(from_arm)))
            options = {**options, "curriculum": aname}
        arms.append(ArmSpec(aname, convert_options(TrainConfig, options, f"arms.{aname}",
                                                   RUNNER_TRAIN_OPTIONS, problems=problems)))
    metric = str(data.get("metric", "eval_ce"))
    problems += choice_problems("metric", metric, SUMMARY_METRICS)
    baseline = data.get("baseline")
    exp = ExperimentConfig(
        name=name, out=str(out or data.get("out") or Path("runs") / name), setup=setup,
        seeds=seeds, arms=tuple(arms), curricula=tuple(curricula), train=train,
        baseline=None if baseline is None else str(baseline),
        comparisons=_comparisons(data.get("comparisons"), problems), metric=metric,
        description=str(data.get("description", "")).strip())
    problems += reference_problems(exp)
    if problems:
        raise ConfigError(f"invalid experiment {source}: " + "; ".join(problems))
    return exp


def _setup(raw: Any, problems: list[str]) -> Setup:
    """`setup: {embedded: PRESET}` or `{cache: PATH, eval_cache: PATH}`."""
    shape = "setup must be {embedded: PRESET} or {cache: PATH, eval_cache: PATH}"
    if not isinstance(raw, dict):
        problems.append(shape)
        return Setup()
    unknown = [k for k in raw if k not in SETUP_KEYS]
    if unknown:
        problems += [f"setup.{k}: unknown key{did_you_mean(k, SETUP_KEYS)} ({shape})"
                     for k in unknown]
        return Setup()
    setup = Setup(**{k: None if v is None else str(v) for k, v in raw.items()})
    if (setup.embedded is None) == (setup.cache is None):
        problems.append("setup needs exactly one of embedded (a demo preset) and cache (a "
                        "cache folder)")
    if setup.embedded is not None and setup.eval_cache is not None:
        problems.append("setup.eval_cache comes with setup.cache; the embedded setup makes its "
                        "own held-out cache")
    return setup


def _seeds(raw: Any, problems: list[str]) -> tuple[int, ...]:
    """`seeds: [0, 1, 2]`, or a count."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = list(range(raw))
    if not isinstance(raw, list) or not raw or len(set(raw)) != len(raw) or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        problems.append("seeds must be a list of distinct integers (or a count)")
        return ()
    return tuple(raw)


def _comparisons(raw: Any, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """`comparisons: [[A, B], ...]`: pairs of arm names (checked against the arms later)."""
    if raw is None:
        return ()
    pairs = []
    if not isinstance(raw, list):
        problems.append("comparisons must be a list of [arm, arm] pairs")
        return ()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(a, str) for a in item) and item[0] != item[1]):
            problems.append(f"comparisons: {item!r} is not a pair of two different arm names "
                            "([A, B] reports A − B)")
            continue
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def reference_problems(exp: ExperimentConfig) -> list[str]:
    """Names that point nowhere: baseline, comparisons, from_arm, curricula used by arms."""
    problems = []
    arm_names = [a.name for a in exp.arms]
    if exp.baseline is not None and exp.baseline not in arm_names:
        problems.append(f"baseline {exp.baseline!r} is not an arm ({', '.join(arm_names)})")
    for a, b in exp.comparisons:
        unknown = [n for n in (a, b) if n not in arm_names]
        if unknown:
            problems.append(f"comparisons [{a}, {b}]: {', '.join(map(repr, unknown))} is not an "
                            f"arm ({', '.join(arm_names)})")
    dependencies = exp.dependencies()
    for spec in exp.curricula:
        if spec.from_arm is None:
            continue
        if spec.from_arm not in arm_names:
            problems.append(f"curricula.{spec.name}.from_arm {spec.from_arm!r} is not an arm")
        source = spec.options.get("source", "teacher")
        if source not in ("snapshot", "student"):
            problems.append(f"curricula.{spec.name}: from_arm needs source snapshot or student")
        if {"run", "student"} & set(spec.options):
            problems.append(f"curricula.{spec.name}: from_arm sets run/student itself")
    for arm in exp.arms:
        curriculum = exp.arm_options(arm).get("curriculum")
        used = exp.curriculum(curriculum) if isinstance(curriculum, str) else None
        if isinstance(curriculum, str) and used is None and not Path(curriculum).is_file():
            problems.append(f"arms.{arm.name}.curriculum {curriculum!r} is neither a name under "
                            "curricula nor a file")
        if used is not None and used.from_arm is not None and arm.name in dependencies:
            problems.append(f"arms.{arm.name}: an arm other curricula are built from cannot "
                            "itself use a per-seed curriculum")
        if used is not None and used.from_arm == arm.name:
            problems.append(f"arms.{arm.name}: uses a curriculum built from its own runs")
    return problems


def load_experiment(path: str | Path, out: str | None = None) -> ExperimentConfig:
    """Read and check an experiment YAML file (`out` overrides its `out:`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_experiment(data, str(path), out)
