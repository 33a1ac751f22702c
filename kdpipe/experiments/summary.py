"""Per-arm summaries of an experiment's runs: mean ± 95% CI, and each arm minus the baseline.

Input: the run records of `results.json` (one per arm × seed, flat metrics). Output:
`summary.json` and the Markdown tables `kdpipe experiment` prints and `kdpipe report` embeds.
Intervals are Student-t over seeds; differences are paired by seed when the arm and the
baseline ran the same seeds, Welch otherwise (`stats.py` says why). Every difference carries
its two-sided p; with a correction (`holm`, `bonferroni`) the `comparisons` are one family
and each also carries its corrected p, which then decides its verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kdpipe.experiments.stats import (
    LEVEL,
    Interval,
    adjust_p_values,
    difference_interval,
    mean_interval,
    p_value,
)

# metric -> (label, better direction: -1 lower is better, +1 higher, 0 neither)
METRIC_INFO: dict[str, tuple[str, int]] = {
    "eval_ce": ("held-out CE (nats/token)", -1),
    "eval_ppl": ("held-out perplexity", -1),
    # with several teachers, each arm's first (`teacher_note` names it per arm)
    "eval_top1_agreement": ("top-1 agreement with the (first) teacher", +1),
    "eval_kd": ("held-out KL to the teacher(s)", -1),
    "eval_loss": ("held-out training objective", -1),
    "train_loss": ("final train loss", -1),
    "train_tokens_per_s": ("train tokens/s", +1),
    "wall_s": ("wall time (s)", -1),
    "tokens_seen": ("training tokens", 0),
}
TABLE_METRICS = ("eval_ce", "eval_ppl", "eval_top1_agreement", "eval_kd")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def values_by_seed(records: Sequence[dict[str, Any]], arm: str, metric: str
                   ) -> dict[int, float]:
    """{seed: value} of the arm's finished runs that report the metric."""
    return {int(r["seed"]): float(r[metric]) for r in records
            if r["arm"] == arm and r.get("status") in ("ran", "skipped") and _finite(r.get(metric))}


def difference_entry(arm: dict[int, float], baseline: dict[int, float], level: float = LEVEL
                     ) -> dict[str, Any]:
    """arm − baseline (values keyed by seed): `stats.difference_interval` as a dict, with its
    two-sided p (`stats.p_value`)."""
    interval = difference_interval(arm, baseline, level)
    return {**interval.as_dict(), "p": p_value(interval)}


def summarize(records: Sequence[dict[str, Any]], arms: Sequence[str], baseline: str | None,
              metrics: Sequence[str] = tuple(METRIC_INFO), level: float = LEVEL,
              comparisons: Sequence[tuple[str, str]] = (), correction: str = "none"
              ) -> dict[str, Any]:
    """{"arms": {arm: {metric: interval}}, "differences": {arm: {metric: interval and p}},
    "comparisons": [{"a": A, "b": B, metric: interval of A − B, its p and, with a
    `correction`, "p_adjusted" over the comparisons of that metric}], ...}."""
    per_arm: dict[str, dict[str, Any]] = {}
    differences: dict[str, dict[str, Any]] = {}
    for arm in arms:
        per_arm[arm] = {"runs": sum(1 for r in records if r["arm"] == arm),
                        "finished": sum(1 for r in records if r["arm"] == arm
                                        and r.get("status") in ("ran", "skipped"))}
        for metric in metrics:
            values = values_by_seed(records, arm, metric)
            if values:
                per_arm[arm][metric] = mean_interval(list(values.values()), level).as_dict()
        if baseline is None or arm == baseline:
            continue
        differences[arm] = {}
        for metric in metrics:
            mine, theirs = values_by_seed(records, arm, metric), \
                values_by_seed(records, baseline, metric)
            if mine and theirs:
                differences[arm][metric] = difference_entry(mine, theirs, level)
    pairs = []
    for a, b in comparisons:
        entry: dict[str, Any] = {"a": a, "b": b}
        for metric in metrics:
            mine, theirs = values_by_seed(records, a, metric), values_by_seed(records, b, metric)
            if mine and theirs:
                entry[metric] = difference_entry(mine, theirs, level)
        pairs.append(entry)
    if correction != "none":
        for metric in metrics:
            family = [p[metric] for p in pairs if metric in p]
            for d, adjusted in zip(family, adjust_p_values([d["p"] for d in family],
                                                           correction), strict=True):
                d["p_adjusted"] = adjusted
    return {"level": level, "baseline": baseline, "arms": per_arm, "differences": differences,
            "comparisons": pairs, "correction": correction}


def fmt(value: float, digits: int = 4) -> str:
    """Numbers for tables: fixed digits, large values without decimals, NaN as '–'."""
    if not _finite(value):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def _interval_text(d: dict[str, Any], digits: int = 4) -> str:
    if not _finite(d["low"]):
        return f"{fmt(d['estimate'], digits)} (n={d['n']})"
    half = (d["high"] - d["low"]) / 2
    return f"{fmt(d['estimate'], digits)} ± {fmt(half, digits)}"


