"""Curriculum-aware training end to end on the tiny cache: the logged order and λ values are
exactly what the curriculum, the pacing function and the reliance mapping say."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer

from kdpipe.cli import app, main
from kdpipe.schemas import shard as cols
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.curriculum import make_curriculum, read_curriculum, write_curriculum
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.sampler import holdout_mask
from kdpipe.trainer.train import train

from .conftest import small_config


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cache_column(cache: Path, name: str) -> dict[int, float]:
    c = open_cache(cache)
    ids = c.read_column(cols.SAMPLE_ID).to_numpy().tolist()
    return dict(zip(ids, c.read_column(name).to_numpy().astype(np.float64).tolist(),
                    strict=True))


def _train_ids(cache: Path, fraction: float) -> np.ndarray:
    ids = np.sort(open_cache(cache).read_column(cols.SAMPLE_ID).to_numpy().astype(np.int64))
    return ids[~holdout_mask(ids, fraction)]


def test_kd_cl_sr_run_follows_the_curriculum_and_logs_its_lambdas(
        tmp_path: Path, tiny_cache: Path, student_config_file: Path,
        teacher_curriculum: Path) -> None:
    run = tmp_path / "run"
    cfg = small_config(tiny_cache, run, student_config=str(student_config_file),
                       max_steps=None, epochs=2, batch_size=4, grad_accum=2, eval_fraction=0.25,
                       curriculum=str(teacher_curriculum), pacing="linear", pacing_start=0.25,
                       pacing_full=0.5, reliance="linear", kd_weight_low=0.1,
                       kd_weight_high=0.9)
    result = train(cfg)
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["eval_ce"])

    # Independently: training split ranked by the cached teacher NLL, ties by sample id.
    nll = _cache_column(tiny_cache, cols.TEACHER_NLL)
    ranked = sorted(_train_ids(tiny_cache, 0.25).tolist(), key=lambda i: (nll[i], i))
    n, per_step = len(ranked), 8
    total = 2 * -(-n // per_step)
    position = {sid: k for k, sid in enumerate(ranked)}
    order = _jsonl(run / "order.jsonl")
    assert [o["step"] for o in order] == list(range(1, total + 1)) == \
        list(range(1, result["step"] + 1))
    for record in order:
        t = record["step"] - 1
        share = 0.25 + 0.75 * min(1.0, t / (0.5 * total))
        pool = min(n, max(math.ceil(share * n - 1e-9), per_step))
        assert all(position[s] < pool for s in record["sample_ids"]), record["step"]
        assert len(set(record["sample_ids"])) == len(record["sample_ids"])
        expected = [0.1 + 0.8 * position[s] / (n - 1) for s in record["sample_ids"]]
        assert record["kd_weight"] == pytest.approx(expected, abs=1e-6)
    first_pool = math.ceil(0.25 * n)
    assert max(position[s] for s in order[0]["sample_ids"]) < first_pool < n
    assert sum(len(o["sample_ids"]) for o in order if o["epoch"] == 0) == n


def test_pacing_none_presents_the_sorted_order(tmp_path: Path, tiny_cache: Path,
                                               tiny_student_dir: Path,
                                               teacher_curriculum: Path) -> None:
    nll = _cache_column(tiny_cache, cols.TEACHER_NLL)
    ranked = sorted(_train_ids(tiny_cache, 0.0).tolist(), key=lambda i: (nll[i], i))
    for order, expected in (("curriculum", ranked), ("anti", ranked[::-1])):
        run = tmp_path / order
        train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=None,
                           epochs=1, batch_size=16, curriculum=str(teacher_curriculum),
                           pacing="none", order=order, snapshots=False))
        used = [s for o in _jsonl(run / "order.jsonl") for s in o["sample_ids"]]
        assert used == expected, order
        assert all("kd_weight" not in o for o in _jsonl(run / "order.jsonl"))  # constant λ


def test_snapshot_source_re_ranks_from_the_recorded_losses(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path) -> None:
    run = tmp_path / "run"
    train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=None,
                       epochs=2, batch_size=16, curriculum_source="snapshot", pacing="none",
                       reliance="threshold", reliance_quantile=0.5, kd_weight_low=0.2,
                       kd_weight_high=0.7, kd_weight=0.45))
    order = _jsonl(run / "order.jsonl")
    train_ids = _train_ids(tiny_cache, 0.0).tolist()
    epoch0 = [s for o in order if o["epoch"] == 0 for s in o["sample_ids"]]
    epoch1 = [s for o in order if o["epoch"] == 1 for s in o["sample_ids"]]
    assert sorted(epoch0) == train_ids and epoch0 != train_ids  # epoch 0: a plain shuffle
    assert all(w == pytest.approx(0.45) for o in order if o["epoch"] == 0
               for w in o["kd_weight"])  # no difficulty known yet: the constant λ
    table, _ = snap.read_snapshot(RunLayout(run).snapshots / snap.snapshot_name(0))
    loss = dict(zip(table.column(snap.SAMPLE_ID).to_pylist(),
                    table.column(snap.LOSS).to_pylist(), strict=True))
    expected = sorted(train_ids, key=lambda i: (loss[i], i))
    assert epoch1 == expected  # exactly the order epoch 0's recorded losses give
    n = len(expected)
    for o in order:
        if o["epoch"] == 1:
            lam = [0.7 if expected.index(s) / (n - 1) > 0.5 else 0.2 for s in o["sample_ids"]]
            assert o["kd_weight"] == pytest.approx(lam, abs=1e-6)

    # The same snapshots as a data map, through the CLI: ranked by the mean loss of 2 epochs.
    out = tmp_path / "map.parquet"
    with pytest.raises(SystemExit) as done:
        main(["build-curriculum", "--cache", str(tiny_cache), "--out", str(out), "--source",
              "snapshot", "--run", str(run), "--epoch", "0", "--epoch", "1"])
    assert done.value.code == 0
    table1, _ = snap.read_snapshot(RunLayout(run).snapshots / snap.snapshot_name(1))
    loss1 = dict(zip(table1.column(snap.SAMPLE_ID).to_pylist(),
                     table1.column(snap.LOSS).to_pylist(), strict=True))
    mean = {i: (loss[i] + loss1[i]) / 2 for i in train_ids}
    data_map = read_curriculum(out)
    assert data_map.ordered_ids().tolist() == sorted(train_ids, key=lambda i: (mean[i], i))
    assert data_map.variability is not None and data_map.info.settings["epochs"] == "0,1"


def test_lambda_schedules_are_logged(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                     teacher_curriculum: Path) -> None:
    warmup = tmp_path / "warmup"
    train(small_config(tiny_cache, warmup, student=str(tiny_student_dir), max_steps=3,
                       snapshots=False, kd_weight_schedule="linear", kd_weight_low=0.2,
                       kd_weight_high=0.6))
    for record, lam in zip(_jsonl(warmup / "order.jsonl"), (0.2, 0.4, 0.6), strict=True):
        assert record["kd_weight"] == pytest.approx([lam] * len(record["sample_ids"]))
    matched = tmp_path / "matched"
    train(small_config(tiny_cache, matched, student=str(tiny_student_dir), max_steps=3,
                       snapshots=False, curriculum=str(teacher_curriculum), pacing="none",
                       reliance="linear", kd_weight_schedule="matched"))
    nll = _cache_column(tiny_cache, cols.TEACHER_NLL)
    ranked = sorted(_train_ids(tiny_cache, 0.0).tolist(), key=lambda i: (nll[i], i))
    n = len(ranked)
    for record in _jsonl(matched / "order.jsonl"):
        mean = np.mean([0.1 + 0.8 * ranked.index(s) / (n - 1) for s in record["sample_ids"]])
        assert record["kd_weight"] == pytest.approx([mean] * len(record["sample_ids"]),
                                                    abs=1e-6)


def test_token_reliance_weights_tokens_by_teacher_uncertainty(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path) -> None:
    def run(name: str, **overrides: object) -> list[dict[str, Any]]:
        train(small_config(tiny_cache, tmp_path / name, student=str(tiny_student_dir),
                           max_steps=3, snapshots=False, **overrides))
        return _jsonl(tmp_path / name / "metrics.jsonl")

    constant = run("constant", kd_weight=0.3)
    flat_token = run("flat", reliance="token", kd_weight_low=0.3, kd_weight_high=0.3)
    assert [r["loss"] for r in flat_token] == [r["loss"] for r in constant]
    token = run("token", reliance="token", kd_weight_low=0.1, kd_weight_high=0.9)
    assert [r["loss"] for r in token] != [r["loss"] for r in constant]
    confidence = _cache_column(tiny_cache, cols.TEACHER_CONFIDENCE)
    for record in _jsonl(tmp_path / "token" / "order.jsonl"):
        # logged: each sample's mean token λ = lo + (hi - lo)(1 - mean p_T(y_t))
        expected = [0.1 + 0.8 * (1 - confidence[s]) for s in record["sample_ids"]]
        assert record["kd_weight"] == pytest.approx(expected, abs=1e-5)


def test_token_shuffled_control_does_not_depend_on_the_batch_split(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path) -> None:
    def run(name: str, **split: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train(small_config(tiny_cache, tmp_path / name, student=str(tiny_student_dir),
                           max_steps=2, snapshots=False, reliance="token",
                           reliance_control="shuffled", **split))
        return _jsonl(tmp_path / name / "metrics.jsonl"), _jsonl(tmp_path / name / "order.jsonl")

    whole, whole_order = run("whole", batch_size=8)
    split, split_order = run("split", batch_size=4, grad_accum=2)
    assert len(whole) == len(split) == 2
    for a, b in zip(whole, split, strict=True):
        for key in ("loss", "ce", "kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for a, b in zip(whole_order, split_order, strict=True):
        assert a["sample_ids"] == b["sample_ids"]
        assert b["kd_weight"] == pytest.approx(a["kd_weight"], abs=1e-6)


def test_mismatched_curriculum_is_refused(tmp_path: Path, tiny_cache: Path,
                                          tiny_student_dir: Path) -> None:
    ids = np.sort(open_cache(tiny_cache).read_column(cols.SAMPLE_ID).to_numpy())
    fingerprint = open_cache(tiny_cache).manifest.settings_fingerprint
    other = tmp_path / "other.parquet"
    write_curriculum(other, make_curriculum(ids, np.arange(ids.size, dtype=float),
                                            source="length", metric="tokens",
                                            cache_fingerprint="0" * 64, cache_sample_ids=ids,
                                            num_buckets=4))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="settings fingerprint"):
        train(small_config(tiny_cache, run, student=str(tiny_student_dir),
                           curriculum=str(other)))
    assert not run.exists()  # refused before the run folder was made
    subset = tmp_path / "subset.parquet"
    write_curriculum(subset, make_curriculum(ids[:10], np.arange(10.0), source="length",
                                             metric="tokens", cache_fingerprint=fingerprint,
                                             cache_sample_ids=ids, num_buckets=4))
    with pytest.raises(ConfigError, match="training samples .* are not among them"):
        train(small_config(tiny_cache, tmp_path / "run2", student=str(tiny_student_dir),
                           curriculum=str(subset)))
    with pytest.raises(ConfigError, match="--reliance linear maps"):
        train(small_config(tiny_cache, tmp_path / "run3", student=str(tiny_student_dir),
                           reliance="linear"))


def test_resume_with_snapshot_curriculum_is_exact(tmp_path: Path, tiny_cache: Path,
                                                  tiny_student_dir: Path,
                                                  teacher_curriculum: Path) -> None:
    full = tmp_path / "full"
    per_epoch = -(-_train_ids(tiny_cache, 0.0).size // 16)
    cfg = small_config(tiny_cache, full, student=str(tiny_student_dir), max_steps=None,
                       epochs=2, batch_size=16, save_every=per_epoch + 1,
                       curriculum=str(teacher_curriculum), curriculum_source="snapshot",
                       pacing="root", pacing_start=0.3, reliance="linear",
                       reliance_control="shuffled")
    uninterrupted = train(cfg)
    assert uninterrupted["step"] == 2 * per_epoch
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for later in sorted(RunLayout(crashed).checkpoints.iterdir())[1:]:
        shutil.rmtree(later)  # keep the first only: mid epoch 1, after the re-ranking
    shutil.rmtree(RunLayout(crashed).final)
    RunLayout(crashed).final_metrics.unlink()
    resumed = train(replace(cfg, out=str(crashed), resume=True))
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert _jsonl(crashed / "order.jsonl") == _jsonl(full / "order.jsonl")


def test_cli_has_the_curriculum_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train-student", "--help"])
    assert done.value.code == 0 and "--curriculum" in capsys.readouterr().out
    # Option names, not the help text: rich truncates long names in narrow terminals.
    command = typer.main.get_command(app).get_command(None, "train-student")  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    for flag in ("--curriculum", "--curriculum-source", "--curriculum-metric", "--pacing",
                 "--pacing-start", "--pacing-full", "--pacing-increase", "--pacing-step-length",
                 "--pacing-buckets", "--order", "--reliance", "--kd-weight-low",
                 "--kd-weight-high", "--reliance-quantile", "--reliance-control",
                 "--kd-weight-schedule"):
        assert flag in flags, flag
