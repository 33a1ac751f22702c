"""Means, Student-t confidence intervals and differences between arms, with no SciPy.

* `mean_interval`: mean ± t_{1-α/2, n-1} · s / sqrt(n) over an arm's seeds.
* `difference_interval`: an arm minus the baseline arm. When both ran the same seeds the
  difference is **paired by seed** (d_s = x_s − y_s; mean ± t_{1-α/2, n-1} · s_d / sqrt(n)):
  runs of one seed share their initialisation and data order, so pairing removes that shared
  noise. Otherwise **Welch's** interval for unpaired samples: (x̄ − ȳ) ± t_{1-α/2, ν} ·
  sqrt(s_x²/n_x + s_y²/n_y), with Welch–Satterthwaite degrees of freedom ν.

Student's t quantiles come from the regularised incomplete beta function (Lentz's continued
fraction, as in Numerical Recipes §6.4) inverted by bisection; accurate to ~1e-10, tested
against tabulated values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily integer) degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (e.g. t_quantile(0.975, 2) = 4.3027)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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
