"""Benchmark how much of the corpus each `cache-teacher` worker tokenizes, before and after the
corpus split (docs/distributed.md).

    python benchmarks/cache_workers.py --workers 4 --train-chars 1500000

Run by hand (not a test); it prints a Markdown report and writes it with the raw numbers to
`--out`. The corpus is the embedded one (the standard library's source as `train.jsonl`, the
demo's `--preset full` budget by default) with a BPE tokenizer trained on it, as the demo builds
them.

The N workers run at once, one process each, as a launcher starts them, and each produces the
whole sequence stream a worker of `cache-teacher` consumes (`inputs.cache_sequences`) — no
teacher: the teacher's work does not change. *before*: every worker reads and tokenizes the
whole corpus (what `--num-workers N` did before the split; a corpus it cannot split still
does). *after*: each worker tokenizes its share and reads the others' token ids. For each worker
it counts the documents and tokens through the tokenizer (its encode calls are wrapped), wall
time and process CPU time (the tokenizer's own threads included); every stream's digest must
equal a single worker's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.embedded.corpus import write_corpus
from kdpipe.embedded.tokenizer import train_tokenizer
from kdpipe.pipeline import sequences
from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.pipeline.corpus import CorpusStats, resolve_sources
from kdpipe.pipeline.inputs import cache_sequences, resolve_reading
from kdpipe.tokenizer_identity import load_tokenizer

MODES = ("before", "after")


def _counting_encoder(counts: dict[str, int]) -> Any:
    """`sequences._encoder`, wrapped to count the texts and tokens it encodes."""
    real = sequences._encoder

    def encoder(tokenizer: Any, add_special_tokens: bool) -> Any:
        encode = real(tokenizer, add_special_tokens)

        def counted(texts: list[str]) -> list[list[int]]:
            ids = encode(texts)
            counts["documents"] += len(texts)
            counts["tokens"] += sum(len(i) for i in ids)
            return ids

        return counted

    return encoder


def run_worker(job: dict[str, Any], start: Any = None) -> dict[str, Any]:
    """One worker's whole sequence stream; what it tokenized, its time and the stream's digest.
    `start`: a barrier the workers pass together once set up (imports, tokenizer), so that
    they start at once, as workers launched together do after loading."""
    import pyarrow.parquet  # noqa: F401  (imported by any cache-teacher run: not timed)

    counts = {"documents": 0, "tokens": 0}
    sequences._encoder = _counting_encoder(counts)  # in this process only
    cfg = CacheTeacherConfig(teacher="unused", data=(job["data"],), out=job["out"],
                             max_length=job["max_length"], pack=job["pack"],
                             num_workers=job["num_workers"], worker_index=job["worker_index"])
    tokenizer = load_tokenizer(job["tokenizer"], False, "--tokenizer")
    sources = resolve_sources(cfg.data)
    reading = resolve_reading(cfg, sources, tokenizer)
    if start is not None:
        start.wait()
    started, cpu_started = time.perf_counter(), time.process_time()
    digest = hashlib.sha256()
    stats = CorpusStats()
    stream = cache_sequences(cfg, reading, sources, tokenizer, stats, key="bench")
    counts["documents"] = counts["tokens"] = 0  # the tokenizer's probe texts, not the corpus
    n = 0
    for seq in stream:
        for part in (seq.ids, seq.targets or [], seq.segments or [], [-1]):
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
        n += 1
    return {"worker": job["worker_index"], "mode": job["mode"],
            "documents": counts["documents"],
            "tokens": counts["tokens"], "wall_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu_started, "sequences": n,
            "documents_read": stats.documents_read, "digest": digest.hexdigest()}


def _worker_process(job: dict[str, Any], start: Any, results: Any) -> None:
    results.put(run_worker(job, start))


def measure(mode: str, args: argparse.Namespace, data: Path, tokenizer: Path, work: Path
            ) -> list[dict[str, Any]]:
    """All workers of one mode at once, one process each."""
    out = work / f"cache-{mode}"
    jobs = [{"mode": mode, "data": str(data), "tokenizer": str(tokenizer), "out": str(out),
             "max_length": args.max_length, "pack": args.pack, "worker_index": i,
             "num_workers": args.workers if mode == "after" else 1}
            for i in range(args.workers)]
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(args.workers), context.Queue()
    processes = [context.Process(target=_worker_process, args=(job, start, results))
                 for job in jobs]
    for process in processes:
        process.start()
    rows = [results.get() for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a {mode} worker failed (exit code {process.exitcode})")
    return sorted(rows, key=lambda r: r["worker"])


def report(rows: list[dict[str, Any]], reference: dict[str, Any], info: dict[str, Any]) -> str:
    docs, tokens = reference["documents_read"], reference["tokens"]
    lines = [f"cache-teacher workers over {info['corpus']}: {docs:,} documents, {tokens:,} "
             f"tokens; {info['workers']} workers at once, `--max-length {info['max_length']}`"
             f"{' --pack' if info['pack'] else ''}; {info['machine']}, "
             f"{info['cpus']} CPUs", "",
             "| mode | worker | documents tokenized | tokens tokenized | share of the corpus "
             "(tokens) | wall s | CPU s | stream = one worker's |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['worker']} | {r['documents']:,} | {r['tokens']:,} | "
                     f"{r['tokens'] / tokens:.2f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{'yes' if r['digest'] == reference['digest'] else 'NO'} |")
    lines += ["", "| mode | tokens tokenized, all workers / corpus | documents, all workers / "
              "corpus | largest worker's tokens / corpus | wall s (slowest worker) | "
              "CPU s (all workers) |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        of = [r for r in rows if r["mode"] == mode]
        lines.append(f"| {mode} | {sum(r['tokens'] for r in of) / tokens:.2f} | "
                     f"{sum(r['documents'] for r in of) / docs:.2f} | "
                     f"{max(r['tokens'] for r in of) / tokens:.2f} | "
                     f"{max(r['wall_s'] for r in of):.2f} | {sum(r['cpu_s'] for r in of):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--train-chars", type=int, default=1_500_000,
                        help="Characters of standard library source (the demo's full preset).")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pack", action="store_true", help="The packed layout.")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cache-workers"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    data, _ = write_corpus(args.out / "corpus", args.train_chars, 0)
    tokenizer = train_tokenizer(data, args.out / "tokenizer", args.vocab_size)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work = Path(tmp)
        reference = run_worker({"mode": "one worker", "data": str(data), "worker_index": 0,
                                "tokenizer": str(tokenizer), "out": str(work / "single"),
                                "max_length": args.max_length, "pack": args.pack,
                                "num_workers": 1})
        rows = [r for mode in MODES for r in measure(mode, args, data, tokenizer, work)]
    info = {"corpus": f"the stdlib corpus ({args.train_chars:,} characters)",
            "workers": args.workers, "max_length": args.max_length, "pack": args.pack,
            "machine": platform.platform(), "cpus": os.cpu_count()}
    markdown = report(rows, reference, info)
    (args.out / "cache_workers.md").write_text(markdown, encoding="utf-8")
    result = {"info": info, "reference": reference, "rows": rows}
    (args.out / "cache_workers.json").write_text(json.dumps(result, indent=2) + "\n",
                                                 encoding="utf-8")
    print(markdown)
    return result


if __name__ == "__main__":
    main()
