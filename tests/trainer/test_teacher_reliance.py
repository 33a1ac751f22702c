"""The weight of each teacher per sample and per token equals its formula, for every mode,
level and control; bad confidences are refused, never turned into NaN weights."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.errors import CacheFormatError, ConfigError, NonFiniteError
from kdpipe.schemas.shard import NUM_TARGETS, SAMPLE_ID, TEACHER_NLL
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.curriculum_config import CurriculumConfig, setup_teacher_reliance
from kdpipe.trainer.distributed import RankSlice
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.reliance import partner_map
from kdpipe.trainer.teacher_reliance import (
    SampleNll,
    TeacherReliance,
    read_sample_nll,
    teacher_weights,
)

IDS = np.arange(100, 300, dtype=np.int64)  # the training split: 200 samples
RNG = np.random.default_rng(7)
NLL = np.stack([RNG.uniform(1.0, 4.0, IDS.size), RNG.uniform(1.0, 4.0, IDS.size)])  # (2, 200)
TARGETS = RNG.integers(1, 64, IDS.size)  # (200,) unequal target counts per sample
TABLE = SampleNll(IDS, NLL, TARGETS)
EQUAL = np.array([0.5, 0.5])


def sample_reliance(mode: str = "softmax", control: str = "none", seed: int = 0,
                    temperature: float = 0.5, prior: np.ndarray = EQUAL) -> TeacherReliance:
    return TeacherReliance(mode, "sample", temperature, prior, control=control, train_ids=IDS,
                           seed=seed, sample_nll=TABLE)


def test_softmax_formula_by_hand() -> None:
    nll = np.array([[1.0, 2.0], [2.0, 2.0]])  # (J=2, M=2)
    equal = teacher_weights(nll, EQUAL, "softmax", 1.0)
    # e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1); equal NLL: the prior
    assert np.allclose(equal, [[0.7310585786, 0.5], [0.2689414214, 0.5]])
    # the prior enters: 0.75 e^-2 / (0.75 e^-2 + 0.25 e^-4) = 3 / (3 + e^-2)
    weighted = teacher_weights(nll, np.array([0.75, 0.25]), "softmax", 0.5)
    assert np.allclose(weighted, [[0.9568354670, 0.75], [0.0431645330, 0.25]])
    assert teacher_weights(nll, EQUAL, "fixed", 1.0).tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_best_ties_share_in_proportion_to_the_prior() -> None:
    nll = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0], [1.0, 5.0, 1.0, 4.0]])
    prior = np.array([0.5, 0.25, 0.25])
    expected = [[2 / 3, 2 / 3, 0, 0], [0, 1 / 3, 0.5, 1], [1 / 3, 0, 0.5, 0]]
    assert np.allclose(teacher_weights(nll, prior, "best", 1.0), expected)
    # best is softmax's T -> 0 limit, ties included; T -> infinity gives back the prior
    assert np.allclose(teacher_weights(nll, prior, "softmax", 1e-300), expected)
    assert np.allclose(teacher_weights(nll, prior, "softmax", 1e12), prior[:, None])


def test_huge_weights_and_tiny_temperatures_neither_overflow_nor_warn() -> None:
    # 1e308 + 1e308 = inf: a plain sum would make every weight 0 (KD silently off)
    assert LossConfig(teacher_weights=(1e308, 1e308)).teacher_mix(2) == (0.5, 0.5)
    assert LossConfig(teacher_weights=(3e-320, 1e-320)).teacher_mix(2) == pytest.approx(
        (0.75, 0.25))
    nll = np.array([[1.0, 2.0, 3.0], [1e10, 2.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning: overflow
        for mode in ("softmax", "best"):
            rel = TeacherReliance(mode, "token", 1e-310, [1e308, 1e308])
            assert rel.prior.tolist() == [0.5, 0.5]
            weights, mean = rel.for_tokens([torch.tensor(-nll)], 1)
            assert weights[0].tolist() == [[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]
            assert np.isfinite(mean).all()


def test_a_teacher_without_prior_weight_never_gets_weight() -> None:
    nll = np.array([[5.0, 1.0], [0.0, 1.0]])  # teacher 2 is the more confident one
    prior = np.array([1.0, 0.0])
    for mode in ("softmax", "best", "fixed"):
        assert teacher_weights(nll, prior, mode, 1.0).tolist() == [[1.0, 1.0], [0.0, 0.0]]


@pytest.mark.parametrize("mode", ["fixed", "softmax", "best"])
def test_one_teacher_gets_weight_one(mode: str) -> None:
    table = SampleNll(IDS, NLL[:1], TARGETS)
    rel = TeacherReliance(mode, "sample", 1.0, [3.0], sample_nll=table)
    assert rel.for_samples(IDS[:5], 1).tolist() == [[1.0] * 5]
    tok = TeacherReliance(mode, "token", 1.0, [3.0])
    weights, mean = tok.for_tokens([torch.tensor([[-0.1, -2.0, -30.0]])], 1)
    assert weights[0].tolist() == [[1.0, 1.0, 1.0]] and mean.tolist() == [1.0]


@pytest.mark.parametrize("mode", ["fixed", "softmax", "best"])
def test_sample_weights_follow_the_table(mode: str) -> None:
    batch = IDS[[3, 150, 8, 0]]
    weights = sample_reliance(mode).for_samples(batch, step=4)
    assert weights.dtype == np.float32 and weights.shape == (2, 4)
    assert np.allclose(weights.sum(axis=0), 1.0)
    expected = teacher_weights(NLL[:, [3, 150, 8, 0]], EQUAL, mode, 0.5)
    assert np.allclose(weights, expected)
    if mode != "fixed":  # the more confident teacher gets more weight
        better = NLL[0, [3, 150, 8, 0]] < NLL[1, [3, 150, 8, 0]]
        assert ((weights[0] > 0.5) == better).all()


def test_shuffled_keeps_the_weight_vectors_and_breaks_their_link_to_confidence() -> None:
    plain = sample_reliance().for_samples(IDS, 1)  # (2, 200), IDS in order
    shuffled = sample_reliance(control="shuffled").for_samples(IDS, 1)
    # the same multiset of weight vectors over the split, reassigned
    assert np.allclose(np.sort(shuffled[0]), np.sort(plain[0]))
    assert np.allclose(shuffled.sum(axis=0), 1.0)
    assert not np.allclose(shuffled, plain)
    # sample i gets exactly the vector of its partner π(i)
    rel = sample_reliance(control="shuffled")
    assert rel.ids is not None and rel.partners is not None
    where = np.searchsorted(IDS, rel.partners)
    assert np.array_equal(shuffled, plain[:, where])
    # on its own stream: not the λ control's permutation
    assert not np.array_equal(rel.partners, partner_map(IDS, seed=0)[1])
    # teacher 1's weight follows its NLL advantage exactly without the control, not with it
    advantage = NLL[1] - NLL[0]
    assert np.corrcoef(np.argsort(np.argsort(advantage)),
                       np.argsort(np.argsort(plain[0])))[0, 1] > 0.99
    assert abs(np.corrcoef(advantage, shuffled[0])[0, 1]) < 0.3
    # deterministic in the seed, and the seed matters
    assert np.array_equal(sample_reliance(control="shuffled").for_samples(IDS, 9), shuffled)
    assert not np.allclose(sample_reliance(control="shuffled", seed=1).for_samples(IDS, 1),
                           shuffled)


@pytest.mark.parametrize("mode", ["softmax", "best"])
def test_matched_gives_every_sample_the_step_mean(mode: str) -> None:
    batch = IDS[[5, 60, 61, 199, 17]]
    plain = sample_reliance(mode).for_samples(batch, 2)
    matched = sample_reliance(mode, control="matched").for_samples(batch, 2)
    # the loss sums over tokens: the mean weights each sample by its number of targets, so
    # matched keeps the mean weight per teacher per token (what teacher_weight_j logs)
    targets = TARGETS[batch - IDS[0]].astype(np.float64)
    assert len(set(targets)) > 1
    per_token = (plain * targets).sum(axis=1) / targets.sum()
    assert np.allclose(matched, per_token[:, None].repeat(5, axis=1))
    assert not np.allclose(matched[:, 0], plain.mean(axis=1))
    assert np.allclose((matched * targets).sum(axis=1), (plain * targets).sum(axis=1))
    assert np.allclose(matched.sum(axis=0), 1.0)
    step = sample_reliance(mode).for_step(batch, 2, [])
    assert np.allclose(step.mean, per_token)


LOGPROBS = [torch.log(torch.tensor([[0.9, 0.5, 0.1, 0.2, 0.8], [0.3, 0.5, 0.6, 0.4, 0.2]])),
            torch.log(torch.tensor([[0.3, 0.6, 0.05], [0.6, 0.2, 0.05]]))]  # (J=2, N_m)


def test_token_softmax_is_the_posterior_over_teachers() -> None:
    weights, mean = TeacherReliance("softmax", "token", 1.0, EQUAL).for_tokens(LOGPROBS, 3)
    for w, lp in zip(weights, LOGPROBS, strict=True):
        p = lp.exp().double()
        assert w.dtype == torch.float32
        assert torch.allclose(w.double(), p / p.sum(dim=0), atol=1e-6)  # p_j / Σ_k p_k
    assert weights[0][0, 0].item() == pytest.approx(0.9 / 1.2)
    every = torch.cat(weights, dim=1).double()
    assert np.allclose(mean, every.mean(dim=1).numpy())  # token-weighted, over both
    best, _ = TeacherReliance("best", "token", 1.0, EQUAL).for_tokens(LOGPROBS, 3)
    assert best[0].tolist() == [[1, 0.5, 0, 0, 1], [0, 0.5, 1, 1, 0]]
    assert best[1].tolist() == [[0, 1, 0.5], [1, 0, 0.5]]  # a tie splits evenly


SAMPLES = [np.array([100, 100, 100, 101, 101]), np.array([102, 102, 102])]  # per target


def test_token_controls() -> None:
    plain, _ = TeacherReliance("softmax", "token", 1.0, EQUAL).for_tokens(LOGPROBS, 3)
    shuffle = TeacherReliance("softmax", "token", 1.0, EQUAL, control="shuffled", seed=4)
    shuffled, _ = shuffle.for_tokens(LOGPROBS, 3, SAMPLES)
    for p, s, ids in zip(plain, shuffled, SAMPLES, strict=True):  # permuted within a sample
        for sample in np.unique(ids):
            mine = torch.from_numpy(ids == sample)
            assert torch.allclose(torch.sort(p[0, mine]).values, torch.sort(s[0, mine]).values)
        assert torch.allclose(s.sum(dim=0), torch.ones(s.shape[1]))
    assert not all(torch.equal(p, s) for p, s in zip(plain, shuffled, strict=True))
    again, _ = shuffle.for_tokens(LOGPROBS, 3, SAMPLES)
    assert all(torch.equal(a, s) for a, s in zip(again, shuffled, strict=True))
    other = [shuffle.for_tokens(LOGPROBS, step, SAMPLES)[0][0] for step in range(4, 12)]
    assert any(not torch.equal(o, shuffled[0]) for o in other)  # a new permutation per step
    # the same tokens in other micro-batches (another --batch-size × --grad-accum, or other
    # processes) get the same weights
    split = [LOGPROBS[0][:, :3], LOGPROBS[0][:, 3:], LOGPROBS[1]]
    parts, _ = shuffle.for_tokens(split, 3, [SAMPLES[0][:3], SAMPLES[0][3:], SAMPLES[1]])
    assert torch.equal(torch.cat(parts, dim=1), torch.cat(shuffled, dim=1))
    with pytest.raises(ValueError, match="needs each target's sample id"):
        shuffle.for_tokens(LOGPROBS, 3)

    calls: list[list[float]] = []

    def sum_across(values: list[float]) -> list[float]:
        # another process whose 4 tokens all weigh (0.25, 0.75)
        calls.append(values)
        return [values[0] + 1.0, values[1] + 3.0, values[2] + 4.0]

    matched, mean = TeacherReliance("softmax", "token", 1.0, EQUAL, control="matched",
                                    sum_across=sum_across).for_tokens(LOGPROBS, 3)
    mine = torch.cat(plain, dim=1).double().sum(dim=1)  # (J,) this process's sums
    expected = (mine.numpy() + [1.0, 3.0]) / (8 + 4)
    assert len(calls) == 1 and np.allclose(mean, expected)
    for w in matched:
        assert torch.allclose(w, torch.from_numpy(expected).float()[:, None].expand_as(w))


@pytest.mark.parametrize("mode", ["fixed", "softmax", "best"])
def test_every_mode_sums_across_processes_once_per_step(mode: str) -> None:
    calls: list[list[float]] = []

    def one_process(values: list[float]) -> list[float]:
        calls.append(values)
        return values

    rel = TeacherReliance(mode, "token", 1.0, EQUAL, sum_across=one_process)
    rel.for_tokens(LOGPROBS, 1)
    _, mean = rel.for_tokens([], 2)  # a padding rank still takes part
    assert len(calls) == 2 and calls[1] == [0.0, 0.0, 0.0] and mean.tolist() == [0.5, 0.5]


def test_for_step_gives_each_process_its_share() -> None:
    batch = IDS[[0, 1, 2, 3, 4, 5]]
    rel = sample_reliance()
    every = rel.for_samples(batch, 1)
    share = RankSlice(batch[2:5], start=2, real=True, micro_batches=1)
    step = rel.for_step(batch, 1, [], share)
    assert step.per_sample is not None and np.array_equal(step.per_sample, every[:, 2:5])
    targets = TARGETS[batch - IDS[0]]
    assert np.allclose(step.mean, (every * targets).sum(axis=1) / targets.sum())  # per token
    # micro-batch rows start at sample 1 of this share: tokens of rows 0, 0, 1 → samples 3, 3, 4
    tokens = step.tokens(0, 1, torch.tensor([0, 0, 1]))
    assert torch.equal(tokens, torch.from_numpy(every[:, [3, 3, 4]]))
    padding = rel.for_step(batch, 1, [], RankSlice(batch[:1], 0, real=False, micro_batches=1))
    assert padding.per_sample is not None and padding.per_sample.tolist() == [[0.5], [0.5]]

    tok = TeacherReliance("softmax", "token", 1.0, EQUAL)
    step = tok.for_step(batch, 1, LOGPROBS)
    assert step.per_token is not None and step.per_sample is None
    assert torch.equal(step.tokens(1, 0, torch.zeros(3, dtype=torch.long)),
                       tok.for_tokens(LOGPROBS, 1)[0][1])


def test_non_finite_confidence_is_refused_not_weighted() -> None:
    nll = NLL.copy()
    nll[1, 7] = np.nan
    with pytest.raises(NonFiniteError, match=r"^b: teacher_nll of sample 107 is nan"):
        TeacherReliance("softmax", "sample", 1.0, EQUAL, sample_nll=SampleNll(IDS, nll, TARGETS),
                        names=["a", "b"])
    bad = [LOGPROBS[0], LOGPROBS[1].clone()]
    bad[1][0, 2] = -math.inf
    with pytest.raises(NonFiniteError, match="teacher 1: target_logprob of micro-batch 1, "
                                             "target 2 is inf"):
        TeacherReliance("best", "token", 1.0, EQUAL).for_tokens(bad, 1)
    for prior in ([0.0, 0.0], [1.0, -1.0], [math.nan, 1.0], []):
        with pytest.raises(ConfigError, match="--teacher-weight"):
            TeacherReliance("fixed", "sample", 1.0, prior)
    with pytest.raises(ConfigError, match="--teacher-reliance-temperature 0"):
        TeacherReliance("softmax", "token", 0.0, EQUAL)
    with pytest.raises(ValueError, match="no teacher_nll"):
        sample_reliance().for_samples(np.array([5]), 1)


class FakeCache:
    def __init__(self, ids: list[int], nll: list[float], location: str) -> None:
        self.columns = {SAMPLE_ID: pa.chunked_array([pa.array(ids, pa.int64())]),
                        TEACHER_NLL: pa.chunked_array([pa.array(nll, pa.float32())]),
                        NUM_TARGETS: pa.chunked_array([pa.array([10 * i for i in ids],
                                                                pa.int32())])}
        self.location = location

    def read_column(self, name: str) -> pa.ChunkedArray:
        return self.columns[name]


def test_read_sample_nll_aligns_by_sample_id() -> None:
    a = FakeCache([3, 1, 2], [0.5, 1.5, 2.5], "a")
    b = FakeCache([1, 2, 3], [1.0, 2.0, 3.0], "b")
    table = read_sample_nll([cast(Cache, a), cast(Cache, b)])
    assert table.sample_ids.tolist() == [1, 2, 3]
    assert table.nll.tolist() == [[1.5, 2.5, 0.5], [1.0, 2.0, 3.0]]
    assert table.num_targets.tolist() == [10, 20, 30]
    with pytest.raises(CacheFormatError, match="^c: holds other samples than a"):
        read_sample_nll([cast(Cache, a), cast(Cache, FakeCache([1, 2, 4], [1, 1, 1], "c"))])
    with pytest.raises(NonFiniteError, match="^d: teacher_nll of sample 2 is inf"):
        read_sample_nll([cast(Cache, FakeCache([1, 2], [1.0, math.inf], "d"))])


def test_setup_from_real_caches(tiny_cache: Path) -> None:
    cache = open_cache(tiny_cache)
    ids = np.sort(cache.read_column(SAMPLE_ID).to_numpy().astype(np.int64))
    cl = CurriculumConfig(teacher_reliance="best", teacher_reliance_control="shuffled")
    rel = setup_teacher_reliance(cl, [cache, cache], ids, (), seed=0)
    # the same teacher twice: every tie splits evenly, whatever the control
    assert np.array_equal(rel.for_samples(ids, 1), np.full((2, ids.size), 0.5, np.float32))
    assert rel.names == [str(cache.location)] * 2


def test_options_refused_with_one_line_each() -> None:
    assert CurriculumConfig().problems("kd", True) == []
    assert CurriculumConfig(teacher_reliance="softmax").problems("kd", True, teachers=2) == []
    lines = CurriculumConfig(teacher_reliance_level="token", teacher_reliance_control="matched",
                             teacher_reliance_temperature=2.0).problems("kd", True, teachers=2)
    assert lines == ["--teacher-reliance-level, --teacher-reliance-control need "
                     "--teacher-reliance softmax or best",
                     "--teacher-reliance-temperature is the T of --teacher-reliance softmax"]
    lines = CurriculumConfig(teacher_reliance_level="token").problems("kd", True, teachers=2)
    assert lines == ["--teacher-reliance-level needs --teacher-reliance softmax or best"]
    lines = CurriculumConfig(teacher_reliance="best").problems("ce", True, teachers=1)
    assert lines == ["--teacher-reliance best chooses between teachers: give one --cache per "
                     "teacher, two or more",
                     "--teacher-reliance best weighs the teachers' KD terms; it needs --mode kd"]
    with pytest.raises(ConfigError, match="--teacher-reliance-temperature"):
        TrainConfig.from_options(cache=".", out="run", student="s", teacher_reliance="softmax",
                                 teacher_reliance_temperature=0.0).validate()
    with pytest.raises(ConfigError, match="--teacher-reliance 'mean' is not one of"):
        TrainConfig.from_options(cache=".", out="run", student="s",
                                 teacher_reliance="mean").validate()
