"""Benchmark `kdpipe cache-teacher`: throughput against a bare forward pass, cache size, precision.

    python benchmarks/cache_teacher.py --teacher runs/stdlib/teacher-run/final \
        --data runs/stdlib/corpus/train.jsonl --tokens 120000

Run by hand (not a test); it prints a Markdown report and writes it with the raw numbers to
`--out`. Needs a teacher trained on real text (examples/stdlib_teacher.py builds one): a
random-init teacher is near-uniform and says nothing about size or precision.

(a) cache-teacher tokens/s over a bare `model(...)` forward pass on the same batches, in the
    same process. The stage's time includes loading tokenizer and model, reading and
    tokenizing the corpus, the top-k/tail reductions and writing shards: the ratio is
    conservative.
(b) bytes per cached token and per stored (id, log-prob) entry at several k.
(c) float16 vs float32 log-prob storage: KL from the exact top-k+tail partition to the one
    decoded from float16 (renormalised, as the trainer does), and the bytes saved.

With `--cache-mode sampled --samples N` it measures only a sampled cache at N draws per
position: bytes per token, and unique ids per position.

With `--encoding compact` it measures only the compact encoding instead: bytes per stored
(id, log-prob) entry at the largest k, plain float16 and compact side by side, and the mean KL
from the exact (float32) top-k+tail partition to the one decoded from the compact cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.pipeline.corpus import iter_documents, resolve_sources
from kdpipe.pipeline.sequences import iter_sequences
from kdpipe.pipeline.teacher_hf import load_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.encoding import decode_topk
from kdpipe.tokenizer_identity import load_tokenizer


def corpus_subset(data: str, tokenizer_path: str, tokens: int, out: Path) -> Path:
    """The first documents of `data` holding about `tokens` tokens, as JSON lines."""
    tokenizer = load_tokenizer(tokenizer_path, False, "--teacher")
    path = out / "subset.jsonl"
    total = 0
    with path.open("w", encoding="utf-8") as f:
        for text in iter_documents(resolve_sources([data])):
            f.write(json.dumps({"text": text}) + "\n")
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if total >= tokens:
                break
    return path


def bare_forward_seconds(cfg: CacheTeacherConfig) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of the teacher's forward alone over the stage's own batches
    (same order, same sizes)."""
    tokenizer = load_tokenizer(cfg.teacher_model, False, "--teacher")
    seqs = [s.ids for s in iter_sequences(iter_documents(resolve_sources(cfg.data)), tokenizer,
                                          cfg.max_length, cfg.layout)]
    model = load_teacher(cfg.teacher_model, torch.device("cpu"), torch.float32, False)
    pad = tokenizer.pad_token_id or 0
    elapsed = cpu = 0.0
    for start in range(0, len(seqs), cfg.shard_size):
        shard = sorted(seqs[start:start + cfg.shard_size], key=len, reverse=True)
        for b in range(0, len(shard), cfg.batch_size):
            batch = shard[b:b + cfg.batch_size]
            width = len(batch[0])
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            began, began_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask).logits.sum().item()
            elapsed += time.perf_counter() - began
            cpu += time.process_time() - began_cpu
    return elapsed, cpu, sum(len(s) for s in seqs)


def timed_cache(cfg: CacheTeacherConfig) -> tuple[float, float]:
    """(wall s, CPU s of the whole process) of the stage."""
    began, began_cpu = time.perf_counter(), time.process_time()
    cache_teacher(cfg)
    return time.perf_counter() - began, time.process_time() - began_cpu


def float16_distortion(cache_dir: Path) -> dict[str, float]:
    """KL(exact partition || partition decoded from float16 log-probs), per position."""
    cache = open_cache(cache_dir)
    k = cache.manifest.top_k
    kls, max_abs = [], 0.0
    for table in cache.iter_row_groups(["topk_logprobs", "tail_logmass"]):
        lp = np.concatenate(table.column("topk_logprobs").to_numpy(zero_copy_only=False)
                            ).astype(np.float64).reshape(-1, k)
        tail = np.concatenate(table.column("tail_logmass").to_numpy(zero_copy_only=False)
                              ).astype(np.float64)
        exact = np.concatenate([lp, tail[:, None]], axis=1)  # (n, k+1), float32-exact
        decoded = exact.copy()
        decoded[:, :k] = lp.astype(np.float16).astype(np.float64)
        decoded -= np.logaddexp.reduce(decoded, axis=1, keepdims=True)  # trainer renormalises
        exact -= np.logaddexp.reduce(exact, axis=1, keepdims=True)
        p = np.exp(exact)
        finite = np.isfinite(exact)
        terms = np.where(finite, p * (np.where(finite, exact, 0) - np.where(finite, decoded, 0)),
                         0.0)
        kls.append(terms.sum(1))
        max_abs = max(max_abs, float(np.abs(lp.astype(np.float16) - lp)[np.isfinite(lp)].max()))
    kl = np.concatenate(kls)
    return {"mean_kl": float(kl.mean()), "p99_kl": float(np.quantile(kl, 0.99)),
            "max_kl": float(kl.max()), "max_abs_logprob_error": max_abs}


TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "topk_id_deltas", "topk_logprob_q")


def compact_distortion(exact_dir: Path, compact_dir: Path) -> dict[str, float]:
    """KL(exact float32 partition || partition decoded from the compact cache), per position."""
    exact_cache, compact_cache = open_cache(exact_dir), open_cache(compact_dir)
    k = exact_cache.manifest.top_k
    kls, max_abs = [], 0.0
    pairs = zip(exact_cache.iter_row_groups(["topk_ids", "topk_logprobs", "tail_logmass"]),
                compact_cache.iter_row_groups(["topk_id_deltas", "topk_logprob_q"]),
                strict=True)
    for exact, compact in pairs:
        def flat(table: pa.Table, name: str) -> np.ndarray:
            return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

        ids = flat(exact, "topk_ids").astype(np.int64).reshape(-1, k)
        lp = flat(exact, "topk_logprobs").astype(np.float64).reshape(-1, k)
        tail = flat(exact, "tail_logmass").astype(np.float64)
        dec_ids, dec_lp = decode_topk(flat(compact, "topk_id_deltas"),
                                      flat(compact, "topk_logprob_q"), k)
        dec_ids, dec_lp = dec_ids.reshape(-1, k), dec_lp.astype(np.float64).reshape(-1, k)
        by_id, dec_by_id = np.argsort(ids, 1), np.argsort(dec_ids, 1)  # align the two orders
        assert np.array_equal(np.take_along_axis(ids, by_id, 1),
                              np.take_along_axis(dec_ids, dec_by_id, 1))
        lp, dec_lp = np.take_along_axis(lp, by_id, 1), np.take_along_axis(dec_lp, dec_by_id, 1)
        max_abs = max(max_abs, float(np.abs(lp - dec_lp).max()))
        p = np.concatenate([lp, tail[:, None]], axis=1)  # (n, k+1)
        q = np.concatenate([dec_lp, tail[:, None]], axis=1)
        p -= np.logaddexp.reduce(p, axis=1, keepdims=True)
        q -= np.logaddexp.reduce(q, axis=1, keepdims=True)  # the trainer renormalises
        finite = np.isfinite(p)
        kls.append(np.where(finite, np.exp(p) * (np.where(finite, p, 0)
                                                 - np.where(finite, q, 0)), 0.0).sum(1))
    kl = np.concatenate(kls)
    return {"mean_kl": float(kl.mean()), "p99_kl": float(np.quantile(kl, 0.99)),
            "max_kl": float(kl.max()), "max_abs_logprob_error": max_abs}


def compact_report(config: Callable[..., CacheTeacherConfig], k: int
                   ) -> tuple[dict[str, Any], list[str]]:
    """Plain float16, plain float32 (the exact reference) and compact caches at top-k `k`."""
    plain, exact = config(k, "plain"), config(k, "exact", logprob_dtype="float32")
    compact = config(k, "compact", encoding="compact")
    for cfg in (plain, exact, compact):
        cache_teacher(cfg)
    sizes = {name: cache_size(cfg.out_dir) for name, cfg in
             (("plain", plain), ("float32", exact), ("compact", compact))}
    distortion = compact_distortion(exact.out_dir, compact.out_dir)
    lines = [
        f"| encoding (k={k}) | bytes/token | bytes/entry (all columns) | "
        "bytes/entry (top-k columns) |",
        "|---|---|---|---|",
        *[f"| {name} | {s['bytes_per_token']:.1f} | {s['bytes_per_entry']:.3f} | "
          f"{s['topk_bytes_per_entry']:.3f} |" for name, s in sizes.items()],
        "",
        f"compact vs exact float32 top-k+tail partition: mean KL {distortion['mean_kl']:.2e} "
        f"nats, p99 {distortion['p99_kl']:.2e}, max {distortion['max_kl']:.2e}; "
        f"max |Δ log-prob| {distortion['max_abs_logprob_error']:.4f}.",
    ]
    return {"sizes": sizes, "compact_distortion": distortion}, lines


def sampled_report(config: Callable[..., CacheTeacherConfig], samples: int
                   ) -> tuple[dict[str, Any], list[str]]:
    """A sampled cache at `samples` draws per position: size and unique ids per position."""
    cfg = config(1, "sampled", cache_mode="sampled", samples=samples)
    cache_teacher(cfg)
    size = cache_size(cfg.out_dir)
    unique = np.concatenate([
        t.column("sampled_lengths").combine_chunks().flatten().to_numpy().astype(np.int64)
        for t in open_cache(cfg.out).iter_row_groups(["sampled_lengths"])])
    lines = [f"sampled cache, N = {samples}: {size['bytes_per_token']:.1f} bytes/token, "
             f"{unique.mean():.1f} unique ids per position (median {np.median(unique):.0f}); "
             "bytes/token by column: " + ", ".join(
                 f"{n} {b:.1f}" for n, b in size["column_bytes_per_token"].items())]
    return {"size": size, "mean_unique": float(unique.mean())}, lines


