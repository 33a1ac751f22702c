"""Several teachers in one run: caches that align (or are refused), lockstep loading, training
with per-teacher metrics, evaluate, resume, and torchrun."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from transformers import PreTrainedTokenizerFast

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas import shard_reader
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.cache_alignment import alignment_difference
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import build_index, columns_for
from kdpipe.trainer.config import EvalConfig, TrainConfig, read_config, write_config
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.memory_plan import dry_run
from kdpipe.trainer.preemption import Interrupted
from kdpipe.trainer.sampler import ShuffleSampler
from kdpipe.trainer.teachers import per_token
from kdpipe.trainer.train import train

from ..conftest import run_cli, save_tiny_llama, train_tiny_tokenizer
from .conftest import CORPUS_MODULES, STDLIB, TAIL_TEMPERATURE, small_config
from .test_distributed import _flags, assert_same_training, torchrun
from .test_preemption import SignalAtStep


def _cache(out: Path, teacher: Path, corpus: Path, **options: Any) -> Path:
    settings: dict[str, Any] = dict(device="cpu", batch_size=16, top_k=8, max_length=64,
                                    shard_size=16)
    settings.update(options)
    cache_teacher(CacheTeacherConfig(teacher=str(teacher), data=(str(corpus),), out=out,
                                     **settings))
    return out


def _corpus(path: Path, texts: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _config(caches: tuple[Any, ...], out: Path, **options: Any) -> TrainConfig:
    """conftest.small_config with several --cache."""
    return replace(small_config(caches[0], out, **options), cache=tuple(map(str, caches)))


def _texts() -> list[str]:
    """The trainer fixtures' corpus (conftest.trainer_corpus)."""
    return [(STDLIB / name).read_text(encoding="utf-8")[:700] for name in CORPUS_MODULES]


@pytest.fixture(scope="module")
def teacher_b(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A second tiny teacher (other weights, wider) with the same tokenizer."""
    out = tmp_path_factory.mktemp("teacher-b")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    save_tiny_llama(out, vocab_size=len(tokenizer), seed=5, hidden=48)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cache_b(tmp_path_factory: pytest.TempPathFactory, teacher_b: Path, trainer_corpus: Path
            ) -> Path:
    """Teacher B over tiny_cache's corpus: the same shards, another k and encoding."""
    return _cache(tmp_path_factory.mktemp("cache-b"), teacher_b, trainer_corpus, top_k=5,
                  encoding="compact", tail_temperatures=(TAIL_TEMPERATURE,))


@pytest.fixture(scope="module")
def cache_b_relaid(tmp_path_factory: pytest.TempPathFactory, teacher_b: Path,
                   trainer_corpus: Path) -> Path:
    """Teacher B over the same corpus in shards of 24: the token hashes cannot be compared."""
    return _cache(tmp_path_factory.mktemp("cache-b-relaid"), teacher_b, trainer_corpus,
                  shard_size=24)


def test_caches_of_one_corpus_align_whatever_their_layout(tiny_cache: Path, cache_b: Path,
                                                          cache_b_relaid: Path) -> None:
    a = build_index(open_cache(tiny_cache))
    assert alignment_difference(a, build_index(open_cache(cache_b))) is None
    relaid = build_index(open_cache(cache_b_relaid))
    assert len(relaid.groups) != len(a.groups)
    assert alignment_difference(a, relaid) is None


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory: pytest.TempPathFactory, teacher_b: Path) -> dict[str, Path]:
    """Caches refused next to tiny_cache: fewer documents (other sample ids), one document
    changed (other input_ids), another tokenizer."""
    root = tmp_path_factory.mktemp("misaligned")
    texts = _texts()
    changed = [texts[0].replace("e", "o", 3), *texts[1:]]
    tokenizer = root / "tokenizer"
    train_tiny_tokenizer(tokenizer, vocab_size=300)
    other_teacher = save_tiny_llama(root / "teacher", vocab_size=300, seed=2)
    PreTrainedTokenizerFast.from_pretrained(tokenizer).save_pretrained(other_teacher)
    return {
        "sample ids": _cache(root / "fewer", teacher_b, _corpus(root / "fewer.jsonl",
                                                                texts[:-2])),
        "input_ids": _cache(root / "changed", teacher_b, _corpus(root / "changed.jsonl",
                                                                 changed)),
        "tokenizer": _cache(root / "tokenizer-cache", other_teacher,
                            _corpus(root / "same.jsonl", texts)),
    }


