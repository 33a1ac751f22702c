"""`ExperimentConfig`: a grid of arms × seeds over shared caches, read from YAML and checked.

    name: seed-question
    out: runs/seed-question            # --out overrides
    setup: {embedded: small}           # or {cache: PATH, eval_cache: PATH}; teachers below
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
    sweep:                             # families × student sizes, expanded into arms
      sizes: {xs: {hidden_size: 32, ...}, s: {hidden_size: 64, ...}}
      arms: {ce: {mode: ce}, kd: {}}  # arms ce-xs, ce-s, kd-xs, kd-s
      comparisons: [[kd, ce]]         # kd-xs − ce-xs and kd-s − ce-s
    correction: holm                   # multiplicity correction over `comparisons`

Teachers have names: the embedded setup's are `a` (and `b` with `second_teacher: half` or
`small`); an external setup names them as keys of `caches:` (`cache:` alone is teacher `a`).
An arm picks its teachers with `teachers: [a, b]` (default: the first teacher only), in the
order of its `teacher_weight` values; the runner turns them into the run's `--cache` and
`--eval-cache` lists. A named curriculum is built on the train cache of the first teacher of
each arm using it (a `source: snapshot` one `from_arm` on that arm's first teacher's cache).

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

from kdpipe.embedded.second_teacher import SECOND_TEACHERS
from kdpipe.experiments.stats import CORRECTIONS
from kdpipe.options import convert_value, did_you_mean, flags
from kdpipe.schemas.errors import ConfigError, choice_problems

# Options the runner sets for every run; an arm cannot (threads: `kdpipe experiment --threads`).
RUNNER_TRAIN_OPTIONS = ("cache", "out", "seed", "eval_cache", "resume", "overwrite", "threads")
RUNNER_CURRICULUM_OPTIONS = ("cache", "out", "overwrite", "threads")
TOP_LEVEL_KEYS = ("name", "description", "out", "setup", "seeds", "baseline", "comparisons",
                  "correction", "metric", "train", "curricula", "arms", "sweep")
SETUP_KEYS = ("embedded", "second_teacher", "cache", "eval_cache", "caches", "eval_caches")
EMBEDDED_TEACHERS = ("a", "b")  # names of the embedded setup's teachers
ARM_KEYS = ("teachers",)  # keys of an arm that are the runner's, not train-student options
SWEEP_KEYS = ("sizes", "arms", "comparisons")
SUMMARY_METRICS = ("eval_ce", "eval_ppl", "eval_top1_agreement", "eval_kd", "eval_loss",
                   "train_loss", "train_tokens_per_s", "wall_s", "tokens_seen")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Setup:
    """Where the caches come from: the embedded demo stages (a preset) or existing caches.

    `caches` / `eval_caches` are (teacher name, path) pairs; `cache` / `eval_cache` alone are
    teacher `a`'s."""

    embedded: str | None = None  # a `kdpipe demo` preset: corpus → tokenizer → teacher → caches
    cache: str | None = None
    eval_cache: str | None = None
    second_teacher: str | None = None  # embedded only: "half" or "small" (teacher b)
    caches: tuple[tuple[str, str], ...] = ()
    eval_caches: tuple[tuple[str, str], ...] = ()

    def teachers(self) -> tuple[str, ...]:
        """The teachers' names, first = the default teacher of every arm."""
        if self.embedded is not None:
            return EMBEDDED_TEACHERS[:2 if self.second_teacher else 1]
        if self.caches:
            return tuple(name for name, _ in self.caches)
        return EMBEDDED_TEACHERS[:1]

    def teacher_caches(self) -> dict[str, str]:
        """{teacher: train cache} of an external setup."""
        return dict(self.caches) if self.caches else \
            ({} if self.cache is None else {EMBEDDED_TEACHERS[0]: self.cache})

    def teacher_eval_caches(self) -> dict[str, str]:
        """{teacher: held-out cache} of an external setup ({} when none is given)."""
        return dict(self.eval_caches) if self.eval_caches else \
            ({} if self.eval_cache is None else {EMBEDDED_TEACHERS[0]: self.eval_cache})


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
    teachers: tuple[str, ...] = ()  # its teachers' names, in --cache order; () = the first
    family: str | None = None  # a sweep arm: its family (the arm under `sweep.arms`) ...
    size: str | None = None  # ... and its student size (a key of `sweep.sizes`)


