"""Benchmark: are students trained from the cache as good as one trained with the teacher live?

    python benchmarks/cache_quality.py --teacher runs/stdlib/teacher-run/final \
        --cache runs/stdlib/cache --eval-cache runs/stdlib/heldout-cache \
        --out runs/bench-cache-quality --steps 150 --batch-size 4

Students of one architecture are trained with the same budget from five kinds of supervision
and compared by held-out perplexity of the true next tokens (exp of the mean CE):

* online   (a) online dense KD: the teacher in memory (benchmark code only, never the trainer),
           its full logits per batch under no_grad, (1-λ)·CE + λ·KL(p_T || q_S) over the whole
           vocabulary (`train_student.dense_step`);
* topk     (b) the trainer's `train_step` with `--loss forward` on the top-k cache: exact KL on
           the partition of the k cached ids plus one tail bucket;
* zero     (c) the same cache with `--loss zero`: top-k renormalised, tail dropped;
* sampled  (d) `--loss sampled` on a sampled cache (`--cache-mode sampled --samples N`);
* ce       a reference: CE on the true tokens only (`--mode ce`).

Fair by construction: one loop trains every arm. Per seed every arm starts from the same seeded
student, gets the same batches in the same order (one order of sample ids feeds every arm's
loader; each batch's input ids are hashed and must agree across arms) and uses the same
optimizer, LR schedule, steps, λ and τ = 1; every student is evaluated by the trainer's
`run_evaluation` on the same held-out samples. Caches the benchmark needs and was not given are
built into --out with `cache_teacher` (a re-run reuses them). Writes `cache_quality.json` (after
every finished run, so a long run shows progress) and `cache_quality.md` to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from train_student import dense_step, environment, sample_order

from kdpipe.experiments.stats import mean_interval
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.pipeline.teacher_info import describe_teacher
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.shard_reader import CacheIndex, build_index, columns_for
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.data import BatchLoader, GlobalBatch
from kdpipe.trainer.evaluate import run_evaluation
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.reliance import StepLambdas
from kdpipe.trainer.sampler import holdout_mask
from kdpipe.trainer.train import setup as setup_run
from kdpipe.trainer.train import train_step

log = logging.getLogger("cache_quality")

ARMS = ("online", "topk", "zero", "sampled", "ce")
LABELS = {"online": "(a) online dense KD", "topk": "(b) top-k + tail (forward)",
          "zero": "(c) top-k renormalised (zero)", "sampled": "(d) sampled cache",
          "ce": "CE only (reference)"}
CACHED_LOSS = {"topk": "forward", "zero": "zero", "sampled": "sampled"}  # arm -> --loss
GOAL_ARMS = ("topk", "sampled")
BASELINE = "online"


# --- caches: given, or built into --out -------------------------------------------------------

def build(args: argparse.Namespace, out: Path, data: tuple[str, ...], like: Cache | None,
          **options: Any) -> Path:
    """Run cache-teacher (skipped when `out` is already complete); settings of `like` if given."""
    settings: dict[str, Any] = {"top_k": args.top_k, "max_length": args.max_length,
                                "pack": True, "shard_size": 256}
    if like is not None:
        m = like.manifest
        settings = {"top_k": m.top_k, "max_length": m.max_length, "pack": m.layout == "packed",
                    "shard_size": m.shard_size, "text_field": m.corpus.text_field,
                    "split": m.corpus.split}
        if m.tokenizer.name_or_path != m.teacher.name_or_path:
            settings["tokenizer"] = m.tokenizer.name_or_path
    settings.update(options)
    log.info("building %s", out)
    cache_teacher(CacheTeacherConfig(teacher=args.teacher, data=data, out=str(out),
                                     device=args.device, batch_size=args.cache_batch_size,
                                     **settings))
    return out


def same_sequences(a: Cache, b: Cache) -> bool:
    """Whether two caches hold the same sample ids with the same token ids, shard by shard."""
    def key(c: Cache) -> list[tuple[int, int, int, str]]:
        return [(s.first_sample_id, s.last_sample_id, s.rows, s.tokens_sha256)
                for s in c.manifest.shards]
    return key(a) == key(b)


def prepare_caches(args: argparse.Namespace, arms: list[str]
                   ) -> tuple[Cache, Cache | None, Cache | None]:
    """(top-k cache, sampled cache or None, eval cache or None for a hash split), checked."""
    out = Path(args.out)
    teacher_fp = describe_teacher(args.teacher, "hf", "auto", False)[0].fingerprint
    if args.cache is None and not args.data:
        raise ConfigError("give --cache (a top-k cache made by --teacher) or --data to build one")
    topk = open_cache(args.cache or build(args, out / "cache-topk", tuple(args.data), None))
    if topk.manifest.cache_mode != "topk":
        raise ConfigError(f"--cache {topk.root} is a sampled cache; give a top-k cache")
    if topk.manifest.teacher.fingerprint != teacher_fp:
        raise ConfigError(f"--cache {topk.root} was made by another teacher "
                          f"({topk.manifest.teacher.name_or_path}) than --teacher "
                          f"{args.teacher}; rebuild it or pass the right --teacher")
    sampled = None
    if "sampled" in arms:
        path = args.sampled_cache or build(
            args, out / f"cache-sampled-{args.samples}",
            tuple(args.data) if args.data else topk.manifest.corpus.sources, topk,
            cache_mode="sampled", samples=args.samples, top_k=1)
        sampled = open_cache(path)
        if sampled.manifest.cache_mode != "sampled":
            raise ConfigError(f"--sampled-cache {path}: not a sampled cache "
                              "(`kdpipe cache-teacher --cache-mode sampled`)")
        if sampled.manifest.teacher.fingerprint != teacher_fp:
            raise ConfigError(f"--sampled-cache {path} was made by another teacher than "
                              f"--teacher {args.teacher}")
        if not same_sequences(topk, sampled):
            raise ConfigError(f"--sampled-cache {path} does not hold the same sequences as "
                              f"--cache {topk.root} (another corpus, tokenizer, --max-length or "
                              "layout); rebuild it from the same corpus")
    eval_cache = None
    if args.eval_cache or args.heldout:
        eval_cache = open_cache(args.eval_cache or build(
            args, out / "cache-heldout", tuple(args.heldout), topk))
        if eval_cache.manifest.tokenizer.fingerprint != topk.manifest.tokenizer.fingerprint:
            raise ConfigError(f"--eval-cache {eval_cache.root} was made with another tokenizer "
                              f"than --cache {topk.root}")
    return topk, sampled, eval_cache


# --- setup shared by every run ----------------------------------------------------------------

@dataclass
class Setup:
    """What every arm and seed shares: indexes, split, tokenizer, teacher, student spec."""

    topk: CacheIndex
    sampled: CacheIndex | None
    eval_index: CacheIndex
    eval_ids: np.ndarray  # (E,) held-out sample ids, storage order
    train_ids: np.ndarray  # (n,) sample ids training draws from
    teacher: torch.nn.Module | None
    student_config: str
    eval_teacher_matches: bool  # the eval cache's teacher is --teacher: held-out KD is to it


def write_student_config(args: argparse.Namespace, max_length: int) -> str:
    heads = max(args.hidden // 64, 1)
    spec = {"model_type": "llama", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": max_length, "tie_word_embeddings": True}
    path = Path(args.out) / "student_config.json"
    path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return str(path)


def load_teacher(path: str, vocab_size: int, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    teacher = cast(torch.nn.Module, AutoModelForCausalLM.from_pretrained(path,
                                                                         dtype=torch.float32))
    if teacher.get_output_embeddings().weight.shape[0] != vocab_size:  # type: ignore[operator]
        raise ConfigError(f"--teacher {path}: its vocabulary is not the cache's")
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_setup(args: argparse.Namespace, arms: list[str]) -> Setup:
    topk, sampled, eval_cache = prepare_caches(args, arms)
    manifest = topk.manifest
    device = resolve_device(args.device)
    index = build_index(topk)
    if eval_cache is None:  # a hash split of the training cache, as --eval-fraction does
        held = holdout_mask(index.sample_ids, args.eval_fraction)
        eval_index, eval_ids, train_ids = index, index.sample_ids[held], index.sample_ids[~held]
    else:
        eval_index = build_index(eval_cache)
        eval_ids, train_ids = eval_index.sample_ids, index.sample_ids
    eval_ids = eval_ids[:args.eval_max_samples]
    if eval_ids.size == 0 or train_ids.size == 0:
        raise ConfigError(f"--eval-fraction {args.eval_fraction} leaves no held-out or no "
                          "training samples; change it or give --eval-cache")
    eval_manifest = eval_index.cache.manifest
    return Setup(
        topk=index, sampled=build_index(sampled) if sampled is not None else None,
        eval_index=eval_index, eval_ids=eval_ids, train_ids=train_ids,
        teacher=load_teacher(args.teacher, manifest.vocab_size, device)
        if "online" in arms else None,
        student_config=write_student_config(args, manifest.max_length),
        eval_teacher_matches=eval_manifest.teacher.fingerprint == manifest.teacher.fingerprint)


def batch_digest(batch: GlobalBatch) -> str:
    """Hash of every micro-batch's input ids: the arms must see exactly the same tokens."""
    digest = hashlib.sha256()
    for mb in batch.micro:
        digest.update(np.ascontiguousarray(mb.input_ids.numpy()).tobytes())
        digest.update(str(tuple(mb.input_ids.shape)).encode())
    return digest.hexdigest()