@pytest.mark.parametrize(("case", "message"), [
    ("sample ids", r"sample id \d+ is in the (first|second) cache only"),
    ("input_ids", r"(sample id \d+ has other (input_ids|target positions)|"
                  r"shard-\d+\.parquet holds other input_ids)"),
    ("tokenizer", "their tokenizers map ids differently"),
])
def test_caches_that_do_not_align_are_refused_before_any_write(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
        misaligned: dict[str, Path], case: str, message: str) -> None:
    out = tmp_path / "run"
    cfg = _config((tiny_cache, misaligned[case]), out, student=str(tiny_student_dir))
    with pytest.raises(ConfigError, match=message) as info:
        train(cfg)
    text = str(info.value)
    assert "\n" not in text
    assert f"--cache {misaligned[case]} does not cover the same sequences as --cache " \
           f"{tiny_cache}" in text
    assert not out.exists()
    # the manifests show each of these: --dry-run refuses them with one line alike (naming
    # what the manifests show: numbers of sequences or tokens, a shard's tokens_sha256)
    with pytest.raises(ConfigError) as planned:
        dry_run(cfg)
    assert "\n" not in str(planned.value)
    assert str(planned.value).split(": ")[0] == text.split(": ")[0]
    assert str(planned.value).endswith("(docs/training.md, \"Several teachers\")")
    assert not out.exists()
    # evaluate refuses them alike
    with pytest.raises(ConfigError, match=message):
        evaluate(EvalConfig(student=str(tiny_student_dir), device="cpu",
                            cache=(str(tiny_cache), str(misaligned[case]))))


def test_options_of_several_caches_are_checked(tmp_path: Path, tiny_cache: Path,
                                               cache_b: Path, tiny_student_dir: Path) -> None:
    both = (str(tiny_cache), str(cache_b))
    with pytest.raises(ConfigError, match="give one --teacher-weight per --cache, in the same "
                                          "order: 2 --cache but 3 --teacher-weight"):
        train(_config(both, tmp_path / "a", student=str(tiny_student_dir),
                      teacher_weight=(1.0, 1.0, 1.0)))
    with pytest.raises(ConfigError, match="the weights are all 0"):
        train(_config(both, tmp_path / "b", student=str(tiny_student_dir),
                      teacher_weight=(0.0, 0.0)))
    with pytest.raises(ConfigError) as refused:
        train(_config(both, tmp_path / "b", student=str(tiny_student_dir),
                      teacher_weight=(1.0, -2.0)))
    assert "--teacher-weight -2.0 must be >= 0" in str(refused.value)
    assert "all 0" not in str(refused.value)  # only the real problem
    with pytest.raises(ConfigError, match="give one --eval-cache per --cache"):
        train(_config(both, tmp_path / "c", student=str(tiny_student_dir),
                      eval_cache=str(cache_b)))
    with pytest.raises(ConfigError, match=f"--eval-cache {cache_b} was made by teacher .*, but "
                                          f"--cache {tiny_cache} \\(teacher 1\\) by "):
        train(_config(both, tmp_path / "e", student=str(tiny_student_dir),
                      eval_cache=(str(cache_b), str(tiny_cache))))
    assert not (tmp_path / "e").exists()
    with pytest.raises(ConfigError, match="give --cache PATH"):
        train(replace(small_config(tiny_cache, tmp_path / "d", student=str(tiny_student_dir)),
                      cache=()))


