"""A teacher cache of any vocabulary size, from a random-weight teacher, for speed benchmarks.

    python benchmarks/random_teacher_cache.py --vocab 32000 --out runs/bench-cache-32k

Stdlib source as the corpus, a byte-level BPE tokenizer trained to `--vocab` ids (it
says how many it reached), a freshly
initialised Llama teacher (never trained) and `cache-teacher` over the corpus, packed, at
top-`--top-k`. Throughput and memory of `train-student` (benchmarks/train_student.py) depend
on the shapes (tokens, V, k), not on what the teacher knows, so a random teacher measures
them as well as a trained one, at any V, in a minute rather than the hour that
examples/stdlib_teacher.py takes to train one. Not for quality benchmarks: a random teacher
is near-uniform. Each stage is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdpipe.embedded.corpus import write_corpus
from kdpipe.embedded.models import ModelSize, init_model
from kdpipe.embedded.prepare import cache_complete
from kdpipe.embedded.tokenizer import train_tokenizer
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.cache import open_cache


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab", type=int, default=4096, help="Tokenizer (and cache) ids.")
    p.add_argument("--chars", type=int, default=400_000,
                   help="Characters of stdlib source to cache.")
    p.add_argument("--tokenizer-chars", type=int, default=1_500_000,
                   help="Characters of other stdlib files to train the tokenizer on (BPE "
                   "reaches about 20k ids on 1.5M characters; 32k ids need about 6M).")
    p.add_argument("--max-length", type=int, default=256, help="Tokens per packed sequence.")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The tokenizer learns from the larger split; the smaller one is cached.
    train_jsonl, cached_jsonl = write_corpus(args.out / "corpus", args.tokenizer_chars,
                                             args.chars)
    tokenizer = train_tokenizer(train_jsonl, args.out / "tokenizer", args.vocab)
    teacher = init_model(tokenizer, args.out / "teacher", ModelSize(64, 2, 2), args.max_length)
    cache = args.out / "cache"
    if not cache_complete(cache):
        cache_teacher(CacheTeacherConfig(teacher=str(teacher), data=(str(cached_jsonl),),
                                         out=cache, top_k=args.top_k, pack=True,
                                         max_length=args.max_length, batch_size=32,
                                         shard_size=512, device=args.device, progress=False))
    print(f"cache: {cache}, vocab_size {open_cache(cache).manifest.vocab_size}")


if __name__ == "__main__":
    main()
