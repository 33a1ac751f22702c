"""torchrun on CPU (gloo, 2 processes): N processes train exactly like one with the same global
batch, with DDP and FSDP2, through resume, curricula and selective reliance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.distributed import rank_order, rank_slice
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.train import train

from .conftest import small_config

TIMEOUT_S = 300  # one torchrun launch of two tiny students; normally ~20 s
EVAL_FRACTION = 0.2  # leaves 65 training samples of the tiny cache: uneven last batches


def test_rank_slices_split_every_global_batch_exactly() -> None:
    for world in (1, 2, 3):
        for n in (1, 2, 5, 6, 7, 12):
            ids = np.arange(100, 100 + n)
            shares = [rank_slice(ids, world, r, batch_size=2) for r in range(world)]
            real = [s for s in shares if s.real]
            assert np.array_equal(np.concatenate([s.sample_ids for s in real]), ids)
            assert all(np.array_equal(ids[s.start:s.start + s.sample_ids.size], s.sample_ids)
                       for s in real)
            assert len({s.micro_batches for s in shares}) == 1  # the same forward passes
            assert shares[0].micro_batches == max(-(-s.sample_ids.size // 2) for s in real)
            for s in shares:  # a rank left without a sample gets one placeholder
                assert s.real or (s.sample_ids.tolist() == [100] and n < world)
    order = np.arange(23)
    local, shares = rank_order(order, per_step=8, world_size=1, rank=0, batch_size=4)
    assert np.array_equal(local, order) and len(shares) == 3
    local, shares = rank_order(order, per_step=8, world_size=2, rank=1, batch_size=2)
    assert local.tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22]
    assert [s.micro_batches for s in shares] == [2, 2, 2]


def _flags(cache: Path, out: Path, student: Path, device: str = "cpu", **options: Any
           ) -> list[str]:
    args = ["--cache", str(cache), "--out", str(out), "--student", str(student),
            "--device", device, "--no-progress", "--log-every", "1", "--chunk-size", "64",
            "--lr", "3e-3", "--warmup-steps", "1", "--eval-fraction", str(EVAL_FRACTION)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def torchrun(args: list[str], nproc: int = 2, command: str = "train-student",
             expect_failure: bool = False) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node 2 -m kdpipe COMMAND ARGS`, asserting its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "kdpipe", command, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert (proc.returncode != 0) == expect_failure, proc.stderr[-4000:]
    return proc


def _records(run: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)}
            for r in _records(run, "metrics.jsonl")]


def assert_same_training(one: Path, many: Path, rel: float) -> None:
    """Same logged order (and λ), same metrics within `rel`, same final weights."""
    assert _records(one, "order.jsonl") == _records(many, "order.jsonl")
    a, b = _metrics(one), _metrics(many)
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            expected = pytest.approx(y[key], rel=rel, abs=1e-9) if isinstance(value, float) \
                else y[key]
            assert value == expected, (x["step"], key)
    w1 = load_file(RunLayout(one).final / "model.safetensors")
    w2 = load_file(RunLayout(many).final / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_like_one_and_resume(tmp_path: Path, tiny_cache: Path,
                                                 tiny_student_dir: Path, fsdp: bool) -> None:
    # Global batch 6 = 2 processes x 1 sequence x 3 micro-batches; 65 samples leave a last
    # batch of 5 (3 + 2), so one rank pads a zero-weight micro-batch (FSDP needs equal passes).
    one = tmp_path / "one"
    train(small_config(tiny_cache, one, student=str(tiny_student_dir), batch_size=6,
                       max_steps=None, epochs=1, eval_fraction=EVAL_FRACTION, eval_every=4,
                       save_every=5))
    assert _records(one, "order.jsonl")[-1]["sample_ids"].__len__() == 5
    many = tmp_path / "many"
    options: dict[str, Any] = dict(batch_size=1, grad_accum=3, epochs=1, eval_every=4,
                                   save_every=5, fsdp=fsdp)
    torchrun(_flags(tiny_cache, many, tiny_student_dir, **options))
    assert_same_training(one, many, rel=1e-5)
    final = json.loads(RunLayout(many).final_metrics.read_text())
    assert final["world_size"] == 2 and final["samples_seen"] == 65

    # Crash after step 5: keep what existed then; resume on 2 processes repeats the rest.
    crashed = tmp_path / "crashed"
    shutil.copytree(many, crashed)
    layout = RunLayout(crashed)
    for folder in (layout.checkpoint(10), layout.checkpoint(11), layout.final):
        shutil.rmtree(folder)
    layout.final_metrics.unlink()
    torchrun(_flags(tiny_cache, crashed, tiny_student_dir, **options, resume=True))
    assert_same_training(many, crashed, rel=1e-6)

    # A 2-process checkpoint does not resume on one process (the data split would differ),
    # and the refusal changes nothing: the finished run keeps its final metrics and config.
    before = {p.name: p.read_bytes() for p in crashed.iterdir() if p.is_file()}
    cfg = small_config(tiny_cache, crashed, student=str(tiny_student_dir), batch_size=1,
                       grad_accum=3, max_steps=12, eval_fraction=EVAL_FRACTION,
                       eval_every=4, save_every=5, fsdp=fsdp, resume=True)
    with pytest.raises(ConfigError, match="written by 2 process"):
        train(cfg)
    assert {p.name: p.read_bytes() for p in crashed.iterdir() if p.is_file()} == before


def test_a_refusal_on_rank_0_stops_the_run(tmp_path: Path, tiny_cache: Path,
                                              tiny_student_dir: Path) -> None:
    """Rank 0 alone decides about the run folder; its refusal (handed to every rank, see
    Distributed.on_main) ends the run with the one-line error and a non-zero exit, and leaves
    the folder as it was. torchrun may stop the other ranks once rank 0 has exited, so at
    least one copy of the line is printed."""
    run = tmp_path / "run"
    train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=2))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = torchrun(_flags(tiny_cache, run, tiny_student_dir, batch_size=2, max_steps=3),
                    expect_failure=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdpipe: error:")]
    assert errors and all("holds a run with a different config" in e for e in errors)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_evaluate_splits_the_samples_over_processes(tiny_cache: Path, tiny_student_dir: Path
                                                    ) -> None:
    """Each process evaluates its share (odd sizes: one pads a batch); rank 0 prints the
    metrics of the whole set, equal to one process's."""
    args = ["--student", str(tiny_student_dir), "--cache", str(tiny_cache), "--device", "cpu",
            "--batch-size", "4", "--max-samples", "23", "--chunk-size", "64"]
    lines = torchrun(args, command="evaluate").stdout.strip().splitlines()
    assert len(lines) == 1  # only rank 0 prints
    many = json.loads(lines[0])
    one = evaluate(EvalConfig.from_options(student=str(tiny_student_dir), cache=str(tiny_cache),
                              device="cpu", batch_size=4, max_samples=23, chunk_size=64))
    assert many["world_size"] == 2 and one["world_size"] == 1
    for key in ("ce", "ppl", "kd", "top1_agreement", "loss"):
        assert many[key] == pytest.approx(one[key], rel=1e-5), key
    assert many["tokens"] == one["tokens"] and many["samples"] == one["samples"] == 23


