"""`kdpipe experiment`: every arm × seed of an `ExperimentConfig`, over one shared cache.

Order of work, each step skipped when its output already exists (so a re-run resumes):

1. setup: the embedded demo stages (`setup: embedded`) or the given caches;
2. curricula that need no run (teacher, length, a fixed student checkpoint);
3. runs of the arms that per-seed curricula are built from (`from_arm`), then those curricula;
4. every other run.

A finished run (its folder holds `final_metrics.json` and the same config) is not trained
again; an interrupted one is resumed from its last checkpoint; a run folder made with other
settings, or an arm whose teachers' caches do not cover the same sequences, stops the
experiment before anything trains. `parallel > 1` trains that many runs at
once in separate processes. Results go to OUT/results.json (one record per run) and
OUT/summary.json / summary.md (`summary.py`); `kdpipe report OUT` draws the plots.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kdpipe.embedded.timing import StageClock
from kdpipe.experiments.config import ExperimentConfig
from kdpipe.experiments.plan import (
    Inputs,
    PlannedRun,
    build_curricula,
    check_runs,
    check_teachers_aligned,
    plan_runs,
    resolve_inputs,
    run_state,
)
from kdpipe.experiments.summary import summarize, summary_markdown, teacher_note
from kdpipe.log_setup import configure_logging
from kdpipe.options import flat_values
from kdpipe.schemas.errors import ConfigError, KdpipeError
from kdpipe.schemas.io import atomic_write_json, atomic_write_text, nonfinite_as_null
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.torch_runtime import resolve_threads, torch_threads

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "experiment.json"
RESULTS_NAME = "results.json"
SUMMARY_NAME, SUMMARY_MD = "summary.json", "summary.md"
RECORD_METRICS = ("train_loss", "tokens_seen", "samples_seen", "step", "epoch")  # and eval_*


def mean_train_throughput(folder: Path) -> float:
    """Mean of the logged train tokens/s windows (eval, snapshot and save time excluded)."""
    rates = []
    path = RunLayout(folder).metrics
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("split") == "train" and "tokens_per_s" in record:
                rates.append(float(record["tokens_per_s"]))
    return sum(rates) / len(rates) if rates else math.nan


def student_parameters(folder: Path) -> int | None:
    """Weights of the run's trained student (RUN/final), counted from the safetensors headers
    (no tensor is read; tied weights are stored, and counted, once); None before the run has
    finished or when `final/` holds no safetensors file."""
    from safetensors import safe_open

    files = sorted(RunLayout(folder).final.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def run_record(run: PlannedRun, status: str, metrics: dict[str, Any] | None,
               wall_s: float | None, cpu_s: float | None, error: str | None = None
               ) -> dict[str, Any]:
    """The flat record of one run in results.json."""
    record: dict[str, Any] = {"arm": run.arm, "seed": run.seed, "run_dir": run.config.out,
                              "status": status, "wall_s": wall_s, "cpu_s": cpu_s}
    if metrics:
        for key, value in metrics.items():  # every eval_* metric: eval_kd_teacher_J too
            if key.startswith("eval_") or key in RECORD_METRICS:
                record[key] = value
        record["train_tokens_per_s"] = mean_train_throughput(Path(run.config.out))
        record["student_parameters"] = student_parameters(Path(run.config.out))
    if error is not None:
        record["error"] = error
    return record


def _train_in_worker(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """Process-pool entry: one run, timed in the worker (imports excluded)."""
    import torch

    from kdpipe.trainer.config import TrainConfig
    from kdpipe.trainer.train import train

    torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = train(TrainConfig.from_options(**config))
    return {"metrics": metrics, "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu}


def _worker_init() -> None:
    configure_logging(logging.WARNING)


class Results:
    """OUT/results.json: the record of every run, rewritten after each one."""

    def __init__(self, out: Path) -> None:
        self.path = out / RESULTS_NAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for record in json.loads(self.path.read_text(encoding="utf-8")):
                self.records[f"{record['arm']}/seed-{record['seed']}"] = record

    def put(self, name: str, record: dict[str, Any]) -> None:
        previous = self.records.get(name)
        if record["status"] == "skipped" and previous and previous.get("wall_s") is not None:
            record["wall_s"], record["cpu_s"] = previous["wall_s"], previous.get("cpu_s")
        self.records[name] = record
        atomic_write_json(self.path, nonfinite_as_null(list(self.records.values())))

    def for_runs(self, runs: list[PlannedRun]) -> list[dict[str, Any]]:
        return [self.records[r.name] for r in runs if r.name in self.records]


def execute_runs(runs: list[PlannedRun], results: Results, parallel: int, threads: int,
                 on_done: Callable[[PlannedRun, dict[str, Any]], None] | None = None) -> None:
    """Train the runs (skipping finished ones), `parallel` at a time; failures are recorded."""

    todo = []
    for run in runs:
        state, _ = run_state(run.config)
        if state == "finished":
            final = json.loads(RunLayout(Path(run.config.out)).final_metrics.read_text(
                encoding="utf-8"))
            results.put(run.name, run_record(run, "skipped", final, None, None))
            log.info("%s: finished earlier, skipped", run.name)
        else:
            todo.append(replace(run, config=replace(run.config, resume=state == "unfinished")))

    def finish(run: PlannedRun, outcome: dict[str, Any] | None, error: str | None) -> None:
        if outcome is None:
            record = run_record(run, "failed", None, None, None, error)
            log.error("%s failed: %s", run.name, error)
        else:
            record = run_record(run, "ran", outcome["metrics"], outcome["wall_s"],
                                outcome["cpu_s"])
            log.info("%s done in %.0f s: held-out CE %s", run.name, outcome["wall_s"],
                     record.get("eval_ce"))
        results.put(run.name, record)
        if on_done is not None:
            on_done(run, record)

    if parallel <= 1 or len(todo) <= 1:
        from kdpipe.trainer.train import train

        for i, run in enumerate(todo, 1):
            log.info("run %d/%d: %s", i, len(todo), run.name)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                with torch_threads(threads):
                    metrics = train(run.config)
            except (KdpipeError, FileNotFoundError) as exc:
                finish(run, None, str(exc))
                continue
            finish(run, {"metrics": metrics, "wall_s": time.perf_counter() - wall,
                         "cpu_s": time.process_time() - cpu}, None)
        return
    log.info("training %d runs, %d at a time (%d torch threads each)", len(todo), parallel,
             threads)
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        pending: dict[Future[dict[str, Any]], PlannedRun] = {
            pool.submit(_train_in_worker, flat_values(r.config), threads): r for r in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                run = pending.pop(future)
                failure = future.exception()
                if failure is not None:
                    finish(run, None, f"{type(failure).__name__}: {failure}")
                else:
                    finish(run, future.result(), None)


def run_experiment(exp: ExperimentConfig, parallel: int = 1, threads: int | None = None,
                   device: str = "auto", progress: bool = True, inputs: Inputs | None = None,
                   clock: StageClock | None = None, labels: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; returns the summary (also in OUT/summary.json).

    `threads`: torch CPU threads of each run (None or 0: `torch_runtime.auto_threads`, the
    CPUs shared among the `parallel` runs).

    `inputs` skips step 1 (the demo prepares its own caches); `labels` are display names of
    arms for the Markdown tables.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel} must be >= 1")
    threads = resolve_threads(threads or 0, processes=parallel)
    log.info("%d torch CPU thread(s) per run (--threads)", threads)
    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = clock or StageClock(out)
    with torch_threads(threads):
        inputs = inputs or resolve_inputs(exp, out, clock, device, progress)
    run_progress = progress and parallel == 1
    runs = plan_runs(exp, inputs, out, device, run_progress)
    record = {**exp.to_json_dict(), "inputs": asdict(inputs), "labels": labels or {},
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    atomic_write_json(out / EXPERIMENT_NAME, record)
    check_runs(runs, out / EXPERIMENT_NAME)
    check_teachers_aligned(exp, inputs)
    results = Results(out)
    with torch_threads(threads):
        build_curricula(exp, inputs, out, clock, None, device, progress)
    first = [r for r in runs if r.arm in exp.dependencies()]
    execute_runs(first, results, parallel, threads)
    if exp.dependencies():
        finished = tuple(sorted({r.seed for r in first}))
        failed = [r.name for r in first if results.records.get(r.name, {}).get("status")
                  == "failed"]
        if failed:
            raise KdpipeError(f"runs {', '.join(failed)} failed; the curricula built from "
                              f"them cannot be made (see the log above, then re-run)")
        with torch_threads(threads):
            build_curricula(exp, inputs, out, clock, finished, device, progress)
    execute_runs([r for r in runs if r not in first], results, parallel, threads)
    summary = write_summary(exp, results.for_runs(runs), out, labels)
    failed = [r["arm"] + f"/seed-{r['seed']}" for r in results.for_runs(runs)
              if r["status"] == "failed"]
    if failed:
        raise KdpipeError(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in "
                          f"{out / RESULTS_NAME}); re-run the same command to retry them")
    return summary


def write_summary(exp: ExperimentConfig, records: list[dict[str, Any]], out: Path,
                  labels: dict[str, str] | None = None) -> dict[str, Any]:
    """summary.json and summary.md from the run records."""
    arms = [a.name for a in exp.arms]
    summary = summarize(records, arms, exp.baseline, comparisons=exp.comparisons,
                        correction=exp.correction)
    summary["metric"] = exp.metric
    atomic_write_json(out / SUMMARY_NAME, nonfinite_as_null(summary))
    metrics = (exp.metric,) + tuple(m for m in ("eval_ce", "eval_ppl", "eval_top1_agreement")
                                    if m != exp.metric)
    note = teacher_note({a.name: exp.arm_teachers(a) for a in exp.arms}, labels)
    lines = [f"# {exp.name}: summary", "", *summary_markdown(summary, arms, labels, metrics),
             *([""] + note if note else []), ""]
    atomic_write_text(out / SUMMARY_MD, "\n".join(lines))
    return summary
