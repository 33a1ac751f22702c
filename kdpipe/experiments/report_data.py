"""What `kdpipe report` reads from an experiment folder, as plain arrays (no plotting here).

* eval curves: the `"split": "eval"` records of each run's metrics.jsonl;
* curricula: every curriculum file under OUT/curricula (their difficulty scores);
* λ under selective reliance: the per-sample `kd_weight` lists of each run's order.jsonl;
* the capacity-gap sweep: per family and student size, the metric's interval over seeds
  against the student's parameter count (from results.json, else counted from each run's
  `final/`), and each family comparison's paired interval at every size;
* curriculum pools: m(t), the samples available at step t, from the run's own pacing
  settings (`trainer.pacing`, the formula the sampler uses), and, for a fixed curriculum file
  in easy → hard order, the hardest difficulty percentile actually drawn at each step (from
  order.jsonl): it must never exceed the pool, which is the check that a run followed its
  curriculum.

A plain `train-student` run folder is read as an experiment of one arm and one seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.experiments.plan import CURRICULA_DIR, PlannedRun
from kdpipe.experiments.runner import (
    EXPERIMENT_NAME,
    RESULTS_NAME,
    run_record,
    student_parameters,
)
from kdpipe.experiments.summary import difference_entry, values_by_seed
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout


@dataclass
class ExperimentView:
    """An experiment folder as the report needs it."""

    root: Path
    name: str
    arms: list[str]
    seeds: list[int]
    baseline: str | None
    metric: str
    records: list[dict[str, Any]]  # one per run (results.json)
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""
    command: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    correction: str = "none"
    sweep: dict[str, Any] | None = None  # experiment.json's sweep: sizes, families, comparisons
    arm_sizes: dict[str, tuple[str, str]] = field(default_factory=dict)  # arm -> (family, size)
    arm_teachers: dict[str, list[str]] = field(default_factory=dict)  # arm -> its teachers

    def label(self, arm: str) -> str:
        return self.labels.get(arm, arm)

    def run_dirs(self, arm: str) -> list[tuple[int, Path]]:
        return [(int(r["seed"]), Path(r["run_dir"])) for r in self.records
                if r["arm"] == arm and Path(r["run_dir"]).is_dir()]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def load_view(root: Path) -> ExperimentView:
    """Read OUT/experiment.json + results.json, or a single train-student run folder."""
    if (root / EXPERIMENT_NAME).is_file():
        exp = json.loads((root / EXPERIMENT_NAME).read_text(encoding="utf-8"))
        records = json.loads((root / RESULTS_NAME).read_text(encoding="utf-8")) \
            if (root / RESULTS_NAME).is_file() else []
        return ExperimentView(root=root, name=exp["name"], arms=[a["name"] for a in exp["arms"]],
                              seeds=list(exp["seeds"]), baseline=exp.get("baseline"),
                              metric=exp.get("metric", "eval_ce"), records=records,
                              labels=exp.get("labels") or {},
                              description=exp.get("description", ""),
                              command=exp.get("command", ""), inputs=exp.get("inputs") or {},
                              comparisons=[(a, b) for a, b in exp.get("comparisons") or []],
                              correction=exp.get("correction", "none"), sweep=exp.get("sweep"),
                              arm_sizes={a["name"]: (a["family"], a["size"]) for a in exp["arms"]
                                         if a.get("family") is not None},
                              arm_teachers=_arm_teachers(exp))
    if RunLayout(root).config.is_file():  # one train-student run
        from kdpipe.trainer.config import read_config

        cfg = read_config(root)
        final_path = RunLayout(root).final_metrics
        final = json.loads(final_path.read_text(encoding="utf-8")) if final_path.is_file() \
            else None
        record = run_record(PlannedRun(root.name, cfg.seed, cfg),
                            "ran" if final else "unfinished", final, None, None)
        record["run_dir"] = str(root)
        return ExperimentView(root=root, name=root.name, arms=[root.name], seeds=[cfg.seed],
                              baseline=None, metric="eval_ce", records=[record],
                              inputs={"cache": ", ".join(cfg.cache),
                                      "eval_cache": ", ".join(cfg.eval_cache) or None})
    raise ConfigError(f"{root}: neither an experiment folder ({EXPERIMENT_NAME}; run `kdpipe "
                      "experiment` or `kdpipe demo`) nor a train-student run folder")


def _arm_teachers(exp: dict[str, Any]) -> dict[str, list[str]]:
    """{arm: its teachers} from experiment.json; an arm without `teachers` has the setup's
    first (the first key of `setup.caches`, else `a`)."""
    caches = (exp.get("setup") or {}).get("caches") or [["a", ""]]
    return {a["name"]: list(a.get("teachers") or [caches[0][0]]) for a in exp["arms"]}


def eval_curves(view: ExperimentView, key: str = "ce"
                ) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """{arm: {seed: (steps, values)}} of the periodic and final held-out evaluations."""
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for arm in view.arms:
        for seed, folder in view.run_dirs(arm):
            points = {int(r["step"]): float(r[key]) for r in _jsonl(RunLayout(folder).metrics)
                      if r.get("split") == "eval" and key in r}
            if points:
                steps = np.array(sorted(points))
                curves.setdefault(arm, {})[seed] = (steps, np.array([points[s] for s in steps]))
    return curves


def curve_band(per_seed: dict[int, tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over the seeds at the steps every seed evaluated."""
    common = None
    for steps, _ in per_seed.values():
        common = set(steps.tolist()) if common is None else common & set(steps.tolist())
    steps = np.array(sorted(common or ()))
    if steps.size == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    stack = np.stack([values[np.searchsorted(s, steps)] for s, values in per_seed.values()])
    return steps, stack.mean(0), stack.min(0), stack.max(0)