def test_dry_run_plans_the_fused_head_of_several_teachers(tmp_path: Path, tiny_cache: Path,
                                                         cache_b: Path,
                                                         tiny_student_dir: Path) -> None:
    one = dry_run(small_config(tiny_cache, tmp_path / "a", student=str(tiny_student_dir)))
    both = dry_run(_config((tiny_cache, cache_b), tmp_path / "a",
                           student=str(tiny_student_dir)))
    assert one.head_chunks.how.startswith("fused: 1 ×")
    assert both.head_chunks.how.startswith("fused: 2 ×")  # the logits kept for teacher 2
    assert not (tmp_path / "a").exists()


def _decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    """Count row-group decodes per (cache, row group) from now on."""
    counts: Counter[tuple[str, int]] = Counter()
    original = shard_reader.RowGroupReader.get

    def counting(self: shard_reader.RowGroupReader, group: int) -> Any:
        if group not in self.groups:
            counts[(self.index.cache.location, group)] += 1
        return original(self, group)

    monkeypatch.setattr(shard_reader.RowGroupReader, "get", counting)
    return counts


def test_the_caches_are_read_in_lockstep_once_per_row_group(
        monkeypatch: pytest.MonkeyPatch, tiny_cache: Path, cache_b: Path,
        cache_b_relaid: Path) -> None:
    a, b = build_index(open_cache(tiny_cache)), build_index(open_cache(cache_b))
    cols_a = columns_for(a.cache, teacher=True, temperature=2.0)
    cols_b = columns_for(b.cache, teacher=True, temperature=2.0, target_logprob=True)
    order = ShuffleSampler(a, a.sample_ids, seed=3, window=2).epoch_order(0)
    counts = _decodes(monkeypatch)
    with BatchLoader(a, order, cols_a, 4, 2, cached_groups=2, others=[(b, cols_b)]) as loader:
        together = list(loader)
    # Each row group of each cache decoded once: the windows of the first cache's layout fit
    # the second's LRU as well when the layouts are the same.
    assert set(counts.values()) == {1}
    assert len(counts) == len(a.groups) + len(b.groups)
    with BatchLoader(b, order, cols_b, 4, 2, cached_groups=2) as loader:
        alone = list(loader)
    for one, other in zip(together, alone, strict=True):
        for mb, mb_b in zip(one.micro, other.micro, strict=True):
            assert mb.sample_ids.tolist() == mb_b.sample_ids.tolist()
            (t,) = mb.other_teachers
            assert mb_b.teacher is not None and t.target_logprob is not None
            for x, y in ((t.topk_ids, mb_b.teacher.topk_ids),
                         (t.topk_logprobs, mb_b.teacher.topk_logprobs),
                         (t.tempered_tail_logmass, mb_b.teacher.tempered_tail_logmass),
                         (t.target_logprob, mb_b.target_logprob)):
                assert x is not None and y is not None and x.equal(y)
            assert t.topk_ids.shape[1] == 5 and mb.teacher is not None \
                and mb.teacher.topk_ids.shape[1] == 8
    # Another layout and decode workers: the same rows (the teacher ran on other batches of
    # sequences there, so its log-probs agree up to rounding).
    relaid = build_index(open_cache(cache_b_relaid))
    cols_r = columns_for(relaid.cache, teacher=True, temperature=2.0, target_logprob=True)
    with BatchLoader(a, order, cols_a, 4, 2, cached_groups=2, workers=1,
                     others=[(relaid, cols_r)]) as loader:
        for one, other in zip(loader, together, strict=True):
            for mb, mb_b in zip(one.micro, other.micro, strict=True):
                got, expected = (m.other_teachers[0].target_logprob for m in (mb, mb_b))
                assert got is not None and expected is not None
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in RunLayout(run).metrics.read_text().splitlines()]