@dataclass(frozen=True)
class Sweep:
    """Families × student sizes (`sweep:`), expanded into the arms FAMILY-SIZE."""

    sizes: tuple[str, ...]  # in the file's order
    families: tuple[str, ...]
    comparisons: tuple[tuple[str, str], ...] = ()  # family pairs, compared at every size

    @staticmethod
    def arm_name(family: str, size: str) -> str:
        return f"{family}-{size}"


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
    correction: str = "none"  # over the comparisons: none, holm, bonferroni
    sweep: Sweep | None = None

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.arms if a.name == name)

    def curriculum(self, name: str) -> CurriculumSpec | None:
        return next((c for c in self.curricula if c.name == name), None)

    def arm_options(self, arm: ArmSpec) -> dict[str, Any]:
        """The common options overridden by the arm's own."""
        return {**self.train, **arm.options}

    def arm_teachers(self, arm: ArmSpec) -> tuple[str, ...]:
        """The arm's teachers in --cache order (default: the setup's first teacher)."""
        return arm.teachers or self.setup.teachers()[:1]

    def curriculum_teachers(self, spec: CurriculumSpec) -> tuple[str, ...]:
        """The teachers on whose train caches `spec` is built, once each: the first teachers
        of the arms that use it, in arm order, since the trainer takes only a curriculum made
        for its first cache. A snapshot curriculum `from_arm` ranks that arm's snapshots, made
        on its first teacher's cache, so it is built there alone (`reference_problems` refuses
        arms with another first teacher); a curriculum no arm uses, on the setup's first."""
        names = [a.name for a in self.arms]
        if spec.from_arm in names and spec.options.get("source") == "snapshot":
            return self.arm_teachers(self.arm(spec.from_arm))[:1]
        users = [self.arm_teachers(a)[0] for a in self.arms
                 if self.arm_options(a).get("curriculum") == spec.name]
        return tuple(dict.fromkeys(users)) or self.setup.teachers()[:1]

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
    arms: list[ArmSpec] = []
    if raw_arms is None and data.get("sweep") is not None:
        raw_arms = {}  # a sweep alone is a grid of arms
    elif not isinstance(raw_arms, dict) or not raw_arms:
        problems.append("arms must map at least one arm name to train-student "
                        "options")
        raw_arms = {}
    for aname, options in raw_arms.items():
        arms.append(_arm(_check_name("arm", aname, problems), options, f"arms.{aname}",
                         curricula, problems))
    sweep = _sweep(data.get("sweep"), curricula, arms, problems)
    metric = str(data.get("metric", "eval_ce"))
    problems += choice_problems("metric", metric, SUMMARY_METRICS)
    baseline = data.get("baseline")
    correction = str(data.get("correction", "none"))
    problems += choice_problems("correction", correction, CORRECTIONS)
    exp = ExperimentConfig(
        name=name, out=str(out or data.get("out") or Path("runs") / name), setup=setup,
        seeds=seeds, arms=tuple(arms), curricula=tuple(curricula), train=train,
        baseline=None if baseline is None else str(baseline),
        comparisons=_comparisons(data.get("comparisons"), "comparisons", problems)
        + _sweep_comparisons(sweep), metric=metric,
        description=str(data.get("description", "")).strip(),
        correction=correction, sweep=sweep)
    problems += reference_problems(exp)
    if problems:
        raise ConfigError(f"invalid experiment {source}: " + "; ".join(problems))
    return exp


def _arm(name: str, options: Any, where: str, curricula: list[CurriculumSpec],
         problems: list[str], family: str | None = None, size: str | None = None) -> ArmSpec:
    """One arm's train-student options and teachers; an inline curriculum mapping becomes
    a curriculum named after the arm (appended to `curricula`)."""
    from kdpipe.curriculum.config import BuildCurriculumConfig
    from kdpipe.trainer.config import TrainConfig

    inline = options.get("curriculum") if isinstance(options, dict) else None
    if isinstance(inline, dict):  # build-curriculum options of this arm alone
        if any(c.name == name for c in curricula):
            problems.append(f"{where}.curriculum: an inline curriculum is named after its arm, "
                            f"and curricula.{name} exists")
        opts = convert_options(BuildCurriculumConfig, inline, f"{where}.curriculum",
                               RUNNER_CURRICULUM_OPTIONS, extra=("from_arm",),
                               problems=problems)
        from_arm = opts.pop("from_arm", None)
        curricula.append(CurriculumSpec(name, opts, None if from_arm is None else str(from_arm)))
        options = {**options, "curriculum": name}
    converted = convert_options(TrainConfig, options, where, RUNNER_TRAIN_OPTIONS,
                                extra=ARM_KEYS, problems=problems)
    teachers = converted.pop("teachers", None)
    if isinstance(teachers, list) and not teachers:
        problems.append(f"{where}.teachers: at least one teacher is needed, e.g. [a] (leave "
                        "teachers out for the setup's first teacher)")
    elif teachers is not None and not (isinstance(teachers, list)
                                       and all(isinstance(t, str) for t in teachers)):
        problems.append(f"{where}.teachers: expected a list of teacher names, e.g. [a, b]")
        teachers = None
    return ArmSpec(name, converted, tuple(teachers or ()), family, size)