@dataclass
class SweepPoint:
    """One student size of a capacity-gap line: its parameter count and an interval dict
    (`stats.Interval.as_dict`: estimate, low, high, n, ...)."""

    size: str
    parameters: float  # weights of the student (NaN when no run of the size finished)
    interval: dict[str, Any]


def size_parameters(view: ExperimentView) -> dict[str, float]:
    """{size: student weights}, from the runs' records (or their `final/` folders)."""
    found: dict[str, float] = {}
    for r in view.records:
        arm = view.arm_sizes.get(r["arm"])
        if arm is None or arm[1] in found:
            continue
        count = r.get("student_parameters")
        if count is None and Path(r["run_dir"]).is_dir():
            count = student_parameters(Path(r["run_dir"]))
        if count is not None:
            found[arm[1]] = float(count)
    return found


def capacity_gap(view: ExperimentView, metric: str
                 ) -> tuple[dict[str, list[SweepPoint]], dict[str, list[SweepPoint]]]:
    """({family: points}, {"A − B": points}) of the sweep, sizes in the file's order: each
    family's mean interval over seeds, and each of `sweep.comparisons`' paired difference
    (`stats.difference_interval`) at every size. Empty without a sweep."""
    from kdpipe.experiments.config import Sweep
    from kdpipe.experiments.stats import mean_interval

    if not view.sweep:
        return {}, {}
    params = size_parameters(view)
    sizes = list(view.sweep["sizes"])
    lines: dict[str, list[SweepPoint]] = {}
    for family in view.sweep["families"]:
        for size in sizes:
            values = values_by_seed(view.records, Sweep.arm_name(family, size), metric)
            if values:
                lines.setdefault(family, []).append(SweepPoint(
                    size, params.get(size, math.nan),
                    mean_interval(list(values.values())).as_dict()))
    differences: dict[str, list[SweepPoint]] = {}
    for a, b in view.sweep.get("comparisons") or []:
        for size in sizes:
            mine = values_by_seed(view.records, Sweep.arm_name(a, size), metric)
            theirs = values_by_seed(view.records, Sweep.arm_name(b, size), metric)
            if mine and theirs:
                differences.setdefault(f"{a} − {b}", []).append(SweepPoint(
                    size, params.get(size, math.nan), difference_entry(mine, theirs)))
    return lines, differences


def curricula(view: ExperimentView) -> dict[str, Any]:
    """{label: Curriculum} of every curriculum file the experiment built."""
    from kdpipe.schemas.curriculum import read_curriculum

    folder = view.root / CURRICULA_DIR
    found = {}
    for path in sorted(folder.rglob("*.parquet")) if folder.is_dir() else []:
        found[path.relative_to(folder).with_suffix("").as_posix()] = read_curriculum(path)
    return found