def test_two_teachers_train_with_per_teacher_metrics(
        tmp_path: Path, tiny_cache: Path, cache_b: Path, tiny_student_dir: Path,
        teacher_curriculum: Path) -> None:
    both = (str(tiny_cache), str(cache_b))
    final = train(_config(both, tmp_path / "mix", student=str(tiny_student_dir),
                          teacher_weight=(7.0, 3.0), eval_fraction=0.25, eval_every=3,
                          curriculum=str(teacher_curriculum), pacing="linear"))
    records = _metrics(tmp_path / "mix")
    assert {r["split"] for r in records} == {"train", "eval"}
    for r in records:  # KD is the weighted mean of the teachers' KD (fixed weights)
        assert r["kd"] == pytest.approx(0.7 * r["kd_teacher_1"] + 0.3 * r["kd_teacher_2"],
                                        rel=1e-5)
        if r["split"] == "train":
            assert (r["teacher_weight_1"], r["teacher_weight_2"]) == pytest.approx((0.7, 0.3))
        assert r["kd_teacher_1"] != pytest.approx(r["kd_teacher_2"], rel=1e-3)
    assert "eval_kd_teacher_2" in final and "train_kd_teacher_1" in final
    assert read_config(tmp_path / "mix").cache == both

    # Weights (1, 0): exactly teacher 1's run, which also logs no per-teacher KD.
    one = train(small_config(tiny_cache, tmp_path / "one", student=str(tiny_student_dir),
                             eval_fraction=0.25))
    first = train(_config(both, tmp_path / "first", student=str(tiny_student_dir),
                          teacher_weight=(1.0, 0.0), eval_fraction=0.25))
    assert "train_kd_teacher_1" not in one
    for key in ("train_loss", "train_kd", "eval_ce", "eval_kd"):
        assert first[key] == pytest.approx(one[key], rel=1e-5), key
    assert first["train_kd_teacher_1"] == pytest.approx(one["train_kd"], rel=1e-5)

    # evaluate: per-teacher KD; teacher 1's equals a one-cache evaluation.
    student = str(RunLayout(tmp_path / "mix").final)
    alone = evaluate(EvalConfig(student=student, cache=str(tiny_cache), device="cpu"))
    mixed = evaluate(EvalConfig.from_options(student=student, cache=both, device="cpu",
                                             teacher_weight=(7.0, 3.0)))
    assert mixed["kd_teacher_1"] == pytest.approx(alone["kd"], rel=1e-5)
    assert mixed["kd"] == pytest.approx(0.7 * mixed["kd_teacher_1"]
                                        + 0.3 * mixed["kd_teacher_2"], rel=1e-5)
    assert mixed["cache"] == list(both) and alone["cache"] == str(tiny_cache)


def test_a_one_cache_run_folder_of_before_still_resumes(tmp_path: Path, tiny_cache: Path,
                                                        tiny_student_dir: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir))
    (tmp_path / "run").mkdir()
    write_config(tmp_path / "run", cfg)
    layout = RunLayout(tmp_path / "run")
    data = json.loads(layout.config.read_text())
    assert data["cache"] == [str(tiny_cache)] and data["eval_cache"] == []
    data["cache"], data["eval_cache"] = str(tiny_cache), None  # as written before
    layout.config.write_text(json.dumps(data))
    assert read_config(tmp_path / "run") == cfg


def test_equivalent_teacher_weights_are_no_change_on_resume(
        tmp_path: Path, tiny_cache: Path, cache_b: Path, tiny_student_dir: Path) -> None:
    both = (tiny_cache, cache_b)

    def config(**options: Any) -> TrainConfig:
        return _config(both, tmp_path / "run", student=str(tiny_student_dir),
                       **{"max_steps": 2, **options})

    assert config(teacher_weight=(0.5, 0.5)).changed_fields(config()) == []
    assert config(teacher_weight=(1.0, 3.0)).changed_fields(
        config(teacher_weight=(2.0, 6.0))) == []
    assert config(teacher_weight=(1.0, 3.0)).changed_fields(
        config(teacher_weight=(3.0, 1.0))) == ["teacher_weight"]
    # a run made with the default equal weights resumes with them spelled out
    made = train(config())
    resumed = train(config(teacher_weight=(0.5, 0.5), max_steps=3, resume=True))
    assert made["step"] == 2 and resumed["step"] == 3


