"""End-to-end training runs on the tiny cache: loss goes down, resume is exact, logs prove the
order, snapshots round-trip, runs share a cache, and `kdpipe evaluate` prints its JSON."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdpipe import progress
from kdpipe.cli import main
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import build_index
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.sampler import holdout_mask
from kdpipe.trainer.train import train

from ..families import permuted_tokenizer
from .conftest import small_config


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kd_run_from_scratch_learns_logs_its_order_and_snapshots(
        tmp_path: Path, tiny_cache: Path, student_config_file: Path) -> None:
    run = tmp_path / "run"
    cfg = small_config(tiny_cache, run, student_config=str(student_config_file), max_steps=None,
                       epochs=2, batch_size=8, eval_fraction=0.25, eval_every=4,
                       snapshot_every=3, temperature=2.0, lr=1e-2)
    result = train(cfg)

    records = _jsonl(run / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert all(r["tokens_per_s"] > 0 for r in records if r["split"] == "train")
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) >= 2 and evals[-1]["ce"] < evals[0]["ce"]
    assert result["step"] == len(train_losses) and result["epoch"] == 2
    assert math.isfinite(result["eval_kd"]) and 0 <= result["eval_top1_agreement"] <= 1
    assert (RunLayout(run).final / "model.safetensors").is_file()
    assert json.loads(RunLayout(run).final_metrics.read_text()) == result
    # `kdpipe evaluate` on the held-out split is the trainer's final eval, to the last bit.
    again = evaluate(EvalConfig.from_options(
        student=str(RunLayout(run).final), cache=str(tiny_cache), eval_fraction=0.25,
        temperature=2.0, batch_size=8, chunk_size=64, device="cpu", progress=False))
    for key in ("ce", "kd", "top1_agreement", "tokens", "loss"):
        assert again[key] == result[f"eval_{key}"], key

    # The order log: each epoch is a permutation of the training split, never a held-out id.
    index = build_index(open_cache(tiny_cache))
    train_ids = set(index.sample_ids[~holdout_mask(index.sample_ids, 0.25)].tolist())
    order = _jsonl(run / "order.jsonl")
    assert [o["step"] for o in order] == list(range(1, result["step"] + 1))
    for epoch in (0, 1):
        used = [s for o in order if o["epoch"] == epoch for s in o["sample_ids"]]
        assert sorted(used) == sorted(train_ids)
    assert [s for o in order if o["epoch"] == 0 for s in o["sample_ids"]] != \
        [s for o in order if o["epoch"] == 1 for s in o["sample_ids"]]

    # Snapshots: one per finished epoch with every sample seen, plus mid-epoch ones.
    found = snap.list_snapshots(run)
    assert [(e, s) for e, s, _ in found if s is None] == [(0, None), (1, None)]
    assert any(s is not None for _, s, _ in found)
    table, info = snap.read_snapshot(RunLayout(run).snapshots / snap.snapshot_name(1))
    assert info.epoch == 1 and info.epoch_complete
    assert info.cache_fingerprint == open_cache(tiny_cache).manifest.settings_fingerprint
    assert sorted(table.column(snap.SAMPLE_ID).to_pylist()) == sorted(train_ids)
    loss = np.asarray(table.column(snap.LOSS))
    confidence = np.asarray(table.column(snap.CONFIDENCE))
    assert np.isfinite(loss).all() and (loss > 0).all()
    assert ((confidence > 0) & (confidence < 1)).all()
    assert (np.asarray(table.column(snap.SEEN)) == 1).all()
    tokens = dict(zip(index.sample_ids.tolist(), index.num_targets.tolist(), strict=True))
    assert all(tokens[s] == n for s, n in zip(table.column(snap.SAMPLE_ID).to_pylist(),
                                              table.column(snap.TOKENS).to_pylist(),
                                              strict=True))
    partial, partial_info = snap.read_snapshot(found[0][2])
    assert not partial_info.epoch_complete and 0 < partial.num_rows < table.num_rows


def test_resume_continues_exactly(tmp_path: Path, tiny_cache: Path, tiny_gpt2_dir: Path
                                  ) -> None:
    """GPT-2 has dropout, so this also checks that the RNG state is restored."""
    full = tmp_path / "full"
    cfg = small_config(tiny_cache, full, student=str(tiny_gpt2_dir), max_steps=9,
                       save_every=3, batch_size=4, grad_accum=2, eval_fraction=0.25,
                       snapshot_every=2)
    uninterrupted = train(cfg)
    assert uninterrupted["epoch"] >= 1  # the run crosses an epoch boundary after the resume

    # Simulate a crash after step 3: keep only what existed then (plus stale later logs).
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for name in ("step-000006", "step-000009"):
        shutil.rmtree(RunLayout(crashed).checkpoints / name)
    shutil.rmtree(RunLayout(crashed).final)
    RunLayout(crashed).final_metrics.unlink()
    resumed = train(replace(cfg, out=str(crashed), resume=True))

    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert resumed["eval_ce"] == uninterrupted["eval_ce"]

    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert strip(_jsonl(crashed / "metrics.jsonl")) == strip(_jsonl(full / "metrics.jsonl"))
    assert _jsonl(crashed / "order.jsonl") == _jsonl(full / "order.jsonl")
    names = [p.name for _, _, p in snap.list_snapshots(full)]
    assert names == [p.name for _, _, p in snap.list_snapshots(crashed)]
    for name in names:
        a, _ = snap.read_snapshot(RunLayout(full).snapshots / name)
        b, _ = snap.read_snapshot(RunLayout(crashed).snapshots / name)
        assert a.equals(b), name


def test_run_folder_rules(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path) -> None:
    run = tmp_path / "run"
    cfg = small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=2,
                       mode="ce", snapshots=False)
    first = train(cfg)
    assert train(cfg) == first  # finished and identical: recognised, not retrained
    with pytest.raises(ConfigError, match="different config .*lr"):
        train(replace(cfg, lr=1e-4))
    with pytest.raises(ConfigError, match="different lr"):
        train(replace(cfg, lr=1e-4, resume=True))
    longer = train(replace(cfg, max_steps=3, resume=True))
    assert longer["step"] == 3
    replaced = train(replace(cfg, seed=5, overwrite=True))
    assert replaced["step"] == 2
    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a kdpipe run folder"):
        train(small_config(tiny_cache, stranger, student=str(tiny_student_dir)))


def test_config_reports_every_problem_at_once(tmp_path: Path, tiny_cache: Path) -> None:
    cfg = small_config(tiny_cache, tmp_path / "run", student="a", student_config="b.json",
                       loss="kl", kd_weight=2.0, max_steps=0, eval_fraction=1.5,
                       eval_cache=str(tmp_path / "missing"), precision="fp16")
    with pytest.raises(ConfigError) as caught:
        cfg.validate()
    message = str(caught.value)
    for flag in ("--student", "--loss", "--kd-weight", "--max-steps", "--eval-fraction",
                 "--eval-cache", "--student-config", "--precision 'fp16'"):
        assert flag in message, flag


def test_two_runs_share_one_cache(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path
                                  ) -> None:
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def run(name: str, loss: str) -> None:
        try:
            results[name] = train(small_config(tiny_cache, tmp_path / name, loss=loss,
                                               student=str(tiny_student_dir), max_steps=4,
                                               prefetch=1, shuffle_window=1))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n, loss))
               for n, loss in (("a", "forward"), ("b", "jsd"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(results) == {"a", "b"} and all(r["step"] == 4 for r in results.values())
    assert open_cache(tiny_cache).verify() == []


def test_evaluate_prints_one_json_object(capsys: pytest.CaptureFixture[str], tiny_cache: Path,
                                         tiny_student_dir: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--student", str(tiny_student_dir), "--cache", str(tiny_cache),
              "--device", "cpu", "--temperature", "2", "--batch-size", "16"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    for key in ("ce", "ppl", "kd", "top1_agreement", "tokens", "loss"):
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), key
    assert result["tokens"] == open_cache(tiny_cache).manifest.num_targets
    assert result["ppl"] == pytest.approx(math.exp(result["ce"]))


def test_cli_help_and_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      tiny_cache: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train-student", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--student", "--student-config", "--tokenizer", "--cache", "--out",
                 "--eval-cache", "--eval-fraction", "--loss", "--kd-weight", "--temperature",
                 "--mode", "--max-steps", "--epochs", "--resume", "--snapshot-every"):
        assert flag in text, flag
    with pytest.raises(SystemExit) as failed:
        main(["train-student", "--cache", str(tiny_cache), "--out", str(tmp_path / "r")])
    assert failed.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "exactly one of --student" in error and "\n" not in error


def test_an_eval_cache_of_another_tokenizer_is_refused_naming_the_id(
        tmp_path: Path, tiny_cache: Path, tiny_teacher_dir: Path, tiny_tokenizer_dir: Path,
        tiny_student_dir: Path, trainer_corpus: Path) -> None:
    other = permuted_tokenizer(tiny_tokenizer_dir, tmp_path / "permuted", 150, 151)
    eval_cache = tmp_path / "eval-cache"
    cache_teacher(CacheTeacherConfig(
        teacher=str(tiny_teacher_dir), data=(str(trainer_corpus),), out=eval_cache,
        device="cpu", top_k=8, max_length=64, tokenizer=str(other),
        allow_tokenizer_mismatch=True, progress=False))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--eval-cache .* maps ids differently .* \(id 150 is "
                                          r".* in --cache's tokenizer but .* in --eval-cache's\)"):
        train(small_config(tiny_cache, run, student=str(tiny_student_dir),
                           eval_cache=str(eval_cache)))
    assert not run.exists()


def test_without_bars_the_loop_logs_status_lines(tmp_path: Path, tiny_cache: Path,
                                                 tiny_student_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO):
        train(small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir),
                           max_steps=3, progress=False))
    lines = [r.getMessage() for r in caplog.records if "train-student: step" in r.getMessage()]
    assert lines and "step 3/3 (100%)" in lines[-1] and "loss" in lines[-1], lines
