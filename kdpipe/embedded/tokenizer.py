"""A byte-level BPE tokenizer trained on the demo's train split, saved as a transformers tokenizer.

Byte-level, so every byte of any held-out file has a token. For the source corpus one special
token, `<|endoftext|>`, serves as BOS, EOS and padding (the trainer masks padding by attention,
never by id). For the chat corpus the tokenizer is ChatML's, as Qwen's: `<|im_start|>` and
`<|im_end|>` open and close a turn, `<|im_end|>` is the EOS (a reply ends there),
`<|endoftext|>` pads, there is no BOS, and `CHATML` is its chat template, so
`apply_chat_template` and `cache-teacher --format messages` render conversations with it.
Trained with `tokenizers` in seconds; skipped when OUT/tokenizer.json already exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _texts(corpus: Path) -> Iterator[str]:
    """A row's `text`, or each message of its `messages` as the template writes it between the
    special tokens (`role\\ncontent`), so BPE learns the role names and newlines too."""
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "messages" in row:
                    yield from (f"{m['role']}\n{m['content']}\n" for m in row["messages"])
                else:
                    yield row["text"]


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, chat: bool = False) -> Path:
    """Train on the `text` (or `messages`) rows of a JSON-lines file; returns the tokenizer
    folder. `chat`: ChatML special tokens and chat template (module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    specials = [SPECIAL, IM_START, IM_END] if chat else [SPECIAL]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_texts(corpus), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    if chat:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=SPECIAL,
                                       additional_special_tokens=[IM_START, IM_END])
        fast.chat_template = CHATML
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL,
                                       pad_token=SPECIAL)
    # Saved into a temporary folder and moved with tokenizer.json last: the file whose presence
    # means "done" above is never there before the rest.
    tmp = out.with_name(f".{out.name}.tmp")
    fast.save_pretrained(tmp)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        path.replace(out / path.name)
    tmp.rmdir()
    log.info("tokenizer: %d tokens trained on %s -> %s", tok.get_vocab_size(), corpus, out)
    return out
