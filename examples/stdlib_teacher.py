"""Build a small real teacher and its cache from the Python standard library's own source.

    python examples/stdlib_teacher.py --out runs/stdlib

Steps (each skipped when its output already exists, so a re-run resumes):
1. corpus: the stdlib's .py files, split by file into train and held-out JSON lines;
2. tokenizer: a byte-level BPE trained on the train split, saved as a transformers tokenizer;
3. teacher: a small Llama trained with `kdpipe train-student --mode ce` — the same trainer as
   every student. Training reads a cache, so the untrained model first caches the token
   stream at k = 1 (a "token cache"); the trained teacher then caches the real thing;
4. caches: `kdpipe cache-teacher` over train and held-out with the trained teacher.

Every stage is called through the same Python function the CLI calls. Sizes are set for a
laptop CPU: a ~5M-parameter teacher, a few minutes in all on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sysconfig
import zlib
from pathlib import Path

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.train import train

log = logging.getLogger("stdlib_teacher")
HELDOUT_PERCENT = 5


def stdlib_files() -> list[Path]:
    """The standard library's .py files, excluding installed third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def write_corpus(out: Path, max_mb: float) -> tuple[Path, Path]:
    """Split by file (a stable hash of its path) so held-out text is never seen in training."""
    out.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    if train_path.exists() and heldout_path.exists():
        return train_path, heldout_path
    root = Path(sysconfig.get_paths()["stdlib"])
    budget = int(max_mb * 1e6)
    written = 0
    with open(train_path, "w", encoding="utf-8") as train_f, \
            open(heldout_path, "w", encoding="utf-8") as heldout_f:
        for path in stdlib_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            name = str(path.relative_to(root))
            record = json.dumps({"text": text, "path": name}) + "\n"
            heldout = zlib.crc32(name.encode()) % 100 < HELDOUT_PERCENT
            if not heldout and written >= budget:
                continue
            (heldout_f if heldout else train_f).write(record)
            written += 0 if heldout else len(text)
    return train_path, heldout_path


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return
    texts = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", pad_token="<|endoftext|>"
                            ).save_pretrained(out)


def init_teacher(tokenizer_dir: Path, out: Path, hidden: int, layers: int,
                 max_length: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         max_position_embeddings=max_length, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stdlib"))
    parser.add_argument("--corpus-mb", type=float, default=1.5,
                        help="Characters of stdlib source in the train split (millions).")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out: Path = args.out
    train_jsonl, heldout_jsonl = write_corpus(out / "corpus", args.corpus_mb)
    train_tokenizer(train_jsonl, out / "tokenizer", args.vocab_size)
    init_teacher(out / "tokenizer", out / "teacher-init", args.hidden, args.layers,
                 args.max_length)

    def cache(teacher: Path, data: Path, dest: str, top_k: int) -> Path:
        cache_teacher(CacheTeacherConfig(teacher=str(teacher), data=(str(data),),
                                         out=out / dest, top_k=top_k, pack=True,
                                         max_length=args.max_length, batch_size=16,
                                         shard_size=256))
        return out / dest

    token_cache = cache(out / "teacher-init", train_jsonl, "token-cache", top_k=1)
    train(TrainConfig(cache=str(token_cache), out=str(out / "teacher-run"),
                      student=str(out / "teacher-init"), mode="ce", lr=2e-3, warmup_steps=20,
                      batch_size=16, max_steps=args.teacher_steps, eval_fraction=0.02,
                      save_every=100, resume=(out / "teacher-run").exists()))
    teacher = out / "teacher-run" / "final"
    train_cache = cache(teacher, train_jsonl, "cache", args.top_k)
    heldout_cache = cache(teacher, heldout_jsonl, "heldout-cache", args.top_k)
    log.info("teacher: %s", teacher)
    log.info("caches: %s (train), %s (held-out); try `kdpipe inspect %s`", train_cache,
             heldout_cache, train_cache)


if __name__ == "__main__":
    main()
