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
    shuffle_within_samples,
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


def _micro() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    lp1 = torch.log(torch.tensor([0.9, 0.5, 0.1, 0.2, 0.8]))  # 2 samples: 3 + 2 tokens
    lp2 = torch.log(torch.tensor([0.3, 0.6, 0.6]))  # 1 sample: 3 tokens
    return [(lp1, torch.tensor([0, 0, 0, 1, 1]), torch.tensor([100, 101])),
            (lp2, torch.tensor([0, 0, 0]), torch.tensor([102]))]


def test_token_reliance_and_its_controls() -> None:
    mapping = RelianceMapping("token", low=0.2, high=0.6)
    weights, means = TokenReliance(mapping, seed=0)(_micro(), step=3)
    p = [torch.tensor([0.9, 0.5, 0.1, 0.2, 0.8]), torch.tensor([0.3, 0.6, 0.6])]
    for w, probs in zip(weights, p, strict=True):
        assert torch.allclose(w, 0.2 + 0.4 * (1 - probs))  # λ_t = lo + (hi - lo)(1 - p_T)
    assert np.allclose(means, [0.2 + 0.4 * (1 - 0.5), 0.2 + 0.4 * (1 - 0.5),
                               0.2 + 0.4 * (1 - 0.5)])

    shuffle = TokenReliance(mapping, seed=0, control="shuffled")
    shuffled_w, shuffled_means = shuffle(_micro(), step=3)
    for w, s, (_, row, _) in zip(weights, shuffled_w, _micro(), strict=True):
        for r in row.unique():  # each sample keeps its own λ_t, permuted over its targets
            mine = row == r
            assert torch.equal(torch.sort(w[mine]).values, torch.sort(s[mine]).values)
    assert np.allclose(shuffled_means, means)  # and so its mean λ
    again, _ = TokenReliance(mapping, seed=0, control="shuffled")(_micro(), step=3)
    assert all(torch.equal(a, b) for a, b in zip(again, shuffled_w, strict=True))
    steps = [torch.cat(shuffle(_micro(), step)[0]) for step in range(3, 11)]
    assert any(not torch.equal(s, steps[0]) for s in steps)  # a new permutation per step
    assert any(not torch.equal(s, torch.cat(weights)) for s in steps)
    other_seed = TokenReliance(mapping, seed=1, control="shuffled")
    assert any(not torch.equal(torch.cat(other_seed(_micro(), step)[0]), s)
               for step, s in zip(range(3, 11), steps, strict=True))
    # the same samples split into other micro-batches (another --batch-size × --grad-accum,
    # or other processes) get the same λ_t
    (lp1, _, _), second = _micro()
    split = [(lp1[:3], torch.tensor([0, 0, 0]), torch.tensor([100])),
             (lp1[3:], torch.tensor([0, 0]), torch.tensor([101])), second]
    parts, part_means = shuffle(split, step=3)
    assert torch.equal(torch.cat(parts), torch.cat(shuffled_w))
    assert np.array_equal(part_means, shuffled_means)

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


def test_shuffle_within_samples_permutes_each_sample_by_its_own_seed() -> None:
    values = np.arange(14, dtype=np.float64).reshape(2, 7)  # (J, N): columns move together
    samples = np.array([5, 5, 5, 9, 9, 9, 9])
    out = shuffle_within_samples(values, samples, (0, 1, 2))
    assert np.array_equal(out[1] - out[0], np.full(7, 7.0))
    for sample in (5, 9):
        mine = samples == sample
        assert sorted(out[0, mine]) == sorted(values[0, mine])
        alone = shuffle_within_samples(values[:, mine], samples[mine], (0, 1, 2))
        assert np.array_equal(alone, out[:, mine])  # whatever else shares the batch
    assert np.array_equal(shuffle_within_samples(values, samples, (0, 1, 2)), out)
    keyed = [shuffle_within_samples(values, samples, (0, 1, k)) for k in range(3, 12)]
    assert any(not np.array_equal(k, out) for k in keyed)
    with pytest.raises(ValueError, match="expected 7 target sample ids"):
        shuffle_within_samples(values, samples[:3], (0, 1, 2))
