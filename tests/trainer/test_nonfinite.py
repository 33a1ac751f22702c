"""No NaN is trained on or saved with exit 0: options, cached values, losses and gradients."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe.cli import main
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import CacheFormatError, ConfigError, NonFiniteError
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import read_manifest, write_manifest
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer import checkpoint as ckpt
from kdpipe.trainer import train as train_module
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.train import train

from .conftest import small_config


def one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("kdpipe: error:") and "\n" not in error, error
    return error


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--temperature", "inf"),
                                         ("--weight-decay", "nan"), ("--max-grad-norm", "nan"),
                                         ("--kd-weight", "nan")])
def test_nonfinite_train_options_are_refused(flag: str, value: str, tmp_path: Path,
                                              tiny_cache: Path, tiny_student_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    error = one_line_error(["train-student", "--cache", str(tiny_cache), "--out", str(run),
                            "--student", str(tiny_student_dir), "--device", "cpu",
                            flag, value], capsys)
    assert f"{flag} {value}: must be a finite number" in error
    assert not run.exists()


@pytest.mark.parametrize("flag, value, bounds", [("--temperature", "1e-40", "[0.05, 100]"),
                                                 ("--lr", "1e38", "(0, 1]")])
def test_finite_but_absurd_options_are_refused(flag: str, value: str, bounds: str,
                                               tmp_path: Path, tiny_cache: Path,
                                               tiny_student_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """τ = 1e-40 turns every logit into ±inf (KD silently 0 in evaluate); lr = 1e38 overflows
    inside AdamW."""
    run = tmp_path / "run"
    error = one_line_error(["train-student", "--cache", str(tiny_cache), "--out", str(run),
                            "--student", str(tiny_student_dir), flag, value], capsys)
    assert f"must be within {bounds}" in error and not run.exists()


def test_nonfinite_evaluate_temperature_is_refused(tiny_cache: Path, tiny_student_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    error = one_line_error(["evaluate", "--cache", str(tiny_cache), "--student",
                            str(tiny_student_dir), "--device", "cpu", "--temperature", "inf"],
                           capsys)
    assert "--temperature inf: must be a finite number" in error


def test_reverse_kl_needs_a_tail(tmp_path: Path, tiny_teacher_dir: Path, trainer_corpus: Path,
                                 tiny_student_dir: Path) -> None:
    """k = V leaves no tail: reverse KL is then infinite wherever the teacher gives an id zero
    probability, so the combination is refused with the options, before any training."""
    cache = tmp_path / "every-id"
    manifest = cache_teacher(CacheTeacherConfig(
        teacher=str(tiny_teacher_dir), data=(str(trainer_corpus),), out=cache, device="cpu",
        top_k=320, max_length=16, shard_size=64, progress=False))
    assert manifest.top_k == manifest.vocab_size
    cfg = small_config(cache, tmp_path / "run", student=str(tiny_student_dir), loss="reverse")
    with pytest.raises(ConfigError, match=r"reverse KL is infinite .*--top-k below 320"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="reverse KL is infinite"):
        EvalConfig.from_options(student=str(tiny_student_dir), cache=str(cache),
                                loss="reverse").validate()
    small_config(cache, tmp_path / "run", student=str(tiny_student_dir), loss="jsd").validate()


def test_a_nonfinite_step_is_never_applied_or_saved(tmp_path: Path, tiny_cache: Path,
                                                    tiny_student_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient that turns NaN at step 4 (as a loss spike does) stops the run before that
    step is applied, saves no model, keeps the last checkpoint and says how to go on."""
    accumulate = train_module.accumulate_gradients

    def nan_at_step_4(objective: Any, *args: Any, step: int = 0, **kwargs: Any
                      ) -> dict[str, float]:
        result = accumulate(objective, *args, step=step, **kwargs)
        if step == 4:
            next(objective.parameters()).grad.fill_(math.nan)
        return result

    monkeypatch.setattr(train_module, "accumulate_gradients", nan_at_step_4)
    run = tmp_path / "run"
    cfg = small_config(tiny_cache, run, student=str(tiny_student_dir), save_every=1,
                       max_steps=20)
    with pytest.raises(NonFiniteError, match=r"step 4: .*gradient norm nan") as caught:
        train(cfg)
    message = str(caught.value)
    latest = ckpt.latest_checkpoint(run)
    assert latest is not None and latest.name == "step-000003"
    assert f"start a new run from its weights with --student {latest}" in message
    assert not RunLayout(run).final.exists()
    logged = (run / "metrics.jsonl").read_text().splitlines()
    assert all(math.isfinite(json.loads(line)["loss"]) for line in logged)


def poison(cache: Path, out: Path, row: int, position: int) -> int:
    """A copy of `cache` whose shard 1 holds a NaN teacher log-prob, its manifest updated so
    that checksums still agree (a cache written by a faulty teacher pass looks like this).
    Returns the poisoned sample id."""
    shutil.copytree(cache, out)
    manifest = read_manifest(out)
    info = manifest.shards[1]
    table = pq.read_table(out / info.file)
    k = manifest.top_k
    values = table.column(cols.TOPK_LOGPROBS).to_pylist()
    values[row][position * k] = math.nan
    column = pa.array(values, table.schema.field(cols.TOPK_LOGPROBS).type)
    table = table.set_column(table.schema.get_field_index(cols.TOPK_LOGPROBS),
                             table.schema.field(cols.TOPK_LOGPROBS), column)
    pq.write_table(table, out / info.file, row_group_size=cols.ROW_GROUP_SIZE)
    path = out / info.file
    fixed = replace(info, sha256=sha256_file(path), bytes=path.stat().st_size)
    write_manifest(out, manifest.with_shard(fixed))
    return int(table.column(cols.SAMPLE_ID)[row].as_py())


def test_nan_in_a_cache_is_reported_and_never_trained_on(tmp_path: Path, tiny_cache: Path,
                                                         tiny_student_dir: Path) -> None:
    faulty = tmp_path / "faulty"
    sample = poison(tiny_cache, faulty, row=2, position=5)
    problems = open_cache(faulty).verify()
    assert len(problems) == 1
    assert f"topk_logprobs holds nan at sample {sample}, target position 5" in problems[0]
    with pytest.raises(CacheFormatError, match=r"shard-00001.parquet row group 0: "
                                               r"topk_logprobs holds nan"):
        train(small_config(faulty, tmp_path / "run", student=str(tiny_student_dir),
                           max_steps=40))
    assert not RunLayout(tmp_path / "run").final.exists()
    with pytest.raises(CacheFormatError, match="topk_logprobs holds nan"):
        evaluate(EvalConfig.from_options(student=str(tiny_student_dir), cache=str(faulty),
                                         device="cpu", progress=False))
