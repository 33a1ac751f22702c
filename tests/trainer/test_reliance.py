"""λ per sample and per token equals its mapping, for every reliance mode and control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.reliance import (
    RelianceMapping,
    SampleReliance,
    ScheduledLambda,
    TokenReliance,
    partner_map,
)

IDS = np.arange(200, 220, dtype=np.int64)
PERCENTILE = {int(i): k / 19 for k, i in enumerate(IDS[::-1])}  # id 219 easiest, 200 hardest


class FakeSource:
    def __init__(self, unknown_after: int | None = None) -> None:
        self.unknown_after = unknown_after

    def percentiles(self, sample_ids: np.ndarray, step: int) -> np.ndarray:
        u = np.array([PERCENTILE[int(i)] for i in sample_ids])
        return np.full_like(u, np.nan) if step == self.unknown_after else u


def test_sample_mappings() -> None:
    u = np.array([0.0, 0.25, 0.5, 0.75, 1.0, np.nan])
    threshold = RelianceMapping("threshold", low=0.2, high=0.8, quantile=0.5, constant=0.4)
    assert threshold.sample_lambda(u).tolist() == [0.2, 0.2, 0.2, 0.8, 0.8, 0.4]
    linear = RelianceMapping("linear", low=0.2, high=0.8, constant=0.4)
    assert np.allclose(linear.sample_lambda(u), [0.2, 0.35, 0.5, 0.65, 0.8, 0.4])
    assert RelianceMapping("constant", constant=0.3).sample_lambda(u).tolist() == [0.3] * 6


@pytest.mark.parametrize("mode", ["threshold", "linear"])
def test_sample_reliance_and_its_controls(mode: str) -> None:
    mapping = RelianceMapping(mode, low=0.1, high=0.9, quantile=0.3, constant=0.5)
    batch = IDS[[3, 17, 8, 0]]
    plain = SampleReliance(mapping, FakeSource(), IDS, seed=0)
    expected = mapping.sample_lambda(np.array([PERCENTILE[int(i)] for i in batch]))
    assert plain(batch, step=5).dtype == np.float32
    assert np.allclose(plain(batch, step=5), expected)

    shuffled = SampleReliance(mapping, FakeSource(), IDS, seed=0, control="shuffled")
    ids, partners = partner_map(IDS, seed=0)
    partner = dict(zip(ids.tolist(), partners.tolist(), strict=True))
    assert sorted(partners.tolist()) == IDS.tolist() and not np.array_equal(ids, partners)
    assert np.allclose(shuffled(batch, 5), mapping.sample_lambda(
        np.array([PERCENTILE[partner[int(i)]] for i in batch])))
    # Over the whole split the λ values are the same multiset, only reassigned.
    assert np.allclose(np.sort(shuffled(IDS, 5)), np.sort(plain(IDS, 5)))
    assert not np.allclose(shuffled(IDS, 5), plain(IDS, 5))
    other_seed = SampleReliance(mapping, FakeSource(), IDS, seed=1, control="shuffled")
    assert not np.allclose(other_seed(IDS, 5), shuffled(IDS, 5))

    matched = SampleReliance(mapping, FakeSource(), IDS, seed=0, schedule="matched")
    assert np.allclose(matched(batch, 5), np.full(4, expected.mean()))
    unknown = SampleReliance(mapping, FakeSource(unknown_after=1), IDS, seed=0)
    assert unknown(batch, 1).tolist() == [0.5] * 4  # no ranking yet: the constant λ


def test_linear_schedule() -> None:
    schedule = ScheduledLambda(0.1, 0.9, total_steps=11)
    assert [round(schedule.value(s), 6) for s in (1, 6, 11, 20)] == [0.1, 0.5, 0.9, 0.9]
    assert schedule(IDS[:3], 6).tolist() == pytest.approx([0.5] * 3)


def _micro() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    lp1 = torch.log(torch.tensor([0.9, 0.5, 0.1, 0.2, 0.8]))  # 2 samples: 3 + 2 tokens
    lp2 = torch.log(torch.tensor([0.3, 0.6, 0.6]))  # 1 sample: 3 tokens
    return [(lp1, torch.tensor([0, 0, 0, 1, 1]), 2), (lp2, torch.tensor([0, 0, 0]), 1)]


def test_token_reliance_and_its_controls() -> None:
    mapping = RelianceMapping("token", low=0.2, high=0.6)
    weights, means = TokenReliance(mapping, seed=0)(_micro(), step=3)
    p = [torch.tensor([0.9, 0.5, 0.1, 0.2, 0.8]), torch.tensor([0.3, 0.6, 0.6])]
    for w, probs in zip(weights, p, strict=True):
        assert torch.allclose(w, 0.2 + 0.4 * (1 - probs))  # λ_t = lo + (hi - lo)(1 - p_T)
    assert np.allclose(means, [0.2 + 0.4 * (1 - 0.5), 0.2 + 0.4 * (1 - 0.5),
                               0.2 + 0.4 * (1 - 0.5)])

    shuffled_w, shuffled_means = TokenReliance(mapping, seed=0, control="shuffled")(
        _micro(), step=3)
    for w, s in zip(weights, shuffled_w, strict=True):  # same values within each micro-batch
        assert torch.allclose(torch.sort(w).values, torch.sort(s).values)
    assert not all(torch.allclose(w, s) for w, s in zip(weights, shuffled_w, strict=True))
    again, _ = TokenReliance(mapping, seed=0, control="shuffled")(_micro(), step=3)
    assert all(torch.equal(a, b) for a, b in zip(again, shuffled_w, strict=True))
    assert shuffled_means.shape == (3,)

    matched_w, matched_means = TokenReliance(mapping, seed=0, schedule="matched")(
        _micro(), step=3)
    mean = float(torch.cat(weights).double().mean())  # token-weighted over the global batch
    assert all(torch.allclose(w, torch.full_like(w, mean)) for w in matched_w)
    assert np.allclose(matched_means, mean)


def problems(**options: object) -> str:
    """Every problem train-student reports for these options ("" when there is none)."""
    try:
        TrainConfig.from_options(cache=".", out="run", student="s", **options).validate()
    except ConfigError as exc:
        return str(exc)
    return ""


def test_invalid_combinations_are_reported_together() -> None:
    message = problems(pacing="root", order="anti", reliance="linear",
                       reliance_control="shuffled", kd_weight_schedule="linear",
                       kd_weight_low=1.5, curriculum_metric="x")
    for text in ("--pacing, --order, --curriculum-metric need --curriculum",
                 "--reliance linear maps the difficulty percentile",
                 "--kd-weight-schedule linear gives all samples the same λ",
                 "at most one control", "--kd-weight-low 1.5", "--curriculum-metric 'x'"):
        assert text in message, text
    message = problems(curriculum_source="snapshot", snapshots=False, reliance="token",
                       mode="ce", reliance_control="shuffled")
    assert "do not pass --no-snapshots" in message and "need --mode kd" in message
    assert "shuffled needs" not in message
    assert "matched averages selective" in problems(kd_weight_schedule="matched")
    assert problems(reliance="token") == ""
