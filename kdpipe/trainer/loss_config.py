"""`LossConfig`: how a student's loss is formed, shared by `train-student` and `evaluate`.

    L = (1 - λ) · CE + λ · τ² · Σ_j w_j KD_j        (mode kd; mode ce: L = CE)

with KD_j one of `losses.LOSS_KINDS` on teacher j's cached partition (docs/training.md,
"Losses"; one teacher: w_1 = 1; several: "Several teachers").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kdpipe.options import field_problems, option, raise_problems

# The choices live here, not beside the torch code of trainer/losses.py, so that the commands'
# --help builds without importing torch.
LOSSES = ("forward", "zero", "reverse", "jsd", "skew", "tvd")  # divergences on the partition
SAMPLED = "sampled"  # count-weighted CE against a sampled cache (sampled_cross_entropy)
LOSS_KINDS = LOSSES + (SAMPLED,)  # everything --loss accepts

MODES = ("kd", "ce")
LOSS_HELP = ("KD divergence on the cached top-k + tail partition: forward (KL with the tail "
             "bucket, exact), zero (renormalised top-k, biased; for comparison), reverse, jsd, "
             "skew, tvd; sampled (count-weighted CE, for a --cache-mode sampled cache). "
             "Default: follows the cache: sampled for a sampled cache, else forward.")


def normalised(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights ≥ 0, finite, not all 0 → the same weights summing to 1. Divided by their
    largest first, so that no sum overflows (1e308 + 1e308 = inf would make every weight 0)
    or underflows. Raises ValueError for an empty, negative, non-finite or all-0 list (the
    options' checks refuse those first)."""
    values = [float(w) for w in weights]
    if not values or any(not math.isfinite(w) or w < 0 for w in values) or max(values) == 0:
        raise ValueError(f"teacher weights {values}: need finite values ≥ 0, not all 0")
    top = max(values)
    scaled = [w / top for w in values]  # in [0, 1], the largest exactly 1: the sum is in [1, J]
    total = sum(scaled)
    return tuple(w / total for w in scaled)


def default_kind(sampled_cache: bool) -> str:
    """The loss a cache calls for when --loss is not given."""
    return SAMPLED if sampled_cache else "forward"


@dataclass(frozen=True)
class LossConfig:
    """The loss options; `kind` None means `default_kind` of the cache in use."""

    mode: str = option("kd", "kd: (1-λ)·CE + λ·τ²·KD; ce: cross-entropy on the cached tokens "
                       "only (the baseline, or to train a teacher).", choices=MODES)
    kind: str | None = option(None, LOSS_HELP, flag="loss", choices=LOSS_KINDS)
    kd_weight: float = option(0.5, "λ: weight of the KD term, in [0, 1].", ge=0, le=1)
    temperature: float = option(
        1.0, "τ of the KD term (the term is scaled by τ²; exact tempered tail when the cache "
        "stores it, else the uniform-tail approximation); 0.05 to 100.", ge=0.05, le=100)
    beta: float = option(0.5, "JSD mixture weight β.", gt=0, lt=1)
    alpha: float = option(0.1, "Skew KL weight α in KL(p || αp + (1-α)q).", ge=0, le=1)
    teacher_weights: tuple[float, ...] = option(
        (), "Weight w_j of teacher j's KD term, one per --cache in the same order (repeat the "
        "flag); normalised to sum 1. Default: equal weights.", flag="teacher_weight", ge=0)
    chunk_size: int = option(1024, "Target tokens per chunk of the output head and loss "
                             "(bounds the logits' memory).", ge=1)

    def problems(self) -> list[str]:
        """Checks across options (each option's own checks are declared with it)."""
        if self.kind == SAMPLED and self.temperature != 1.0:
            return ["--loss sampled estimates the cross-entropy to the teacher at τ = 1 (its "
                    f"samples were drawn at τ = 1); drop --temperature {self.temperature}"]
        return []

    def validate(self) -> None:
        """Raise one ConfigError listing every problem (for a LossConfig used on its own)."""
        raise_problems("loss", field_problems(self) + self.problems())

    def teacher_mix(self, teachers: int) -> tuple[float, ...]:
        """The J = `teachers` weights w_j of the KD terms, summing to 1: --teacher-weight
        normalised, or 1/J each. Raises ValueError when their number is not J (the config's
        checks refuse that first)."""
        if not self.teacher_weights:
            return (1.0 / teachers,) * teachers
        if len(self.teacher_weights) != teachers:
            raise ValueError(f"{len(self.teacher_weights)} --teacher-weight for {teachers} "
                             "teachers")
        return normalised(self.teacher_weights)

    def resolved(self, sampled_cache: bool) -> str:
        """The divergence to compute: `kind`, or the cache's default."""
        return self.kind or default_kind(sampled_cache)
