"""Benchmark the loader on a curriculum order over a cache much larger than `--shuffle-window`.

    python benchmarks/curriculum_order.py --out runs/bench-curriculum-order

A curriculum draws each batch uniformly from a pool of the easiest samples, which lie all over
the cache; an LRU of `--shuffle-window` decoded row groups then decodes about one row group
per sample. The loader's read-ahead (`kdpipe/trainer/read_ahead.py`) decodes each row group
once per horizon instead. This script builds (or reuses) a cache of random-teacher targets
with at least `--min-groups` row groups (the stdlib corpus, copied `--copies` times; what the
teacher knows does not change the loader's cost), ranks its samples at random (difficulty
unrelated to where a sample is stored, as for any real score), and measures, with one torch
thread and no model, samples and target tokens per CPU-second of the loader over one epoch of:

* shuffle          the trainer's seeded shuffle in windows of `--shuffle-window` row groups;
* curriculum-today a linear-paced curriculum (b = 0.2, a = 0.8, T = one epoch) read the way
                   the loader read before the read-ahead: a horizon of one sample, so the LRU
                   alone decides what is decoded (the first `--today-samples` of the epoch:
                   at ~1 decode per sample the whole epoch would take many minutes);
* curriculum       the same order with the read-ahead at its default budget (and at
                   `--budgets`, if given).

It counts row-group decodes per sample for each (replaying the reader's LRU over the fetch
sequence), and for the same curriculum on a cache re-sharded in difficulty order (so the pool
is a prefix of row groups), whose time it predicts from the measured cost per decode and per
sample. The training rate is train-student's kd arm on the same cache
(`benchmarks/train_student.py --arms kd`, one torch thread), so each loader rate is also given
as a multiple of what training consumes. Writes curriculum_order.json and curriculum_order.md
to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.embedded.corpus import write_corpus
from kdpipe.embedded.models import ModelSize, init_model
from kdpipe.embedded.prepare import cache_complete
from kdpipe.embedded.tokenizer import train_tokenizer
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.shard import ROW_GROUP_SIZE
from kdpipe.schemas.shard_reader import READ_AHEAD_TARGETS, CacheIndex, build_index, columns_for
from kdpipe.trainer.curriculum_sampler import CurriculumSampler, Ranking
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.decode_workers import load_sequence
from kdpipe.trainer.pacing import Pacing
from kdpipe.trainer.read_ahead import fetch_sequence, horizons
from kdpipe.trainer.sampler import ShuffleSampler

BENCHMARKS = Path(__file__).resolve().parent


def build_cache(args: argparse.Namespace) -> Path:
    """A random-teacher cache of the stdlib corpus (both splits) copied `--copies` times."""
    corpus_dir = args.out / "corpus"
    train_jsonl, heldout_jsonl = write_corpus(corpus_dir, 1_500_000, 750_000)
    tokenizer = train_tokenizer(train_jsonl, args.out / "tokenizer", args.vocab)
    teacher = init_model(tokenizer, args.out / "teacher", ModelSize(64, 2, 2), args.max_length)
    data = corpus_dir / f"copies-{args.copies}.jsonl"
    if not data.is_file():
        text = train_jsonl.read_text(encoding="utf-8") + heldout_jsonl.read_text(
            encoding="utf-8")
        data.write_text(text * args.copies, encoding="utf-8")
    cache = args.out / "cache"
    if not cache_complete(cache):
        cache_teacher(CacheTeacherConfig(teacher=str(teacher), data=(str(data),), out=cache,
                                         top_k=args.top_k, pack=True,
                                         max_length=args.max_length, batch_size=32,
                                         shard_size=512, device="cpu", progress=False))
    return cache


def curriculum_order(index: CacheIndex, batch: int, seed: int) -> np.ndarray:
    """One epoch of a linear-paced curriculum (b = 0.2, a = 0.8, T = the epoch's batches)
    over a seeded random ranking of every sample."""
    scores = np.random.default_rng([seed, 1]).random(len(index))
    steps = -(-len(index) // batch)
    sampler = CurriculumSampler(index.sample_ids, Pacing("linear", start=0.2, full=0.8),
                                per_step=batch, total_steps=steps, seed=seed,
                                initial=Ranking.from_scores(index.sample_ids, scores))
    return sampler.epoch_order(0)


def decodes(groups: np.ndarray, targets: np.ndarray, budget: int, window: int) -> int:
    """Row groups the loader decodes for samples in row groups `groups`, in order."""
    return len(load_sequence(fetch_sequence(groups, horizons(targets, budget)), window))


def measure(index: CacheIndex, order: np.ndarray, args: argparse.Namespace, budget: int,
            pad_id: int, columns: Any) -> dict[str, Any]:
    """The loader alone over `order`: samples and target tokens per CPU-second."""
    targets = 0
    wall, cpu = time.perf_counter(), time.process_time()
    with BatchLoader(index, order, columns, args.batch_size, 1, pad_id, prefetch=4,
                     cached_groups=args.shuffle_window, read_ahead=budget) as loader:
        for batch in loader:
            targets += batch.num_targets
    cpu = time.process_time() - cpu
    positions = index.positions(order)
    n = decodes(index.group[positions], index.num_targets[positions], budget,
                args.shuffle_window)
    return {"samples": int(order.size), "targets": targets, "cpu_s": cpu,
            "wall_s": time.perf_counter() - wall, "samples_per_cpu_s": order.size / cpu,
            "targets_per_cpu_s": targets / cpu, "decodes": n, "decodes_per_sample":
            n / order.size, "budget": budget}


def training_rate(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """train-student's kd arm on this cache (its own subprocess, one torch thread)."""
    out = args.out / "train"
    subprocess.run([sys.executable, str(BENCHMARKS / "train_student.py"), "--cache", str(cache),
                    "--arms", "kd", "--threads", "1", "--steps", str(args.train_steps),
                    "--batch-size", str(args.batch_size), "--no-snapshots", "--out", str(out)],
                   check=True)
    kd = json.loads((out / "train_student.json").read_text(encoding="utf-8"))["summary"]["kd"]
    return {"targets_per_cpu_s": kd["tokens_per_cpu_s"], "targets_per_s": kd["tokens_per_s"]}


def resharded(index: CacheIndex, order: np.ndarray, ranking_order: np.ndarray, budget: int,
              window: int) -> dict[str, float]:
    """Decodes per sample had the cache been re-sharded in difficulty order: sample of rank r
    stored in row group r // 64, so every pool is a prefix of row groups."""
    rank = np.empty(len(index), dtype=np.int64)
    rank[index.positions(ranking_order)] = np.arange(len(index))
    positions = index.positions(order)
    groups = rank[positions] // ROW_GROUP_SIZE
    targets = index.num_targets[positions]
    return {str(b): decodes(groups, targets, b, window) / order.size for b in (1, budget)}


def markdown(result: dict[str, Any]) -> str:
    train = result["training"]["targets_per_cpu_s"]
    lines = [f"cache: {result['cache']['samples']} samples in {result['cache']['groups']} row "
             f"groups ({result['cache']['groups'] / result['window']:.1f} x the window of "
             f"{result['window']}), {result['cache']['targets']} target tokens, "
             f"top-{result['cache']['top_k']}; training (kd arm): {train:.0f} target tokens "
             "per CPU-second", "",
             "| order | read-ahead budget (targets) | samples | decodes / sample | samples / "
             "CPU-s | target tokens / CPU-s | × training |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["arms"].items():
        lines.append(f"| {name} | {row['budget']} | {row['samples']} | "
                     f"{row['decodes_per_sample']:.3f} | {row['samples_per_cpu_s']:.0f} | "
                     f"{row['targets_per_cpu_s']:.0f} | {row['targets_per_cpu_s'] / train:.1f} |")
    lines += ["", "| re-sharded in difficulty order (predicted) | budget | decodes / sample | "
              "target tokens / CPU-s | × training |", "|---|---:|---:|---:|---:|"]
    for name, row in result["resharded"].items():
        lines.append(f"| {name} | {row['budget']} | {row['decodes_per_sample']:.3f} | "
                     f"{row['targets_per_cpu_s']:.0f} | {row['targets_per_cpu_s'] / train:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, help="Use this cache instead of building one.")
    p.add_argument("--copies", type=int, default=3, help="Copies of the corpus to cache.")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=128, help="Tokens per packed sequence.")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--min-groups", type=int, default=160,
                   help="Refuse a cache with fewer row groups (10 x the default window).")
    p.add_argument("--shuffle-window", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--today-samples", type=int, default=1500)
    p.add_argument("--budgets", default="", help="Extra read-ahead budgets, comma-separated.")
    p.add_argument("--train-steps", type=int, default=15, help="Timed steps of the kd arm.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache or build_cache(args)
    cache = open_cache(cache_dir)
    index = build_index(cache)
    if len(index.groups) < args.min_groups:
        raise SystemExit(f"{cache_dir}: {len(index.groups)} row groups, fewer than "
                         f"--min-groups {args.min_groups}; raise --copies")
    columns = columns_for(cache, teacher=True, temperature=1.0)
    pad_id = cache.manifest.tokenizer.pad_token_id or 0
    shuffle = ShuffleSampler(index, index.sample_ids, args.seed, args.shuffle_window)
    curriculum = curriculum_order(index, args.batch_size, args.seed)
    budgets = [READ_AHEAD_TARGETS] + [int(b) for b in args.budgets.split(",") if b]
    arms = {"shuffle": measure(index, shuffle.epoch_order(0), args, READ_AHEAD_TARGETS, pad_id,
                               columns),
            "curriculum-today": measure(index, curriculum[:args.today_samples], args, 1,
                                        pad_id, columns)}
    for budget in budgets:
        arms[f"curriculum, read-ahead {budget}"] = measure(index, curriculum, args, budget,
                                                           pad_id, columns)
    # CPU-seconds per sample = per decode x decodes per sample + per sample (collation): the
    # two read-ahead-free extremes, shuffle (~1/64) and today (~1), give both costs.
    a, b = arms["shuffle"], arms["curriculum-today"]
    per_decode = ((b["cpu_s"] / b["samples"] - a["cpu_s"] / a["samples"])
                  / (b["decodes_per_sample"] - a["decodes_per_sample"]))
    per_sample = a["cpu_s"] / a["samples"] - per_decode * a["decodes_per_sample"]
    targets_per_sample = float(index.num_targets.mean())
    ranking = Ranking.from_scores(index.sample_ids,
                                  np.random.default_rng([args.seed, 1]).random(len(index)))
    predicted = {}
    for budget in budgets:
        rate = resharded(index, curriculum, ranking.ordered, budget, args.shuffle_window)
        for key, name in ((str(budget), f"read-ahead {budget}"), ("1", "no read-ahead")):
            d = rate[key]
            predicted[name] = {"budget": int(key), "decodes_per_sample": d,
                               "targets_per_cpu_s": targets_per_sample
                               / (per_decode * d + per_sample)}
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/curriculum_order.py "
              + " ".join(sys.argv[1:] if argv is None else argv),
              "cache": {"path": str(cache_dir), "samples": len(index),
                        "groups": len(index.groups), "targets": int(index.num_targets.sum()),
                        "top_k": cache.manifest.top_k},
              "window": args.shuffle_window, "arms": arms, "cost": {
                  "cpu_s_per_decode": per_decode, "cpu_s_per_sample": per_sample},
              "resharded": predicted, "training": training_rate(args, cache_dir),
              "load_average": os.getloadavg()}
    (args.out / "curriculum_order.json").write_text(json.dumps(result, indent=1),
                                                    encoding="utf-8")
    table = markdown(result)
    (args.out / "curriculum_order.md").write_text(table, encoding="utf-8")
    print(table)
    return result


if __name__ == "__main__":
    main()
