"""Benchmark: cache bytes saved by storing teacher columns only at a chat corpus's target positions.

    python benchmarks/chat_cache_bytes.py --teacher runs/demo-chat/teacher-run/final \
        --data runs/demo-chat/corpus/train.jsonl --ks 8,32,64

Run by hand (not a test); prints a Markdown table and writes it with the raw numbers to
`--out`. The same conversations are cached twice per k, packed as the demo caches them:
`--train-on assistant` (teacher columns at the positions predicting the assistant's replies
only, plus the `target_mask` column) and `--train-on all` (every position). Bytes are the
shards' file sizes (the manifest's `bytes`); per column, Parquet's compressed column-chunk
sizes.

Without `--teacher` and `--data` it builds its own inputs in OUT: the demo's chat corpus
(`kdpipe.embedded.chat`, `--train-chars` of message contents), a ChatML tokenizer trained on it
and a random-init Llama. Which positions are stored depends only on the corpus, the template
and `--train-on`; the bytes per stored position depend on k and a little on the teacher (zstd
packs a peaked distribution's ids and log-probs better than a flat one's), so the table says
which teacher was used.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from kdpipe.embedded.chat import write_chat_corpus
from kdpipe.embedded.models import ModelSize, init_model
from kdpipe.embedded.tokenizer import train_tokenizer
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache

TRAIN_ON = ("assistant", "all")
TOKEN_COLUMNS = (cols.SAMPLE_ID, cols.INPUT_IDS, cols.TARGET_MASK, cols.SEGMENTS,
                 cols.NUM_TARGETS)


def subset(data: Path, conversations: int, out: Path) -> tuple[Path, int]:
    """The first `conversations` rows of `data` (0: all) as OUT/subset.jsonl; (path, rows)."""
    rows = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:conversations] if conversations else rows
    path = out / "subset.jsonl"
    path.write_text("".join(line + "\n" for line in rows), encoding="utf-8")
    return path, len(rows)


def random_teacher(out: Path, train_chars: int, vocab_size: int, max_length: int
                   ) -> tuple[Path, Path]:
    """The demo's chat corpus (train split), a ChatML tokenizer on it, a random-init Llama."""
    train, _ = write_chat_corpus(out / "corpus", train_chars, heldout_chars=1)
    tokenizer = train_tokenizer(train, out / "tokenizer", vocab_size, chat=True)
    teacher = init_model(tokenizer, out / "teacher", ModelSize(64, 2, 2), max_length)
    return teacher, train


def column_bytes(cache_dir: Path) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over every shard and row group."""
    sizes: dict[str, int] = {}
    for shard in open_cache(cache_dir).manifest.shards:
        meta = pq.ParquetFile(cache_dir / shard.file).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                name = chunk.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
    return sizes


def measure(teacher: Path, data: Path, out: Path, k: int, train_on: str, max_length: int
            ) -> dict[str, Any]:
    """Cache `data` once; its bytes, tokens and targets."""
    manifest = cache_teacher(CacheTeacherConfig(
        teacher=str(teacher), data=(str(data),), out=str(out), top_k=k, max_length=max_length,
        pack=True, format="messages", train_on=train_on, batch_size=16, shard_size=256,
        device="cpu", dtype="float32", progress=False, overwrite=True))
    per_column = column_bytes(out)
    token_bytes = sum(per_column.get(name, 0) for name in TOKEN_COLUMNS)
    return {"k": k, "train_on": train_on, "bytes": manifest.num_bytes,
            "sequences": manifest.num_sequences, "tokens": manifest.num_tokens,
            "targets": manifest.num_targets,
            "bytes_per_token": manifest.num_bytes / manifest.num_tokens,
            "bytes_per_target": manifest.num_bytes / max(manifest.num_targets, 1),
            "token_column_bytes": token_bytes,
            "teacher_column_bytes": sum(per_column.values()) - token_bytes,
            "columns": per_column}


def report(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The Markdown table: per k, both caches and the ratio all / assistant."""
    lines = [f"Teacher: {info['teacher']}; {info['conversations']} conversations from "
             f"{info['data']}; packed, {info['max_length']} tokens per sequence.", "",
             "| k | --train-on | shard bytes | all tokens | target tokens | bytes/token (all "
             "tokens) | bytes/target token | teacher columns | token columns |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['train_on']} | {r['bytes']:,} | {r['tokens']:,} | "
                     f"{r['targets']:,} | {r['bytes_per_token']:.1f} | "
                     f"{r['bytes_per_target']:.1f} | {r['teacher_column_bytes']:,} | "
                     f"{r['token_column_bytes']:,} |")
    lines += ["", "| k | target fraction | bytes all / assistant | teacher columns all / "
              "assistant |", "|---|---|---|---|"]
    by_k: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_k.setdefault(r["k"], {})[r["train_on"]] = r
    for k, pair in by_k.items():
        a, b = pair["assistant"], pair["all"]
        lines.append(f"| {k} | {a['targets'] / a['tokens']:.3f} | {b['bytes'] / a['bytes']:.2f} "
                     f"| {b['teacher_column_bytes'] / a['teacher_column_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="A model folder whose tokenizer has a chat "
                        "template (default: a random-init ChatML Llama built in --out).")
    parser.add_argument("--data", type=Path, help="Conversations, JSON lines with `messages` "
                        "(default: the demo's chat corpus built in --out).")
    parser.add_argument("--conversations", type=int, default=0,
                        help="Cache the first N conversations (0: all).")
    parser.add_argument("--train-chars", type=int, default=200_000,
                        help="Without --data: message characters of the corpus built.")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="Without --teacher: the tokenizer's vocabulary.")
    parser.add_argument("--max-length", type=int, default=320, help="As `--preset chat`.")
    parser.add_argument("--ks", default="8,32,64")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-chat-cache-bytes"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if (args.teacher is None) != (args.data is None):
        parser.error("pass both --teacher and --data, or neither")
    if args.teacher is None:
        teacher, data = random_teacher(args.out, args.train_chars, args.vocab_size,
                                       args.max_length)
        described = "random-init Llama (hidden 64, 2 layers), ChatML tokenizer"
    else:
        teacher, data = args.teacher, args.data
        described = str(teacher)
    data, conversations = subset(data, args.conversations, args.out)
    rows = [measure(teacher, data, args.out / f"cache-k{k}-{train_on}", int(k), train_on,
                    args.max_length)
            for k in args.ks.split(",") for train_on in TRAIN_ON]
    info = {"teacher": described, "data": str(args.data or "the demo's chat corpus"),
            "conversations": conversations, "max_length": args.max_length,
            "machine": platform.platform(), "torch": torch.__version__}
    markdown = report(rows, info)
    (args.out / "chat_cache_bytes.md").write_text(markdown, encoding="utf-8")
    result = {"info": info, "rows": rows}
    (args.out / "chat_cache_bytes.json").write_text(json.dumps(result, indent=2) + "\n",
                                                    encoding="utf-8")
    print(markdown)
    return result


if __name__ == "__main__":
    main()
