"""The sampled-cache loss: an unbiased estimate of the cross-entropy to the teacher, wired
through the chunked loss and the trainer, and refused on the wrong kind of cache."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.chunked_loss import TeacherTargets, chunked_distill_loss
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.losses import sampled_cross_entropy
from kdpipe.trainer.train import train

from .conftest import small_config

V, N = 40, 50


def _dense_weights(drawn: torch.Tensor) -> torch.Tensor:
    """(R, N) draws -> (R, V) weights c_j / N over every id (zeros where not drawn)."""
    counts = torch.zeros(drawn.shape[0], V).scatter_add_(1, drawn, torch.ones_like(drawn,
                                                                                  dtype=torch.float))
    return counts / drawn.shape[1]


def test_estimator_is_unbiased_for_the_dense_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(V, generator=gen) * 2, dim=0)  # teacher
    log_q = torch.log_softmax(torch.randn(V, generator=gen), dim=0)  # student
    dense = -(p * log_q).sum()
    repeats = 4000  # independent caches of N draws each
    drawn = torch.multinomial(p.expand(repeats, V), N, replacement=True, generator=gen)
    estimates = sampled_cross_entropy(log_q.expand(repeats, V), _dense_weights(drawn))  # (R,)
    stderr = estimates.std() / math.sqrt(repeats)
    assert abs(float(estimates.mean() - dense)) < 4 * float(stderr)
    assert float(stderr) < 0.02 * float(dense)  # the test has power


def test_chunked_loss_uses_the_sampled_ids() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    head = torch.nn.Linear(8, V, bias=False)
    labels = torch.randint(0, V, (6,))
    ids = torch.randint(0, V, (6, 3))
    weights = torch.tensor([[0.5, 0.3, 0.2]] * 5 + [[1.0, 0.0, 0.0]])
    teacher = TeacherTargets(topk_ids=ids[:, :1], topk_logprobs=weights[:, :1].log(),
                             tail_logmass=torch.log1p(-weights[:, 0]), sampled_ids=ids,
                             sampled_weights=weights)
    lam = torch.full((6,), 0.5)
    out = chunked_distill_loss(hidden, head, labels, lam, LossConfig(kind="sampled",
                                                                     chunk_size=4),
                               teacher, V)
    log_q = torch.log_softmax(head(hidden), dim=-1)
    kd = -(weights * log_q.gather(1, ids)).sum(1)
    ce = -log_q.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(out.kd, kd.sum())
    torch.testing.assert_close(out.total, (0.5 * ce + 0.5 * kd).sum())
    out.total.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    with pytest.raises(ConfigError, match="--loss sampled"):
        chunked_distill_loss(hidden, head, labels, lam, LossConfig(kind="forward"), teacher, V)
    topk = TeacherTargets(topk_ids=ids, topk_logprobs=torch.full((6, 3), -2.0),
                          tail_logmass=torch.full((6,), -1.0))
    with pytest.raises(ConfigError, match="needs a sampled cache"):
        chunked_distill_loss(hidden, head, labels, lam, LossConfig(kind="sampled"), topk, V)
    with pytest.raises(ConfigError, match="τ = 1"):
        LossConfig(kind="sampled", temperature=2.0).validate()


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path,
                  trainer_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("sampled-cache")
    cache_teacher(CacheTeacherConfig(
        teacher=str(tiny_teacher_dir), data=(str(trainer_corpus),), out=out, device="cpu",
        batch_size=16, top_k=8, max_length=64, shard_size=16, cache_mode="sampled",
        samples=N))
    return out


def test_sampled_cache_trains_and_evaluates(tmp_path: Path, sampled_cache: Path,
                                            tiny_cache: Path, tiny_student_dir: Path) -> None:
    # No --loss: a sampled cache calls for the sampled loss, in training and evaluation.
    run = train(small_config(sampled_cache, tmp_path / "run", student=str(tiny_student_dir),
                             max_steps=4, eval_fraction=0.2))
    assert run["step"] == 4 and math.isfinite(run["eval_kd"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["kind"] == \
        "sampled"
    result = evaluate(EvalConfig.from_options(
        student=str(tiny_student_dir), cache=str(sampled_cache), batch_size=16, chunk_size=64,
        device="cpu", progress=False))
    assert result["loss_kind"] == "sampled"
    assert math.isfinite(result["kd"]) and result["kd"] > 0 and 0 <= result["top1_agreement"] <= 1
    # Without --loss the loss follows the cache; a loss that does not suit it is refused.
    assert small_config(sampled_cache, tmp_path / "a").with_cache_defaults().loss.kind == "sampled"
    assert small_config(tiny_cache, tmp_path / "a").with_cache_defaults().loss.kind == "forward"
    with pytest.raises(ConfigError, match="use --loss sampled"):
        small_config(sampled_cache, tmp_path / "bad", student=str(tiny_student_dir),
                     loss="forward").validate()
    with pytest.raises(ConfigError, match="needs a sampled cache"):
        small_config(tiny_cache, tmp_path / "bad", student=str(tiny_student_dir),
                     loss="sampled").validate()
    with pytest.raises(ConfigError, match="use --loss sampled"):
        EvalConfig.from_options(student=str(tiny_student_dir), cache=str(sampled_cache),
                   loss="forward").validate()
    # CE-only training ignores the teacher columns: any cache works.
    small_config(sampled_cache, tmp_path / "ce", student=str(tiny_student_dir),
                 mode="ce").validate()
    # Evaluation reports the KD term, so a held-out cache or split must suit --loss too,
    # refused before training rather than at the first evaluation.
    with pytest.raises(ConfigError, match="--eval-cache .* is sampled"):
        small_config(tiny_cache, tmp_path / "bad", student=str(tiny_student_dir),
                     eval_cache=str(sampled_cache)).validate()
    # A sampled and a top-k teacher: no --loss suits both, so no --loss is advised.
    for caches in ((sampled_cache, tiny_cache), (tiny_cache, sampled_cache)):
        with pytest.raises(ConfigError) as refused:
            replace(small_config(caches[0], tmp_path / "bad", student=str(tiny_student_dir)),
                    cache=tuple(map(str, caches))).validate()
        assert "cache them all with the same --cache-mode" in str(refused.value)
        assert "use --loss" not in str(refused.value)
        with pytest.raises(ConfigError) as refused:
            EvalConfig.from_options(student=str(tiny_student_dir),
                                    cache=tuple(map(str, caches))).validate()
        assert "use --loss" not in str(refused.value)
    with pytest.raises(ConfigError, match="--cache .* is sampled"):
        small_config(sampled_cache, tmp_path / "bad", student=str(tiny_student_dir),
                     mode="ce", eval_fraction=0.2, loss="forward").validate()