@pytest.mark.parametrize("reliance", [
    {"curriculum_source": "snapshot", "reliance": "threshold"},
    {"reliance": "token", "kd_weight_schedule": "matched", "pacing": "root"},
    {"reliance": "token", "reliance_control": "shuffled"},
], ids=["snapshot-curriculum-threshold", "token-matched", "token-shuffled"])
def test_curricula_and_reliance_are_the_same_on_two_processes(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path, teacher_curriculum: Path,
        reliance: dict[str, Any]) -> None:
    """Pool, order and λ of every step are those of one process; the snapshot the next
    epoch's ranking comes from holds every sample trained on, gathered from both ranks."""
    common: dict[str, Any] = dict(curriculum=str(teacher_curriculum), epochs=2, **reliance)
    one = tmp_path / "one"
    train(small_config(tiny_cache, one, student=str(tiny_student_dir), batch_size=8,
                       max_steps=None, eval_fraction=EVAL_FRACTION, **common))
    many = tmp_path / "many"
    torchrun(_flags(tiny_cache, many, tiny_student_dir, batch_size=2, grad_accum=2, **common))
    assert_same_training(one, many, rel=1e-5)
    epochs_one = snap.list_snapshots(one)
    assert [p.name for *_, p in epochs_one] == [p.name for *_, p in snap.list_snapshots(many)]
    for *_, path in epochs_one:
        a, _ = snap.read_snapshot(path)
        b, _ = snap.read_snapshot(RunLayout(many).snapshots / path.name)
        assert a.column(snap.SAMPLE_ID).to_pylist() == b.column(snap.SAMPLE_ID).to_pylist()
        assert a.column(snap.SEEN).to_pylist() == b.column(snap.SEEN).to_pylist()
        assert np.allclose(a.column(snap.LOSS).to_numpy(), b.column(snap.LOSS).to_numpy(),
                           rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gpus_train_like_one(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                 fsdp: bool) -> None:
    """The same check on GPUs with NCCL, in float32 so the tolerance stays tight."""
    one = tmp_path / "one"
    train(small_config(tiny_cache, one, student=str(tiny_student_dir), batch_size=8,
                       eval_fraction=EVAL_FRACTION, device="cuda", precision="fp32"))
    many = tmp_path / "many"
    torchrun(_flags(tiny_cache, many, tiny_student_dir, device="cuda", precision="fp32",
                    batch_size=4, max_steps=6, fsdp=fsdp))
    assert_same_training(one, many, rel=1e-4)
