"""Shared fixtures: a tiny BPE tokenizer and tiny Llama/GPT-2 models, saved and loaded by path,
and the model families of `families.py` (Qwen2, Llama, Gemma 2, GPT-2 with their quirks).

They take exactly the code path a hub model takes (`from_pretrained(path)`), in well under a
second, from text no one here wrote: a few modules of the Python standard library.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from .families import Family, build_family

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_MODULES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py",
                  "glob.py", "keyword.py", "heapq.py", "string.py", "abc.py"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
TINY_VOCAB = 320


def stdlib_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in SAMPLE_MODULES]


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few stdlib modules, saved as a HF tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(out_dir)
    return fast


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `kdpipe ARGS` in this process; returns (exit code, stdout, stderr)."""
    from kdpipe.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    threads spinning against loader and writer threads make each tiny op ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tiny_tokenizer(out)
    return out


def save_tiny_llama(out: Path, vocab_size: int, seed: int = 0, hidden: int = 32,
                    layers: int = 2) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = LlamaForCausalLM(config)
    # A random init is near-uniform; widen the logits so top-k and tails are non-trivial.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny Llama teacher sharing the tiny tokenizer (saved alongside it, as on the hub)."""
    out = tmp_path_factory.mktemp("teacher")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    save_tiny_llama(out, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 with the same tokenizer: a second architecture, used as a student."""
    out = tmp_path_factory.mktemp("gpt2")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=256, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture()
def jsonl_corpus(tmp_path: Path) -> Path:
    """Ten stdlib modules as a JSON-lines corpus with a `text` field."""
    path = tmp_path / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for text in stdlib_texts():
            f.write(json.dumps({"text": text[:3000]}) + "\n")
    return path


@pytest.fixture(scope="session")
def model_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Family]:
    """`model_family(name)`: the tokenizer, teacher and student of a family in
    `families.FAMILIES`, built once per session on first use."""
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in built:
            built[name] = build_family(name, stdlib_texts(), tmp_path_factory.mktemp(name))
        return built[name]

    return get