def cache_size(cache_dir: Path) -> dict[str, Any]:
    m = open_cache(cache_dir).manifest
    columns: dict[str, int] = {}
    for shard in m.shards:
        meta = pq.ParquetFile(cache_dir / shard.file).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0]
                columns[name] = columns.get(name, 0) + col.total_compressed_size
    targets = m.num_targets
    return {"k": m.top_k, "bytes": m.num_bytes, "targets": targets,
            "bytes_per_token": m.num_bytes / targets,
            "bytes_per_entry": m.num_bytes / (targets * m.top_k),
            "topk_bytes_per_entry": sum(columns.get(c, 0) for c in TOPK_COLUMNS)
            / (targets * m.top_k),
            "column_bytes_per_token": {n: b / targets for n, b in columns.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokens", type=int, default=120_000, help="Corpus size to cache.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ks", default="8,32,64")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cache-teacher"))
    parser.add_argument("--encoding", choices=("plain", "compact"), default="plain",
                        help="compact: measure only the compact encoding (size, distortion).")
    parser.add_argument("--cache-mode", choices=("topk", "sampled"), default="topk",
                        help="sampled: measure only a sampled cache of --samples draws.")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch CPU threads (one: CPU time is steadier on a shared machine).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = corpus_subset(args.data, args.teacher, args.tokens, tmp)

        def config(k: int, name: str, **kw: object) -> CacheTeacherConfig:
            return CacheTeacherConfig(teacher=args.teacher, data=(str(data),), out=str(tmp / name),
                                      top_k=k, max_length=args.max_length, pack=True,
                                      batch_size=args.batch_size, shard_size=256, device="cpu",
                                      dtype="float32", threads=args.threads,
                                      **kw)  # type: ignore[arg-type]

        ks = [int(k) for k in args.ks.split(",")]
        if args.encoding == "compact" or args.cache_mode == "sampled":
            name = "compact" if args.encoding == "compact" else "sampled"
            only, lines = (compact_report(config, max(ks)) if name == "compact"
                           else sampled_report(config, args.samples))
            report = "\n".join(lines)
            print(report)
            (args.out / f"{name}.json").write_text(json.dumps(only, indent=2))
            (args.out / f"{name}.md").write_text(report + "\n")
            return
        main_cfg = config(max(ks), f"k{max(ks)}")
        # Bracket the stage with two forward timings: a shared machine's load drifts.
        forward_before, cpu_before, tokens = bare_forward_seconds(main_cfg)
        stage_s, stage_cpu = timed_cache(main_cfg)
        forward_after, cpu_after, _ = bare_forward_seconds(main_cfg)
        forward_s = (forward_before + forward_after) / 2
        forward_cpu = (cpu_before + cpu_after) / 2
        sizes = [cache_size(main_cfg.out_dir)]
        for k in ks:
            if k != max(ks):
                cache_teacher(config(k, f"k{k}"))
                sizes.insert(len(sizes) - 1, cache_size(tmp / f"k{k}"))
        f32_cfg = config(max(ks), "f32", logprob_dtype="float32")
        cache_teacher(f32_cfg)
        precision = float16_distortion(f32_cfg.out_dir)
        f32_size = cache_size(f32_cfg.out_dir)

    results = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "tokens": tokens, "forward_tok_s": tokens / forward_s, "stage_tok_s": tokens / stage_s,
        "throughput_ratio": forward_s / stage_s, "cpu_ratio": forward_cpu / stage_cpu,
        "forward_tok_cpu_s": tokens / forward_cpu, "stage_tok_cpu_s": tokens / stage_cpu,
        "sizes": sizes, "float32_size": f32_size,
        "float16_precision": precision,
    }
    lines = [
        f"tokens cached: {tokens}; bare forward {results['forward_tok_s']:.0f} tok/s, "
        f"cache-teacher {results['stage_tok_s']:.0f} tok/s, "
        f"ratio {results['throughput_ratio']:.2f}; per CPU-second: bare forward "
        f"{results['forward_tok_cpu_s']:.0f} tok, cache-teacher {results['stage_tok_cpu_s']:.0f}"
        f" tok, ratio **{results['cpu_ratio']:.2f}** (goal ≥ 0.9)",
        "",
        "| k | bytes/token | bytes/entry (all columns) | bytes/entry (top-k ids + log-probs) |",
        "|---|---|---|---|",
        *[f"| {s['k']} | {s['bytes_per_token']:.1f} | {s['bytes_per_entry']:.2f} | "
          f"{s['topk_bytes_per_entry']:.2f} |" for s in sizes],
        "",
        f"float32 log-probs at k={max(ks)}: {f32_size['bytes_per_token']:.1f} bytes/token "
        f"({f32_size['bytes_per_entry']:.2f}/entry). float16: mean KL(exact || float16) "
        f"{precision['mean_kl']:.2e} nats, p99 {precision['p99_kl']:.2e}, max "
        f"{precision['max_kl']:.2e}; max |Δ log-prob| {precision['max_abs_logprob_error']:.2e}.",
    ]
    report = "\n".join(lines)
    print(report)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "report.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