def teacher_heldout_ce(index: CacheIndex, ids: np.ndarray) -> float:
    """The teacher's own held-out CE, from the cache's per-sequence teacher NLL (no forward)."""
    cache = index.cache
    sample_ids = cache.read_column(cols.SAMPLE_ID).to_numpy()
    nll = cache.read_column(cols.TEACHER_NLL).to_numpy().astype(np.float64)
    targets = cache.read_column(cols.NUM_TARGETS).to_numpy().astype(np.float64)
    chosen = np.isin(sample_ids, ids)
    return float((nll[chosen] * targets[chosen]).sum() / max(targets[chosen].sum(), 1.0))


# --- one run: an arm at a seed ----------------------------------------------------------------

def train_arm(arm: str, seed: int, setup: Setup, args: argparse.Namespace,
              digests: list[str]) -> dict[str, Any]:
    """Train one student and evaluate it; `digests` holds the seed's batch hashes so far."""
    index = setup.sampled if arm == "sampled" else setup.topk
    assert index is not None
    cfg = TrainConfig.from_options(
        cache=str(index.cache.root), out=args.out, student_config=setup.student_config,
        tokenizer=args.tokenizer, mode="ce" if arm == "ce" else "kd",
        loss=CACHED_LOSS.get(arm, "forward"), kd_weight=args.kd_weight, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, chunk_size=args.chunk_size,
        seed=seed, warmup_steps=args.warmup_steps, max_steps=args.steps,
        shuffle_window=args.shuffle_window, device=args.device, snapshots=False,
        progress=False)
    cfg.validate()
    run = setup_run(cfg)  # seeded by `seed`: every arm's student starts from the same weights
    order = sample_order(setup.topk, seed, args.shuffle_window, args.steps * run.per_step,
                         ids=setup.train_ids)
    columns = columns_for(index.cache, teacher=arm in CACHED_LOSS, temperature=1.0)
    curve: list[dict[str, float]] = []
    step = 0
    started = time.perf_counter()
    with BatchLoader(index, order, columns, args.batch_size, args.grad_accum, run.pad_id,
                     args.prefetch, cached_groups=args.shuffle_window) as loader:
        for step, batch in enumerate(loader, start=1):
            digest = batch_digest(batch)
            if len(digests) < step:
                digests.append(digest)
            elif digests[step - 1] != digest:
                raise AssertionError(f"seed {seed}, step {step}: arm {arm} got other input ids "
                                     "than the arms before it; the caches are not aligned")
            if arm == BASELINE:
                assert setup.teacher is not None
                result = dense_step(run.student.model, setup.teacher, run.optimizer,
                                    run.scheduler, batch, args.kd_weight, 1.0, run.device,
                                    run.amp_dtype, cfg.max_grad_norm)
            else:
                lam = StepLambdas.constant(args.kd_weight, batch.sample_ids.size)
                result = train_step(run, batch, lam, None, step)
            if step % args.log_every == 0 or step == args.steps:
                curve.append({"step": step, "loss": result["loss"], "ce": result["ce"],
                              "kd": result["kd"]})
                log.info("seed %d %s step %d/%d: loss %.4f ce %.4f", seed, arm, step,
                         args.steps, result["loss"], result["ce"])
    train_seconds = time.perf_counter() - started
    metrics = run_evaluation(run.student.parts, setup.eval_index, setup.eval_ids,
                             LossConfig(kd_weight=args.kd_weight, chunk_size=args.chunk_size),
                             run.device, run.amp_dtype, args.eval_batch_size, run.pad_id,
                             args.prefetch)
    return {"arm": arm, "seed": seed, "steps": step,
            "student_parameters": sum(p.numel() for p in run.student.model.parameters()),
            "train_seconds": train_seconds, "heldout_ce": metrics["ce"],
            "heldout_ppl": metrics["ppl"], "heldout_kd": metrics["kd"],
            "heldout_top1_agreement": metrics["top1_agreement"],
            "heldout_tokens": metrics["tokens"], "curve": curve}