def logged_lambdas(view: ExperimentView) -> dict[str, dict[str, np.ndarray]]:
    """{arm: {"values": all logged λ, "step_mean": mean λ per step (steps 1..T)}}."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for arm in view.arms:
        values, per_step = [], []
        for _seed, folder in view.run_dirs(arm):
            steps: dict[int, float] = {}
            for record in _jsonl(RunLayout(folder).order):
                if "kd_weight" in record:
                    values.extend(record["kd_weight"])
                    steps[int(record["step"])] = float(np.mean(record["kd_weight"]))
            if steps:
                per_step.append(np.array([steps[s] for s in sorted(steps)]))
        if values:
            length = min(len(p) for p in per_step)
            found[arm] = {"values": np.asarray(values, dtype=np.float64),
                          "step_mean": np.mean([p[:length] for p in per_step], axis=0)}
    return found


@dataclass
class PoolTrace:
    """Pool share m(t)/n per step, and the hardest drawn percentile when it can be checked."""

    pacing: str
    order: str
    steps: np.ndarray  # (T,) 1-based optimizer steps
    share: np.ndarray  # (T,) m(t) / n
    drawn_max: np.ndarray | None  # (T,) highest difficulty percentile drawn, or None
    violations: int = 0  # steps whose drawn samples lie outside the pool


def pool_traces(view: ExperimentView) -> dict[str, PoolTrace]:
    """One trace per curriculum arm (from its first seed's run)."""
    from kdpipe.trainer.config import read_config

    traces = {}
    for arm in view.arms:
        runs = view.run_dirs(arm)
        if not runs:
            continue
        folder = runs[0][1]
        if not RunLayout(folder).config.is_file():
            continue
        cfg = read_config(folder)
        cl = cfg.curriculum
        if not cl.active:
            continue
        trace = _pool_trace(cfg, cl, folder)
        if trace is not None:
            traces[arm] = trace
    return traces


def _pool_trace(cfg: Any, cl: Any, folder: Path) -> PoolTrace | None:
    from kdpipe.schemas.cache import open_cache
    from kdpipe.schemas.curriculum import read_curriculum
    from kdpipe.schemas.shard import SAMPLE_ID
    from kdpipe.trainer.curriculum_config import DEFAULT_BUCKETS
    from kdpipe.trainer.curriculum_sampler import Ranking
    from kdpipe.trainer.sampler import holdout_mask

    if not Path(cfg.cache[0]).is_dir():  # the curriculum follows the first cache
        return None
    ids = open_cache(cfg.cache[0]).read_column(SAMPLE_ID).to_numpy().astype(np.int64)
    train_ids = np.sort(ids[~holdout_mask(ids, cfg.eval_fraction)])
    n = int(train_ids.size)
    order = _jsonl(RunLayout(folder).order)
    if not order or n == 0:
        return None
    total = int(order[-1]["step"])
    curriculum = read_curriculum(cl.file) if cl.file and Path(cl.file).is_file() else None
    buckets = curriculum.info.num_buckets if curriculum is not None else DEFAULT_BUCKETS
    pacing = cl.pacing_for(buckets)
    per_step = cfg.batch_size * cfg.grad_accum
    steps = np.arange(1, total + 1)
    share = np.array([pacing.pool_size(t - 1, total, n, per_step) / n for t in steps])
    drawn = None
    violations = 0
    if curriculum is not None and cl.source == "file" and cl.order == "curriculum":
        where = np.searchsorted(curriculum.sample_ids, train_ids)
        ranking = Ranking.from_scores(train_ids, curriculum.score[where])
        drawn = np.full(total, math.nan)
        for record in order:
            t = int(record["step"])
            if 1 <= t <= total:
                drawn[t - 1] = float(ranking.percentiles(np.asarray(record["sample_ids"])).max())
        if pacing.name != "none":
            # The pool is the m easiest samples: percentile of the m-th is (m - 1) / (n - 1).
            limit = (np.round(share * n) - 1) / max(n - 1, 1)
            violations = int(np.sum(drawn > limit + 1e-9))
    return PoolTrace(pacing.name, cl.order, steps, share, drawn, violations)
