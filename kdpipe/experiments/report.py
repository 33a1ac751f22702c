"""`kdpipe report RUN_DIR`: Markdown (and PNG plots) of an experiment, a demo or one run.

Writes RUN_DIR/report/report.md with: the summary (mean ± 95% CI per arm, differences from
the baseline and whether each is inside the noise), every run, and the figures of `plots.py`
— eval curves per arm, difficulty histograms per curriculum, λ under selective reliance and
the curriculum pool over steps — each with the numbers behind it as a table, so the Markdown
is complete without matplotlib (`--no-plots`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.experiments import report_data as data
from kdpipe.experiments.stats import LEVEL
from kdpipe.experiments.summary import (
    CORRECTION_NAMES,
    METRIC_INFO,
    fmt,
    summarize,
    summary_markdown,
    teacher_note,
)
from kdpipe.schemas.io import atomic_write_text

log = logging.getLogger(__name__)

REPORT_DIR, REPORT_NAME = "report", "report.md"
METHOD = (
    "Each arm's runs share the cache and differ only in their options and seed. Intervals are "
    "two-sided {level}% Student-t intervals over seeds (mean ± t·s/√n). Differences from the "
    "baseline are **paired by seed** when the arm and the baseline ran the same seeds (the "
    "runs of one seed share initialisation and data order; d_s = arm_s − baseline_s, "
    "mean ± t_(n−1)·s_d/√n), otherwise **Welch's** interval (unequal variances, "
    "Welch–Satterthwaite degrees of freedom). A difference whose interval contains 0 is "
    "reported as inside the noise. {correction}")
NO_CORRECTION = ("No correction for comparing several arms is applied: with many arms, expect "
                 "about one in twenty intervals to exclude 0 by chance.")
CORRECTED = ("The comparisons are one family: each p (two-sided, from the interval's own t "
             "statistic) is corrected by {name} over the {m} of them, and a comparison counts "
             "(better or worse) only when its corrected p is below {alpha}.")


def _runs_table(view: data.ExperimentView) -> list[str]:
    lines = ["| arm | seed | status | held-out CE | held-out ppl | top-1 agr. | tokens | "
             "tokens/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    order = {arm: i for i, arm in enumerate(view.arms)}
    for r in sorted(view.records, key=lambda r: (order.get(r["arm"], 99), r["seed"])):
        lines.append(
            f"| {view.label(r['arm'])} | {r['seed']} | {r.get('status')} | "
            f"{fmt(r.get('eval_ce', math.nan))} | {fmt(r.get('eval_ppl', math.nan), 2)} | "
            f"{fmt(r.get('eval_top1_agreement', math.nan), 3)} | "
            f"{fmt(r.get('tokens_seen', math.nan))} | "
            f"{fmt(r.get('train_tokens_per_s', math.nan))} | "
            f"{fmt(r.get('wall_s') or math.nan, 1)} |")
    return lines


def _curve_table(curves: dict[str, Any], view: data.ExperimentView) -> list[str]:
    lines = ["| arm | seeds | first eval (step: mean) | last eval (step: mean [min, max]) |",
             "|---|---|---|---|"]
    for arm, per_seed in curves.items():
        steps, mean, low, high = data.curve_band(per_seed)
        if steps.size == 0:
            continue
        lines.append(f"| {view.label(arm)} | {len(per_seed)} | {steps[0]}: {fmt(mean[0])} | "
                     f"{steps[-1]}: {fmt(mean[-1])} [{fmt(low[-1])}, {fmt(high[-1])}] |")
    return lines


def _curricula_section(found: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    from kdpipe.curriculum.cli import rank_correlation

    lines = ["| curriculum | source / metric | samples | min | q25 | median | q75 | max |",
             "|---|---|---|---|---|---|---|---|"]
    scores = {}
    for name, c in found.items():
        q = np.quantile(c.score, [0, 0.25, 0.5, 0.75, 1.0]) if c.score.size else [math.nan] * 5
        lines.append(f"| {name} | {c.info.source} / {c.info.metric} | {c.score.size} | "
                     + " | ".join(fmt(float(v)) for v in q) + " |")
        scores[name] = (c.score, f"{c.info.source} {c.info.metric} (higher = harder)")
    names = list(found)
    if 1 < len(names) <= 8:
        lines += ["", "Spearman's ρ between the curricula's scores (samples both rank):", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for a in names:
            cells = [fmt(rank_correlation(found[a], found[b])["spearman"], 3) if a != b else "1"
                     for b in names]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines, scores


def _capacity_table(families: dict[str, list[data.SweepPoint]],
                    differences: dict[str, list[data.SweepPoint]]) -> list[str]:
    lines = ["| family or A − B | size | student parameters | value | interval | n |",
             "|---|---|---|---|---|---|"]
    for name, points in [*families.items(), *differences.items()]:
        for p in points:
            d = p.interval
            interval = f"[{fmt(d['low'])}, {fmt(d['high'])}]" if math.isfinite(d["low"]) \
                else "–"
            lines.append(f"| {name} | {p.size} | {fmt(p.parameters)} | {fmt(d['estimate'])} | "
                         f"{interval} | {d['n']} |")
    return lines


def _kd_weight_table(weights: dict[str, dict[str, np.ndarray]], view: data.ExperimentView
                     ) -> list[str]:
    lines = ["| arm | draws | mean λ | sd | min | median | max | λ of first step → last |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, w in weights.items():
        v = w["values"]
        lines.append(f"| {view.label(arm)} | {v.size} | {fmt(float(v.mean()))} | "
                     f"{fmt(float(v.std()))} | {fmt(float(v.min()))} | "
                     f"{fmt(float(np.median(v)))} | {fmt(float(v.max()))} | "
                     f"{fmt(float(w['step_mean'][0]))} → {fmt(float(w['step_mean'][-1]))} |")
    return lines


def _pool_table(traces: dict[str, data.PoolTrace], view: data.ExperimentView) -> list[str]:
    lines = ["| arm | pacing | order | pool at step 1 | at 25% | at 50% | full from step | "
             "steps outside the pool |", "|---|---|---|---|---|---|---|---|"]
    for arm, t in traces.items():
        full = t.steps[np.argmax(t.share >= 1.0)] if np.any(t.share >= 1.0) else "–"
        quarter, half = t.share[len(t.share) // 4], t.share[len(t.share) // 2]
        checked = str(t.violations) if t.drawn_max is not None and t.pacing != "none" \
            else "not checked"
        lines.append(f"| {view.label(arm)} | {t.pacing} | {t.order} | {fmt(float(t.share[0]))} "
                     f"| {fmt(float(quarter))} | {fmt(float(half))} | {full} | {checked} |")
    return lines


def render_report(root: Path, plots: bool = True, out: Path | None = None) -> Path:
    """Write the report of the experiment (or run) folder `root`; returns the Markdown path."""
    view = data.load_view(root)
    out = out or root / REPORT_DIR
    if plots:
        from kdpipe.experiments import plots as figures

        figures.require_matplotlib()  # fail before any work when it is missing
    out.mkdir(parents=True, exist_ok=True)
    level = int(round(LEVEL * 100))
    lines = [f"# {view.name}", ""]
    if view.description:
        lines += [view.description, ""]
    if view.command:
        lines += [f"Command: `{view.command}`", ""]
    facts = [f"arms: {len(view.arms)}", f"seeds: {', '.join(str(s) for s in view.seeds)}"]
    caches = view.inputs.get("caches") or {}
    if len(caches) > 1:  # several teachers: each one's cache, by name
        facts.append("teachers' caches: " + ", ".join(f"{name} `{path}`"
                                                     for name, path in caches.items()))
    for key in ("cache", "eval_cache", "teacher"):
        if view.inputs.get(key) and not (len(caches) > 1 and key != "teacher"):
            facts.append(f"{key.replace('_', ' ')}: `{view.inputs[key]}`")
    if view.baseline:
        facts.append(f"baseline: {view.label(view.baseline)}")
    lines += ["; ".join(facts), "", "## Summary", ""]
    summary = summarize(view.records, view.arms, view.baseline,
                        comparisons=view.comparisons, correction=view.correction)
    metrics = (view.metric,) + tuple(m for m in ("eval_ce", "eval_ppl", "eval_top1_agreement")
                                     if m != view.metric)
    lines += summary_markdown(summary, view.arms, view.labels, metrics)
    note = teacher_note(view.arm_teachers, view.labels)
    lines += [""] + note if note else []
    correction = NO_CORRECTION if view.correction == "none" else CORRECTED.format(
        name=CORRECTION_NAMES[view.correction], m=len(view.comparisons),
        alpha=fmt(1.0 - LEVEL, 2)) + (" The differences from the baseline are not "
                                       "corrected." if view.baseline else "")
    lines += ["", METHOD.format(level=level, correction=correction), "", "## Runs", "",
              *_runs_table(view), ""]
    families, differences = data.capacity_gap(view, view.metric)
    if families:
        label = METRIC_INFO[view.metric][0]
        lines += ["## Capacity gap: student size", "",
                  f"{label} against the student's parameter count, per family (mean ± "
                  f"half-width of the {level}% interval over seeds), and the sweep's family "
                  "comparisons at every size (paired by seed).", "",
                  *_capacity_table(families, differences), ""]
        if plots:
            figures.capacity_gap_figure(families, differences, view.labels, label, level,
                                        out / "capacity_gap.png")
            lines += ["![capacity gap](capacity_gap.png)", ""]

    curves = data.eval_curves(view)
    if curves:
        lines += ["## Held-out evaluation over training", "", *_curve_table(curves, view), ""]
        if plots:
            figures.eval_curves(curves, view.labels, "held-out CE (nats/token)",
                                out / "eval_curves.png")
            lines += ["![eval curves](eval_curves.png)", ""]
    found = data.curricula(view)
    if found:
        table, scores = _curricula_section(found)
        lines += ["## Curricula: difficulty scores", "", *table, ""]
        if plots:
            figures.difficulty_histograms(scores, out / "difficulty.png")
            lines += ["![difficulty histograms](difficulty.png)", ""]
    weights = data.logged_lambdas(view)
    if weights:
        lines += ["## Selective reliance: λ per sample", "", *_kd_weight_table(weights, view),
                  ""]
        if plots:
            figures.kd_weight_figure(weights, view.labels, out / "kd_weight.png")
            lines += ["![lambda distribution](kd_weight.png)", ""]
    traces = data.pool_traces(view)
    if traces:
        lines += ["## Curriculum pool over training", "",
                  "The pool is the m(t) easiest samples a batch may be drawn from "
                  "(docs/curriculum.md). For a curriculum file in easy → hard order the "
                  "hardest difficulty percentile actually drawn at each step is checked "
                  "against it from order.jsonl.", "", *_pool_table(traces, view), ""]
        if plots:
            figures.pool_figure(traces, view.labels, out / "pool_size.png")
            lines += ["![pool size](pool_size.png)", ""]
    path = out / REPORT_NAME
    atomic_write_text(path, "\n".join(lines))
    log.info("report: %s", path)
    return path