def test_two_teachers_resume_exactly_after_a_kill(tmp_path: Path, tiny_cache: Path,
                                                  cache_b: Path, tiny_student_dir: Path) -> None:
    cfg = _config((tiny_cache, cache_b), tmp_path / "full", student=str(tiny_student_dir),
                  teacher_weight=(0.4, 0.6), max_steps=8, eval_fraction=0.25,
                  temperature=TAIL_TEMPERATURE)
    uninterrupted = train(cfg, lambda_fn=SignalAtStep(at=-1))
    stopped = replace(cfg, out=str(tmp_path / "stopped"))
    with pytest.raises(Interrupted):
        train(stopped, lambda_fn=SignalAtStep(at=3))
    resumed = train(replace(stopped, resume=True), lambda_fn=SignalAtStep(at=-1))
    for key in ("train_loss", "train_kd_teacher_1", "train_kd_teacher_2", "eval_kd",
                "eval_kd_teacher_2"):
        assert resumed[key] == uninterrupted[key], key

    def strip(run: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _metrics(run)]

    assert strip(Path(stopped.out)) == strip(Path(cfg.out))


@pytest.mark.parametrize("options", [
    {"teacher_weight": (0.3, 0.7)},
    {"teacher_reliance": "softmax", "teacher_reliance_level": "token",
     "teacher_reliance_control": "matched"},  # a collective per step
], ids=["fixed", "token-matched"])
def test_two_teachers_on_two_processes_train_like_one(tmp_path: Path, tiny_cache: Path,
                                                      cache_b: Path, tiny_student_dir: Path,
                                                      options: dict[str, Any]) -> None:
    one = tmp_path / "one"
    train(_config((tiny_cache, cache_b), one, student=str(tiny_student_dir), batch_size=4,
                  max_steps=None, epochs=1, eval_fraction=0.2, eval_every=4, **options))
    many = tmp_path / "many"
    flags = {k: v for k, v in options.items() if k != "teacher_weight"}
    args = _flags(tiny_cache, many, tiny_student_dir, batch_size=1, grad_accum=2, epochs=1,
                  eval_every=4, **flags)
    args += ["--cache", str(cache_b)]
    for weight in options.get("teacher_weight", ()):
        args += ["--teacher-weight", str(weight)]
    torchrun(args)
    assert_same_training(one, many, rel=1e-5)
    assert "kd_teacher_2" in _metrics(many)[-1]
    assert json.loads(RunLayout(many).final_metrics.read_text())["world_size"] == 2
    shutil.rmtree(many)


class MostConfident:
    """Per sample, all weight on the teacher with the highest mean log p_T(y): a per-sample
    TeacherWeightsFn reading each teacher's target_logprob, as reliance across teachers
    does."""

    target_logprob = True

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.samples: list[int] = []

    def for_step(self, global_ids: Any, step: int, batch: Any, share: Any = None) -> Any:
        self.steps.append(step)
        self.samples += [int(i) for mb in batch.micro for i in mb.sample_ids]
        weights = [self._weights(mb) for mb in batch.micro]

        class Step:
            def tokens(self, micro: int, first_row: int, target_row: torch.Tensor
                       ) -> torch.Tensor:
                return weights[micro].to(target_row.device)

        return Step()

    @staticmethod
    def _weights(mb: Any) -> torch.Tensor:
        rows = mb.sample_ids.numel()
        scores = []
        for teacher in mb.teachers:
            assert teacher.target_logprob is not None
            sums = torch.zeros(rows).index_add_(0, mb.target_row, teacher.target_logprob)
            scores.append(sums / torch.bincount(mb.target_row, minlength=rows).clamp(min=1))
        best = torch.stack(scores).argmax(0)  # (B,)
        per_sample = F.one_hot(best, len(scores)).t().float()  # (J, B)
        return per_token(per_sample, mb.target_row)