def _sweep(raw: Any, curricula: list[CurriculumSpec], arms: list[ArmSpec],
           problems: list[str]) -> Sweep | None:
    """`sweep: {sizes: {SIZE: student_config}, arms: {FAMILY: options}, comparisons: ...}`:
    appends the arm FAMILY-SIZE for every family and size (the size sets student_config)."""
    if raw is None:
        return None
    shape = ("sweep must be {sizes: {NAME: student_config, ...}, arms: {FAMILY: options, ...}, "
             "comparisons: [[FAMILY, FAMILY], ...]}")
    if not isinstance(raw, dict):
        problems.append(shape)
        return None
    problems += [f"sweep.{k}: unknown key{did_you_mean(k, SWEEP_KEYS)} ({shape})"
                 for k in raw if k not in SWEEP_KEYS]
    sizes, families = raw.get("sizes"), raw.get("arms")
    if not isinstance(sizes, dict) or len(sizes) < 2:
        problems.append("sweep.sizes must map at least two size names to student configs (an "
                        "inline mapping or a JSON file)")
        sizes = {}
    if not isinstance(families, dict) or not families:
        problems.append("sweep.arms must map at least one family name to train-student options")
        families = {}
    for size, student in sizes.items():
        _check_name("sweep size", size, problems)
        if not isinstance(student, (dict, str)):
            problems.append(f"sweep.sizes.{size}: expected a student config (an inline mapping "
                            "or a JSON file)")
    existing = {a.name for a in arms}
    for family, options in families.items():
        _check_name("sweep family", family, problems)
        if options is not None and not isinstance(options, dict):
            problems.append(f"sweep.arms.{family}: expected a mapping of option names to values")
            continue
        if isinstance(options, dict) and {"student_config", "student-config",
                                          "student"} & set(options):
            problems.append(f"sweep.arms.{family}: the student is the size's (sweep.sizes); "
                            "drop student/student_config")
            continue
        for size, student in sizes.items():
            name = Sweep.arm_name(str(family), str(size))
            if name in existing:
                problems.append(f"sweep: arm {name} (family {family}, size {size}) is also "
                                "under arms; rename one")
            existing.add(name)
            arms.append(_arm(name, {**(options or {}), "student_config": student},
                             f"sweep.arms.{family}", curricula, problems, str(family),
                             str(size)))
    comparisons = []
    for a, b in _comparisons(raw.get("comparisons"), "sweep.comparisons", problems):
        unknown = [n for n in (a, b) if n not in families]
        if unknown:  # reported here once, not again as a missing arm at every size
            problems.append(f"sweep.comparisons [{a}, {b}]: {', '.join(map(repr, unknown))} is "
                            f"not a family under sweep.arms ({', '.join(map(str, families))})")
        else:
            comparisons.append((a, b))
    return Sweep(tuple(map(str, sizes)), tuple(map(str, families)), tuple(comparisons))


def _sweep_comparisons(sweep: Sweep | None) -> tuple[tuple[str, str], ...]:
    """Each family pair of the sweep, at every size (A-SIZE − B-SIZE)."""
    if sweep is None:
        return ()
    return tuple((Sweep.arm_name(a, size), Sweep.arm_name(b, size))
                 for a, b in sweep.comparisons for size in sweep.sizes)


