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
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.pipeline.corpus import iter_documents, resolve_sources
from kdpipe.pipeline.sequences import iter_sequences
from kdpipe.pipeline.teacher_hf import load_teacher
from kdpipe.pipeline.teacher_info import load_tokenizer
from kdpipe.schemas.cache import open_cache


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


def bare_forward_seconds(cfg: CacheTeacherConfig) -> tuple[float, int]:
    """Time the teacher's forward alone over the stage's own batches (same order, same sizes)."""
    tokenizer = load_tokenizer(cfg.teacher, False, "--teacher")
    seqs = list(iter_sequences(iter_documents(resolve_sources(cfg.data)), tokenizer,
                               cfg.max_length, cfg.layout))
    model = load_teacher(cfg.teacher, torch.device("cpu"), torch.float32, False)
    pad = tokenizer.pad_token_id or 0
    elapsed = 0.0
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
            began = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask).logits.sum().item()
            elapsed += time.perf_counter() - began
    return elapsed, sum(len(s) for s in seqs)


def timed_cache(cfg: CacheTeacherConfig) -> float:
    began = time.perf_counter()
    cache_teacher(cfg)
    return time.perf_counter() - began


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


def cache_size(cache_dir: Path) -> dict[str, float]:
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
            "topk_bytes_per_entry": (columns["topk_ids"] + columns["topk_logprobs"])
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = corpus_subset(args.data, args.teacher, args.tokens, tmp)

        def config(k: int, name: str, **kw: object) -> CacheTeacherConfig:
            return CacheTeacherConfig(teacher=args.teacher, data=(str(data),), out=tmp / name,
                                      top_k=k, max_length=args.max_length, pack=True,
                                      batch_size=args.batch_size, shard_size=256, device="cpu",
                                      dtype="float32", **kw)  # type: ignore[arg-type]

        ks = [int(k) for k in args.ks.split(",")]
        main_cfg = config(max(ks), f"k{max(ks)}")
        # Bracket the stage with two forward timings: a shared machine's load drifts.
        forward_before, tokens = bare_forward_seconds(main_cfg)
        stage_s = timed_cache(main_cfg)
        forward_after, _ = bare_forward_seconds(main_cfg)
        forward_s = (forward_before + forward_after) / 2
        sizes = [cache_size(main_cfg.out)]
        for k in ks:
            if k != max(ks):
                cache_teacher(config(k, f"k{k}"))
                sizes.insert(len(sizes) - 1, cache_size(tmp / f"k{k}"))
        f32_cfg = config(max(ks), "f32", logprob_dtype="float32")
        cache_teacher(f32_cfg)
        precision = float16_distortion(f32_cfg.out)
        f32_size = cache_size(f32_cfg.out)

    results = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "tokens": tokens, "forward_tok_s": tokens / forward_s, "stage_tok_s": tokens / stage_s,
        "throughput_ratio": forward_s / stage_s, "sizes": sizes, "float32_size": f32_size,
        "float16_precision": precision,
    }
    lines = [
        f"tokens cached: {tokens}; bare forward {results['forward_tok_s']:.0f} tok/s, "
        f"cache-teacher {results['stage_tok_s']:.0f} tok/s, "
        f"ratio **{results['throughput_ratio']:.2f}** (goal ≥ 0.9)",
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