def verdict(d: dict[str, Any], direction: int, level: float = LEVEL) -> str:
    """Plain words for a difference interval (arm − baseline); with a corrected p
    (`p_adjusted`) the difference counts when that p is below 1 − level."""
    interval = Interval(d["estimate"], d["low"], d["high"], d["n"], d.get("sd", math.nan),
                        d.get("se", math.nan), d["df"], d["method"])
    if not _finite(d["low"]):
        return "no interval (one seed)"
    if "p_adjusted" in d:
        if not (_finite(d["p_adjusted"]) and d["p_adjusted"] < 1.0 - level):
            return "inside the noise"
    elif not interval.excludes_zero():
        return "inside the noise"
    if direction == 0:
        return "differs"
    better = (interval.estimate < 0) == (direction < 0)
    return "better" if better else "worse"


def summary_markdown(summary: dict[str, Any], arms: Sequence[str],
                     labels: dict[str, str] | None = None,
                     metrics: Sequence[str] = TABLE_METRICS) -> list[str]:
    """Two Markdown tables: per-arm mean ± CI half-width, and differences from the baseline."""
    labels = labels or {}
    level = int(round(summary["level"] * 100))
    lines = ["| arm | runs | " + " | ".join(METRIC_INFO[m][0] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for arm in arms:
        row = summary["arms"].get(arm, {})
        cells = [_interval_text(row[m]) if m in row else "–" for m in metrics]
        lines.append(f"| {labels.get(arm, arm)} | {row.get('finished', 0)}/{row.get('runs', 0)} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Mean ± half-width of the {level}% Student-t interval over seeds."]
    metric = metrics[0]
    label, direction = METRIC_INFO[metric]
    baseline = summary.get("baseline")
    if baseline is not None and summary["differences"]:
        lines += ["", f"Difference from **{labels.get(baseline, baseline)}** in {label} "
                  f"(arm − baseline; {level}% interval):", "",
                  "| arm | difference | interval | method | verdict |", "|---|---|---|---|---|"]
        for arm in arms:
            d = summary["differences"].get(arm, {}).get(metric)
            if d is not None:
                lines.append(f"| {labels.get(arm, arm)} | {_difference_cells(d, direction)} |")
    pairs = [p for p in summary.get("comparisons", []) if metric in p]
    correction = summary.get("correction", "none")
    if pairs and correction != "none":
        lines += ["", f"Comparisons in {label} (A − B; {level}% interval; p two-sided; the "
                  f"verdict is A's, from p corrected by {CORRECTION_NAMES[correction]} over "
                  f"these {len(pairs)} comparisons):", "",
                  f"| A − B | difference | interval | method | p | p ({correction}) | verdict |",
                  "|---|---|---|---|---|---|---|"]
    elif pairs:
        lines += ["", f"Comparisons in {label} (A − B; {level}% interval; the verdict is A's):",
                  "", "| A − B | difference | interval | method | verdict |",
                  "|---|---|---|---|---|"]
    for p in pairs:
        name = f"{labels.get(p['a'], p['a'])} − {labels.get(p['b'], p['b'])}"
        lines.append(f"| {name} | {_difference_cells(p[metric], direction)} |")
    return lines


def teacher_note(arm_teachers: Mapping[str, Sequence[str]], labels: dict[str, str] | None = None
                 ) -> list[str]:
    """A line saying which teacher each arm's top-1 agreement and KL are measured against,
    when the arms do not all learn from one teacher (else no line): train-student measures
    agreement against its first --cache's teacher and KL to the --teacher-weight mix."""
    if len({t for teachers in arm_teachers.values() for t in teachers}) < 2:
        return []
    labels = labels or {}
    by_first: dict[str, list[str]] = {}
    for arm, teachers in arm_teachers.items():
        by_first.setdefault(teachers[0], []).append(labels.get(arm, arm))
    groups = "; ".join(f"teacher {t} for {', '.join(arms)}" for t, arms in by_first.items())
    return [f"Top-1 agreement is with each arm's first teacher: {groups}. Held-out KL is to the "
            "arm's teachers, mixed by its teacher weights (`eval_kd_teacher_J` in results.json: "
            "to its J-th teacher)."]


CORRECTION_NAMES = {"holm": "Holm's step-down method", "bonferroni": "Bonferroni"}


def _difference_cells(d: dict[str, Any], direction: int) -> str:
    """difference | interval | method | [p | corrected p |] verdict, for one difference."""
    interval = f"[{fmt(d['low'])}, {fmt(d['high'])}]" if _finite(d["low"]) else "–"
    method = {"paired": f"paired by seed (n={d['n']})",
              "welch": f"Welch (ν={fmt(d['df'], 3)})", "t": "t"}[d["method"]]
    p = f" | {fmt(d.get('p', math.nan), 3)} | {fmt(d['p_adjusted'], 3)}" \
        if "p_adjusted" in d else ""
    return f"{fmt(d['estimate'])} | {interval} | {method}{p} | {verdict(d, direction)}"