def test_a_teacher_weights_function_plugs_in(tmp_path: Path, tiny_cache: Path, cache_b: Path,
                                             tiny_student_dir: Path) -> None:
    weights = MostConfident()
    cfg = _config((tiny_cache, cache_b), tmp_path / "run", student=str(tiny_student_dir),
                  max_steps=3, grad_accum=2)
    final = train(cfg, teacher_weights=weights)
    assert weights.steps == [1, 2, 3] and len(weights.samples) == 3 * 2 * 4
    assert final["train_kd"] != pytest.approx(0.5 * final["train_kd_teacher_1"]
                                              + 0.5 * final["train_kd_teacher_2"], rel=1e-4)


@pytest.mark.parametrize("options", [
    dict(teacher_reliance="best", teacher_reliance_level="token"),
    dict(teacher_reliance="softmax", teacher_reliance_control="shuffled"),
])
def test_teacher_reliance_options_weigh_the_teachers(tmp_path: Path, tiny_cache: Path,
                                                     cache_b: Path, tiny_student_dir: Path,
                                                     options: dict[str, Any]) -> None:
    fixed = train(_config((tiny_cache, cache_b), tmp_path / "fixed",
                          student=str(tiny_student_dir), max_steps=3))
    relied = train(_config((tiny_cache, cache_b), tmp_path / "relied",
                           student=str(tiny_student_dir), max_steps=3, **options))
    assert relied["train_loss"] != pytest.approx(fixed["train_loss"], rel=1e-6)
    for r in _metrics(tmp_path / "relied"):  # no longer the equal mix of the teachers' KD
        assert r["kd"] != pytest.approx(0.5 * (r["kd_teacher_1"] + r["kd_teacher_2"]),
                                        rel=1e-6)
        assert r["teacher_weight_1"] + r["teacher_weight_2"] == pytest.approx(1.0)
        assert r["teacher_weight_1"] != pytest.approx(0.5, abs=1e-6)


def test_token_shuffled_control_does_not_depend_on_the_batch_split(
        tmp_path: Path, tiny_cache: Path, cache_b: Path, tiny_student_dir: Path) -> None:
    options = dict(teacher_reliance="softmax", teacher_reliance_level="token",
                   teacher_reliance_control="shuffled", max_steps=2, student=str(tiny_student_dir))
    whole = train(_config((tiny_cache, cache_b), tmp_path / "whole", batch_size=8, **options))
    split = train(_config((tiny_cache, cache_b), tmp_path / "split", batch_size=4, grad_accum=2,
                          **options))
    for key in ("train_loss", "train_kd", "train_kd_teacher_1", "train_kd_teacher_2"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5), key


def test_the_commands_take_several_caches(tmp_path: Path, tiny_cache: Path, cache_b: Path,
                                          tiny_student_dir: Path, misaligned: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(["train-student", "--cache", str(tiny_cache), "--cache",
                            str(misaligned["input_ids"]), "--student", str(tiny_student_dir),
                            "--out", str(out), "--device", "cpu", "--no-progress"], capsys)
    assert code != 0 and "does not cover the same sequences" in err
    assert len([line for line in err.splitlines() if "sequences" in line]) == 1
    assert not out.exists()
    code, stdout, _ = run_cli(["evaluate", "--student", str(tiny_student_dir), "--cache",
                               str(tiny_cache), "--cache", str(cache_b), "--teacher-weight",
                               "1", "--teacher-weight", "3", "--device", "cpu"], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["teacher_weight"] == pytest.approx([0.25, 0.75])  # what `kd` mixed
    assert result["kd"] == pytest.approx(0.25 * result["kd_teacher_1"]
                                         + 0.75 * result["kd_teacher_2"], rel=1e-5)
