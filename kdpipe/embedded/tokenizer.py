"""A byte-level BPE tokenizer trained on the demo's train split, saved as a transformers tokenizer.

Byte-level, so every byte of any held-out file has a token; one special token,
`<|endoftext|>`, serves as BOS, EOS and padding (the trainer masks padding by attention, never
by id). Trained with `tokenizers` in seconds; skipped when OUT/tokenizer.json already exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL = "<|endoftext|>"


def _texts(corpus: Path) -> Iterator[str]:
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> Path:
    """Train on the `text` field of a JSON-lines file; returns the tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_texts(corpus), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    # Saved into a temporary folder and moved with tokenizer.json last: the file whose presence
    # means "done" above is never there before the rest.
    tmp = out.with_name(f".{out.name}.tmp")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL,
                            pad_token=SPECIAL).save_pretrained(tmp)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        path.replace(out / path.name)
    tmp.rmdir()
    log.info("tokenizer: %d tokens trained on %s -> %s", tok.get_vocab_size(), corpus, out)
    return out