def _setup(raw: Any, problems: list[str]) -> Setup:
    """`setup: {embedded: PRESET[, second_teacher: half|small]}`, or external caches:
    `{cache: PATH, eval_cache: PATH}` (teacher a) or `{caches: {NAME: PATH, ...},
    eval_caches: {NAME: PATH, ...}}`."""
    shape = ("setup must be {embedded: PRESET, second_teacher: half|small} or {cache: PATH, "
             "eval_cache: PATH} or {caches: {NAME: PATH, ...}, eval_caches: {NAME: PATH, ...}}")
    if not isinstance(raw, dict):
        problems.append(shape)
        return Setup()
    unknown = [k for k in raw if k not in SETUP_KEYS]
    if unknown:
        problems += [f"setup.{k}: unknown key{did_you_mean(k, SETUP_KEYS)} ({shape})"
                     for k in unknown]
        return Setup()
    scalars = {k: None if raw.get(k) is None else str(raw[k])
               for k in ("embedded", "second_teacher", "cache", "eval_cache")}
    caches = _named_caches(raw.get("caches"), "setup.caches", problems)
    eval_caches = _named_caches(raw.get("eval_caches"), "setup.eval_caches", problems)
    setup = Setup(**scalars, caches=caches, eval_caches=eval_caches)
    given = [k for k in ("embedded", "cache", "caches") if raw.get(k) is not None]
    if len(given) != 1:
        problems.append("setup needs exactly one of embedded (a demo preset), cache (a cache "
                        "folder) and caches (teacher names to cache folders)")
    if setup.embedded is not None and (setup.eval_cache or eval_caches):
        problems.append("setup.eval_cache comes with setup.cache; the embedded setup makes its "
                        "own held-out cache")
    if setup.second_teacher is not None:
        if setup.embedded is None:
            problems.append("setup.second_teacher comes with setup.embedded; name external "
                            "teachers under setup.caches")
        problems += choice_problems("setup.second_teacher", setup.second_teacher,
                                    SECOND_TEACHERS)
    if eval_caches and setup.cache is not None:
        problems.append("setup.eval_caches comes with setup.caches (setup.cache takes "
                        "setup.eval_cache)")
    if setup.eval_cache is not None and caches:
        problems.append("setup.eval_cache comes with setup.cache (setup.caches takes "
                        "setup.eval_caches, one per teacher)")
    if caches and eval_caches and {n for n, _ in caches} != {n for n, _ in eval_caches}:
        problems.append(f"setup.eval_caches names teachers {', '.join(n for n, _ in eval_caches)}"
                        f" but setup.caches {', '.join(n for n, _ in caches)}: give one held-out "
                        "cache per teacher (matched by name), or none")
    return setup


def _named_caches(raw: Any, where: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """{NAME: PATH, ...} as (name, path) pairs."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw or \
            not all(isinstance(v, str) and v for v in raw.values()):
        problems.append(f"{where} must map teacher names to cache folders, e.g. {{a: PATH, "
                        "b: PATH}")
        return ()
    return tuple((_check_name("teacher", name, problems), path) for name, path in raw.items())


def _seeds(raw: Any, problems: list[str]) -> tuple[int, ...]:
    """`seeds: [0, 1, 2]`, or a count."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = list(range(raw))
    if not isinstance(raw, list) or not raw or len(set(raw)) != len(raw) or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        problems.append("seeds must be a list of distinct integers (or a count)")
        return ()
    return tuple(raw)


def _comparisons(raw: Any, where: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """`comparisons: [[A, B], ...]`: pairs of arm names (checked against the arms later)."""
    if raw is None:
        return ()
    pairs = []
    if not isinstance(raw, list):
        problems.append(f"{where} must be a list of [arm, arm] pairs")
        return ()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(a, str) for a in item) and item[0] != item[1]):
            problems.append(f"{where}: {item!r} is not a pair of two different arm names "
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
    problems += teacher_problems(exp)
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
        if used is not None and used.from_arm in arm_names and \
                used.options.get("source") == "snapshot":
            mine, theirs = exp.arm_teachers(arm)[0], exp.arm_teachers(exp.arm(used.from_arm))[0]
            if mine != theirs:
                where = f"sweep.arms.{arm.family}" if arm.family is not None \
                    else f"arms.{arm.name}"
                problems.append(f"{where}.curriculum {used.name}: ranks the snapshots of arm "
                                f"{used.from_arm}, made on teacher {theirs}'s cache, but this "
                                f"arm's first teacher is {mine}: give both arms the same first "
                                "teacher (a curriculum follows the first teacher's cache)")
    return list(dict.fromkeys(problems))  # a sweep family's problem once, not once per size


def teacher_problems(exp: ExperimentConfig) -> list[str]:
    """Arms naming teachers the setup lacks, or as many `teacher_weight` values as teachers
    not: one line each."""
    problems = []
    known = exp.setup.teachers()
    for arm in exp.arms:
        where = f"sweep.arms.{arm.family}" if arm.family is not None else f"arms.{arm.name}"
        unknown = [t for t in arm.teachers if t not in known]
        if unknown:
            problems.append(f"{where}.teachers: {', '.join(map(repr, unknown))} is not a teacher "
                            f"of the setup ({', '.join(known)})")
        if len(set(arm.teachers)) != len(arm.teachers):
            problems.append(f"{where}.teachers: a teacher is named twice")
        weights = exp.arm_options(arm).get("teacher_weight")
        teachers = exp.arm_teachers(arm)
        if weights and len(weights) != len(teachers):
            problems.append(f"{where}.teacher_weight: {len(weights)} weight(s) for "
                            f"{len(teachers)} teacher(s) ({', '.join(teachers)}): give one per "
                            "teacher, in the order of teachers")
    return list(dict.fromkeys(problems))  # a sweep family's problem once, not once per size


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
