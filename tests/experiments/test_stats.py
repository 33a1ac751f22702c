"""Confidence intervals against values computed independently (tables and by hand)."""

from __future__ import annotations

import math

import pytest

from kdpipe.experiments.stats import (
    difference_interval,
    mean_interval,
    t_quantile,
    welch_interval,
)

# Two-sided 95% critical values of Student's t (any statistics table).
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281,
         30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_closed_forms() -> None:
    # df = 1 is the Cauchy distribution: Q(p) = tan(π (p - 1/2)); df = 2: Q(p) = (2p - 1) /
    # sqrt(2p (1 - p)).
    for p in (0.1, 0.6, 0.975):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                 rel=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)


def test_mean_interval_by_hand() -> None:
    # values 10, 12, 14: mean 12, s = 2, se = 2/√3, half-width = 4.3027 · 2/√3 = 4.9683.
    interval = mean_interval([10.0, 12.0, 14.0])
    assert interval.estimate == 12.0
    assert interval.sd == pytest.approx(2.0)
    assert interval.half_width == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    assert (interval.low, interval.high) == pytest.approx((12 - 4.968275, 12 + 4.968275),
                                                          abs=1e-5)
    single = mean_interval([3.0])
    assert single.estimate == 3.0 and math.isnan(single.low) and not single.excludes_zero()


def test_paired_difference_when_seeds_match() -> None:
    arm = {0: 5.0, 1: 6.0, 2: 8.0}
    baseline = {0: 4.0, 1: 5.5, 2: 7.0}
    # differences 1.0, 0.5, 1.0: mean 0.8333, s = 0.288675, half = 4.302653 · s / √3 = 0.717109
    d = difference_interval(arm, baseline)
    assert d.method == "paired" and d.n == 3 and d.df == 2
    assert d.estimate == pytest.approx(5 / 6)
    assert d.half_width == pytest.approx(0.717109, abs=1e-5)
    assert d.excludes_zero()


def test_welch_difference_when_seeds_differ() -> None:
    x, y = [5.0, 6.0, 8.0, 9.0], [4.0, 5.5, 7.0]
    # by hand: means 7 and 5.5; s²: 10/3 and 2.25; se² = 10/12 + 2.25/3 = 1.583333
    # ν = se⁴ / ((10/12)²/3 + (0.75)²/2) = 2.506944 / 0.512731 = 4.889391
    d = difference_interval(dict(enumerate(x)), {10 + i: v for i, v in enumerate(y)})
    assert d.method == "welch"
    assert d.estimate == pytest.approx(1.5)
    assert d.se == pytest.approx(math.sqrt(1.583333333), rel=1e-9)
    assert d.df == pytest.approx(4.889391, abs=1e-5)
    assert d.half_width == pytest.approx(t_quantile(0.975, 4.889391) * math.sqrt(1.5833333),
                                         rel=1e-6)
    assert welch_interval(x, y).estimate == d.estimate
    assert not d.excludes_zero()
