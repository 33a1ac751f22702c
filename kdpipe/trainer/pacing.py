"""Pacing functions: what share of the easiest data a curriculum makes available at each step.

The formulas of docs/curriculum.md ("Pacing functions"), after Platanios et al. 2019
(competence-based curricula) and Hacohen & Weinshall 2019 (exponential and step pacing). `t` is
the number of optimizer steps already taken (0 for the first batch), `T` the run's total steps,
`b` the starting share, `a` the share of training after which all data is available:

* linear: g(t) = b + (1 - b) · min(1, t / (aT))
* root:   g(t) = min(1, sqrt(t (1 - b²) / (aT) + b²))   (competence-based, Platanios et al.)
* exp:    g(t) = min(1, b · inc^floor(t / L))
* step:   g(t) = b for t < L, then 1
* baby-steps: k(t) = min(B, 1 + floor(t / L)) of B equal-size difficulty buckets
* none:   no pacing: every sample once per epoch, in ranked order

When no step length L is given it is chosen so that all data is available at t ≈ aT
(`Pacing.step_len`). Pure functions, no state: a resumed run computes the same shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PACINGS = ("linear", "root", "exp", "step", "baby-steps", "none")


@dataclass(frozen=True)
class Pacing:
    """A pacing function and its parameters (the `--pacing*` flags of train-student, which
    `CurriculumConfig` declares and checks)."""

    name: str = "linear"
    start: float = 0.2  # b: share of the easiest data available at t = 0
    full: float = 0.8  # a: all data available after this share of training (linear, root)
    increase: float = 2.0  # inc: growth factor per step of `exp`
    step_length: int | None = None  # L in steps (exp, step, baby-steps); None: derived
    buckets: int = 10  # B: difficulty buckets of `baby-steps`

    def step_len(self, total_steps: int) -> int:
        """L: the given step length, or the one that makes all data available at t ≈ aT.

        exp: aT / n with n = ceil(log(1/b) / log(inc)) increases from b to 1;
        step: aT; baby-steps: aT / (B - 1) (B - 1 buckets are added after the first).
        """
        if self.step_length is not None:
            return self.step_length
        horizon = self.full * total_steps
        if self.name == "exp":
            increases = max(1, math.ceil(math.log(1.0 / self.start) / math.log(self.increase)
                                         - 1e-9))
            return max(1, math.ceil(horizon / increases))
        if self.name == "baby-steps":
            return max(1, math.ceil(horizon / max(self.buckets - 1, 1)))
        return max(1, math.ceil(horizon))

    def share(self, t: int, total_steps: int) -> float:
        """g(t) in (0, 1]: the share of the ranked data available after `t` steps of T."""
        b, horizon = self.start, self.full * max(total_steps, 1)
        if self.name == "none":
            return 1.0
        if self.name == "linear":
            return b + (1.0 - b) * min(1.0, t / horizon)
        if self.name == "root":
            return min(1.0, math.sqrt(t * (1.0 - b * b) / horizon + b * b))
        if self.name == "exp":
            return min(1.0, b * self.increase ** (t // self.step_len(total_steps)))
        if self.name == "step":
            return b if t < self.step_len(total_steps) else 1.0
        if self.name == "baby-steps":
            return self.buckets_available(t, total_steps) / self.buckets
        raise ValueError(f"unknown pacing {self.name!r}")

    def buckets_available(self, t: int, total_steps: int) -> int:
        """k(t) = min(B, 1 + floor(t / L)): baby-steps' buckets in the pool after `t` steps."""
        return min(self.buckets, 1 + t // self.step_len(total_steps))

    def pool_size(self, t: int, total_steps: int, n: int, min_size: int = 1) -> int:
        """How many of the n ranked samples are available: ceil(g(t) · n), in [min_size, n].

        For baby-steps this is exactly the samples of buckets 0..k-1 (bucket floor(r·B/n)),
        i.e. ceil(k · n / B). `min_size` (one global batch) keeps a batch free of repeats.
        """
        if self.name == "baby-steps":
            k = self.buckets_available(t, total_steps)
            m = -(-k * n // self.buckets)
        else:
            m = math.ceil(self.share(t, total_steps) * n - 1e-9)
        return int(min(n, max(m, min_size, 1)))
