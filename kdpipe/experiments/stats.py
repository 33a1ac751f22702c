"""Means, Student-t confidence intervals and differences between arms.

* `mean_interval`: mean ± t_{1-α/2, n-1} · s / sqrt(n) over an arm's seeds.
* `difference_interval`: an arm minus the baseline arm. When both ran the same seeds the
  difference is **paired by seed** (d_s = x_s − y_s; mean ± t_{1-α/2, n-1} · s_d / sqrt(n)):
  runs of one seed share their initialisation and data order, so pairing removes that shared
  noise. Otherwise **Welch's** interval for unpaired samples: (x̄ − ȳ) ± t_{1-α/2, ν} ·
  sqrt(s_x²/n_x + s_y²/n_y), with Welch–Satterthwaite degrees of freedom ν.

* `p_value`: the two-sided p of an interval's estimate against 0, from the same t statistic
  and degrees of freedom (estimate / se), so p < 1 − level exactly when the interval
  excludes 0; `ttest_rel` and Welch's `ttest_ind` in scipy.stats give the same numbers.
* `adjust_p_values`: a multiplicity correction over a family of comparisons. Holm's
  step-down (Holm 1979, "A simple sequentially rejective multiple test procedure"): sort the
  m p-values, p_(i) becomes max_{j ≤ i} min(1, (m − j + 1) · p_(j)); it controls the
  family-wise error rate like Bonferroni (min(1, m · p)) and rejects at least as much.

Student's t quantiles and tails come from `scipy.stats` (the `experiments` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kdpipe.extras import require

LEVEL = 0.95
CORRECTIONS = ("none", "holm", "bonferroni")


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` (> 0, not necessarily integer) degrees of
    freedom, e.g. t_quantile(0.975, 2) = 4.3027 (scipy.stats.t)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    stats = require("scipy.stats", "experiments", "confidence intervals")
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval (NaN bounds when n < 2)."""

    estimate: float
    low: float
    high: float
    n: int  # values (pairs when paired; the smaller side for Welch)
    sd: float  # sample standard deviation of the values (of the differences when paired)
    se: float  # standard error of the estimate
    df: float  # degrees of freedom of the t quantile
    method: str  # "t", "paired", "welch"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (NaN intervals never do)."""
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "sd": self.sd, "se": self.se, "df": self.df, "method": self.method}


def _sample_sd(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_interval(values: Sequence[float], level: float = LEVEL, method: str = "t"
                  ) -> Interval:
    """Mean ± t_{(1+level)/2, n-1} · s / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, math.nan, math.nan, math.nan, method)
    sd = _sample_sd(values)
    se = sd / math.sqrt(n)
    half = t_quantile((1.0 + level) / 2.0, n - 1) * se if se > 0 else 0.0
    return Interval(mean, mean - half, mean + half, n, sd, se, float(n - 1), method)


def welch_interval(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Interval:
    """(x̄ − ȳ) with Welch's interval (unequal variances, unpaired samples)."""
    nx, ny = len(x), len(y)
    if nx == 0 or ny == 0:
        raise ValueError("welch_interval needs values on both sides")
    diff = sum(x) / nx - sum(y) / ny
    if nx < 2 or ny < 2:
        return Interval(diff, math.nan, math.nan, min(nx, ny), math.nan, math.nan, math.nan,
                        "welch")
    vx, vy = _sample_sd(x) ** 2 / nx, _sample_sd(y) ** 2 / ny
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Interval(diff, diff, diff, min(nx, ny), math.nan, 0.0, math.inf, "welch")
    df = (vx + vy) ** 2 / (vx ** 2 / (nx - 1) + vy ** 2 / (ny - 1))
    half = t_quantile((1.0 + level) / 2.0, df) * se
    return Interval(diff, diff - half, diff + half, min(nx, ny), math.nan, se, df, "welch")


def difference_interval(arm: dict[int, float], baseline: dict[int, float],
                        level: float = LEVEL) -> Interval:
    """arm − baseline, values keyed by seed: paired by seed when both have the same seeds."""
    if arm and set(arm) == set(baseline):
        seeds = sorted(arm)
        return mean_interval([arm[s] - baseline[s] for s in seeds], level, method="paired")
    return welch_interval(list(arm.values()), list(baseline.values()), level)


def p_value(interval: Interval) -> float:
    """Two-sided p of `interval.estimate` = 0 under its own t distribution (scipy.stats.t);
    NaN without an interval (n < 2). A zero standard error gives 0 for a non-zero estimate
    and 1 for zero."""
    if not math.isfinite(interval.se) or not interval.df > 0:
        return math.nan
    if interval.se == 0.0:
        return 1.0 if interval.estimate == 0.0 else 0.0
    stats = require("scipy.stats", "experiments", "p-values")
    return float(2.0 * stats.t.sf(abs(interval.estimate) / interval.se, interval.df))


def adjust_p_values(p: Sequence[float], method: str) -> list[float]:
    """The p-values of one family of comparisons, corrected for multiplicity (module
    docstring): "holm", "bonferroni" or "none". NaN values stay NaN and do not count in m.
    Raises ValueError for another method."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r} is not one of {', '.join(CORRECTIONS)}")
    finite = sorted((v, i) for i, v in enumerate(p) if math.isfinite(v))
    m = len(finite)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, (value, i) in enumerate(finite):
        if method == "none":
            out[i] = value
        elif method == "bonferroni":
            out[i] = min(1.0, m * value)
        else:
            running = max(running, min(1.0, (m - rank) * value))
            out[i] = running
    return out
