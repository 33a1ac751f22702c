"""The PNG figures of `kdpipe report` (matplotlib, an optional extra: `kdpipe[report]`).

Each function takes the arrays `report_data.py` collected and writes one file; none reads the
experiment folder itself, so a figure shows exactly what the Markdown tables summarise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.experiments.report_data import PoolTrace, SweepPoint, curve_band
from kdpipe.schemas.errors import ConfigError


def require_matplotlib() -> Any:
    """The pyplot module with a file-only backend, or a ConfigError saying how to get it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("kdpipe report draws its plots with matplotlib, which is not "
                          "installed: pip install 'kdpipe[report]' (or matplotlib), or pass "
                          "--no-plots for the Markdown alone") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def eval_curves(curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
                labels: dict[str, str], ylabel: str, path: Path) -> Path:
    """Held-out metric over steps: the mean over seeds, shaded from min to max."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, per_seed in curves.items():
        steps, mean, low, high = curve_band(per_seed)
        if steps.size == 0:
            continue
        line, = ax.plot(steps, mean, marker="o", markersize=3,
                        label=f"{labels.get(arm, arm)} (n={len(per_seed)})")
        if len(per_seed) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title("Held-out evaluation (line: mean over seeds; band: min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def difficulty_histograms(scores: dict[str, tuple[np.ndarray, str]], path: Path) -> Path:
    """One histogram of difficulty scores per curriculum ({name: (scores, x label)})."""
    plt = require_matplotlib()
    n = len(scores)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, (values, xlabel)) in zip(axes.flat, scores.items(), strict=False):
        ax.hist(values, bins=40, color="tab:blue", alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, path)


def kd_weight_figure(weights: dict[str, dict[str, np.ndarray]], labels: dict[str, str],
                     path: Path) -> Path:
    """λ under selective reliance: its distribution over samples, and its mean per step."""
    plt = require_matplotlib()
    fig, (hist_ax, step_ax) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.linspace(0.0, 1.0, 41)
    for arm, w in weights.items():
        label = labels.get(arm, arm)
        hist_ax.hist(w["values"], bins=bins, alpha=0.5, label=label)
        step_ax.plot(np.arange(1, w["step_mean"].size + 1), w["step_mean"], label=label)
    hist_ax.set_xlabel("λ (weight of the KD term) per sample")
    hist_ax.set_ylabel("sample draws")
    hist_ax.set_title("λ distribution (all steps and seeds)")
    step_ax.set_xlabel("optimizer step")
    step_ax.set_ylabel("mean λ of the step's samples")
    step_ax.set_title("λ over training (mean over seeds)")
    step_ax.set_ylim(0, 1)
    for ax in (hist_ax, step_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def pool_figure(traces: dict[str, PoolTrace], labels: dict[str, str], path: Path) -> Path:
    """Pool share m(t)/n per step; dots: the hardest percentile drawn (easy → hard files)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, trace in traces.items():
        line, = ax.plot(trace.steps, trace.share,
                        label=f"{labels.get(arm, arm)}: pool ({trace.pacing}, {trace.order})")
        if trace.drawn_max is not None:
            ax.scatter(trace.steps, trace.drawn_max, s=4, color=line.get_color(), alpha=0.5,
                       label=f"{labels.get(arm, arm)}: hardest percentile drawn")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of the training split")
    ax.set_ylim(0, 1.05)
    ax.set_title("Curriculum pool size over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _sweep_lines(ax: Any, lines: dict[str, list[SweepPoint]], labels: dict[str, str]) -> None:
    """One line per key: estimate against parameters, the interval as error bars."""
    for name, points in lines.items():
        points = sorted((p for p in points if np.isfinite(p.parameters)),
                        key=lambda p: p.parameters)
        if not points:
            continue
        x = np.array([p.parameters for p in points])
        y = np.array([p.interval["estimate"] for p in points])
        low = np.array([p.interval["low"] for p in points], dtype=np.float64)
        high = np.array([p.interval["high"] for p in points], dtype=np.float64)
        error = np.where(np.isfinite(low), np.vstack([y - low, high - y]), 0.0)
        ax.errorbar(x, y, yerr=error, marker="o", markersize=4, capsize=3,
                    label=f"{labels.get(name, name)} (n={points[0].interval['n']})")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def capacity_gap_figure(families: dict[str, list[SweepPoint]],
                        differences: dict[str, list[SweepPoint]], labels: dict[str, str],
                        ylabel: str, level: int, path: Path) -> Path:
    """The capacity-gap sweep against student size: each family's metric (mean and its
    interval over seeds), and, when the sweep compares families, their paired differences
    with a line at 0."""
    plt = require_matplotlib()
    panels = 2 if differences else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    _sweep_lines(axes[0, 0], families, labels)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].set_title(f"Per family: mean and {level}% interval over seeds")
    if differences:
        ax = axes[0, 1]
        ax.axhline(0.0, color="black", linewidth=0.8)
        _sweep_lines(ax, differences, {})
        ax.set_ylabel(f"difference in {ylabel} (A − B)")
        ax.set_title(f"Paired by seed: A − B and its {level}% interval")
    return _save(fig, path)