# --- summary and report ----------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample sd (NaN for one value), min, max and the 95% t-interval of the mean."""
    interval = mean_interval(values)
    return {"mean": interval.estimate, "sd": interval.sd, "min": min(values),
            "max": max(values), "ci_low": interval.low, "ci_high": interval.high}


def summarise(runs: list[dict[str, Any]], goal: float) -> dict[str, Any]:
    """Per arm: held-out ppl over seeds and its ratio to the online arm, paired by seed."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    base = by_arm.get(BASELINE, {})
    summary: dict[str, Any] = {}
    for arm, seeds in by_arm.items():
        ppl = {s: r["heldout_ppl"] for s, r in sorted(seeds.items())}
        row: dict[str, Any] = {"label": LABELS[arm], "seeds": sorted(ppl),
                               "ppl_per_seed": ppl, "ppl": spread(list(ppl.values())),
                               "kd": spread([r["heldout_kd"] for r in seeds.values()]),
                               "top1": spread([r["heldout_top1_agreement"]
                                               for r in seeds.values()]),
                               "train_seconds": spread([r["train_seconds"]
                                                        for r in seeds.values()])}
        paired = [s for s in ppl if s in base]
        if paired:
            ratios = {s: ppl[s] / base[s]["heldout_ppl"] for s in paired}
            row["ratio_per_seed"] = ratios
            row["ratio"] = spread(list(ratios.values()))
            if arm in GOAL_ARMS:
                row["goal_met"] = row["ratio"]["mean"] <= 1.0 + goal
        summary[arm] = row
    return summary


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def markdown(summary: dict[str, Any], info: dict[str, Any]) -> str:
    env = info["environment"]
    lines = [f"`{info['command']}`", "",
             f"Machine: {env['nproc']} cores ({env['cpu']}), {env['accelerator']}, torch "
             f"{env['torch']} ({env['torch_threads']} threads), transformers "
             f"{env['transformers']}. Load average (1, 5, 15 min) before "
             f"{'/'.join(f'{x:.1f}' for x in env['load_average_before'])}. "
             f"{info['student_parameters']:,} student parameters; {info['steps']} steps × "
             f"{info['tokens_per_step']} sequences; held-out: {info['heldout']}.", "",
             "| arm | held-out ppl, mean ± sd | per seed | ratio to (a), per seed "
             "| ratio mean [95% CI] | held-out KD | top-1 agr. | train s |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        if arm not in summary:
            continue
        r = summary[arm]
        ratios = r.get("ratio_per_seed", {})
        ratio = r.get("ratio")
        lines.append(
            f"| {r['label']} | {fmt(r['ppl']['mean'], '.3f')} ± {fmt(r['ppl']['sd'], '.3f')} "
            f"| {' / '.join(fmt(v, '.3f') for v in r['ppl_per_seed'].values())} "
            f"| {' / '.join(fmt(v, '.4f') for v in ratios.values()) or '–'} "
            f"| {fmt(ratio['mean'] if ratio else None, '.4f')}"
            f" [{fmt(ratio['ci_low'] if ratio else None, '.4f')}, "
            f"{fmt(ratio['ci_high'] if ratio else None, '.4f')}] "
            f"| {fmt(r['kd']['mean'] if info['eval_teacher_matches'] else None, '.4f')} "
            f"| {fmt(r['top1']['mean'], '.4f')} | {fmt(r['train_seconds']['mean'], '.0f')} |")
    if info.get("teacher_heldout_ppl") is not None:
        lines.append(f"| teacher (from the cache) | {info['teacher_heldout_ppl']:.3f} | – | – "
                     "| – | 0 | 1 | – |")
    lines += ["", f"| goal: mean ratio to (a) ≤ {1 + info['goal']:.2f} | measured | met |",
              "|---|---:|---|"]
    for arm in GOAL_ARMS:
        if arm in summary and "goal_met" in summary[arm]:
            r = summary[arm]
            lines.append(f"| {r['label']} | {r['ratio']['mean']:.4f} | "
                         f"{'yes' if r['goal_met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, info: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    summary = summarise(runs, info["goal"])
    table = markdown(summary, info)
    (out / "cache_quality.json").write_text(json.dumps(
        {**info, "summary": summary, "runs": runs}, indent=1), encoding="utf-8")
    (out / "cache_quality.md").write_text(table, encoding="utf-8")
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="The teacher (HF model folder).")
    p.add_argument("--data", nargs="+", help="Training corpus: builds OUT/cache-topk when "
                   "--cache is not given, and the sampled cache.")
    p.add_argument("--cache", help="A top-k cache made by --teacher (default: built from --data).")
    p.add_argument("--sampled-cache", help="A sampled cache of the same sequences (default: "
                   "built into OUT/cache-sampled-N from the top-k cache's corpus and settings).")
    p.add_argument("--eval-cache", help="Held-out cache (same tokenizer); only its tokens and "
                   "teacher columns are read.")
    p.add_argument("--heldout", nargs="+", help="Held-out corpus: builds OUT/cache-heldout.")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="Without --eval-cache/--heldout: hold out this share of --cache by hash.")
    p.add_argument("--eval-max-samples", type=int, default=256, help="Held-out sequences used.")
    p.add_argument("--tokenizer", help="Default: the cache manifest's tokenizer.")
    p.add_argument("--out", default="runs/bench-cache-quality")
    p.add_argument("--arms", default=",".join(ARMS), help=f"Subset of {','.join(ARMS)}.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (init and order).")
    p.add_argument("--top-k", type=int, default=64, help="When building the top-k cache.")
    p.add_argument("--max-length", type=int, default=256, help="When building caches.")
    p.add_argument("--samples", type=int, default=50, help="Draws per position, sampled cache.")
    p.add_argument("--cache-batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--kd-weight", type=float, default=0.5, help="λ of every KD arm.")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--shuffle-window", type=int, default=16)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--goal", type=float, default=0.01,
                   help="(b) and (d) meet the goal when their mean ppl ratio to (a) <= 1 + goal.")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to OUT/cache_quality.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ConfigError(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if BASELINE not in arms:
        log.warning("no %s arm: no ratios, no goal", BASELINE)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    setup = make_setup(args, arms)
    info: dict[str, Any] = {
        "command": "python benchmarks/cache_quality.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "environment": env, "args": vars(args), "goal": args.goal, "steps": args.steps,
        "tokens_per_step": args.batch_size * args.grad_accum,
        "caches": {name: {"path": str(ix.cache.root),
                          "bytes_per_token": ix.cache.manifest.num_bytes
                          / max(ix.cache.manifest.num_targets, 1)}
                   for name, ix in (("topk", setup.topk), ("sampled", setup.sampled),
                                    ("eval", setup.eval_index)) if ix is not None},
        "heldout": (f"{setup.eval_ids.size} sequences of {setup.eval_index.cache.root}"
                    + ("" if setup.eval_index is not setup.topk else
                       f" (hash split, --eval-fraction {args.eval_fraction})")),
        "eval_teacher_matches": setup.eval_teacher_matches,
        "teacher_heldout_ppl": math.exp(teacher_heldout_ce(setup.eval_index, setup.eval_ids))
        if setup.eval_teacher_matches else None,
    }
    runs: list[dict[str, Any]] = []
    table = ""
    for seed in seeds:  # seeds outer, arms inner: partial results stay comparable
        digests: list[str] = []
        for arm in arms:
            runs.append(train_arm(arm, seed, setup, args, digests))
            info["student_parameters"] = runs[-1].pop("student_parameters")
            log.info("seed %d %s: held-out ppl %.3f (%.0f s)", seed, arm,
                     runs[-1]["heldout_ppl"], runs[-1]["train_seconds"])
            info["environment"]["load_average_after"] = os.getloadavg()
            table = write_results(out, info, runs)
    print(table)
    return cast(dict[str, Any], json.loads((out / "cache_quality.json").read_text("utf-8")))


if __name__ == "__main__":
    main()
