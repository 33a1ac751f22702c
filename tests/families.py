"""Tiny teachers, students and tokenizers with the quirks of the families our users distil.

Each is built from a config and a tokenizer trained from scratch on stdlib text, saved with
`save_pretrained` and loaded by path, as a hub model would be:

* `qwen2`: no BOS; output heads padded past the tokenizer's 400 ids (teacher 448 rows, student
  432, as Qwen2.5's 152,064 / 151,936 rows for 151,665 ids), their padding rows made large so
  that any softmax that includes them is visibly wrong; tied embeddings; and loaded through
  the model folder, AutoTokenizer rebuilds the tokenizer as Qwen2Tokenizer (NFC normaliser,
  its own pre-tokenizer), another tokenizer.json for the same id-to-token mapping.
* `llama`: BOS added by the tokenizer's post-processor (Llama 3's <|begin_of_text|>); untied.
* `gemma2`: BOS post-processor, tied embeddings, final-logit and attention soft-capping.
* `gpt2`: no BOS added, EOS only; learned position embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("qwen2", "llama", "gemma2", "gpt2")
VOCAB = 400  # real ids of every family's tokenizer
QWEN_TEACHER_HEAD, QWEN_STUDENT_HEAD = 448, 432
PADDING_SCALE = 50.0  # padding rows of the Qwen heads: dominate any softmax that includes them


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: Path  # the tokenizer alone (PreTrainedTokenizerFast), as trained
    teacher: Path  # model folder with the tokenizer saved alongside
    student: Path
    bos_id: int | None  # the BOS the tokenizer puts before every text (None: it adds none)
    eos_id: int


# (special tokens in id order, BOS, whether the post-processor adds it, EOS, PAD)
_TOKENS = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, False, "<|endoftext|>",
              "<|endoftext|>"),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>",
              True, "<|end_of_text|>", None),
    "gemma2": (["<pad>", "<eos>", "<bos>"], "<bos>", True, "<eos>", "<pad>"),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", False, "<|endoftext|>", None),
}


def family_tokenizer(name: str, texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB ids with the family's special tokens and BOS behaviour."""
    specials, bos, adds_bos, eos, pad = _TOKENS[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == VOCAB
    if adds_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=pad)
    fast.save_pretrained(out)
    return fast


def _model(name: str, tokenizer: PreTrainedTokenizerFast, head: int, layers: int, seed: int
           ) -> torch.nn.Module:
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                 num_attention_heads=4, max_position_embeddings=256)
    model: torch.nn.Module
    if name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=head, num_key_value_heads=2,
                                             tie_word_embeddings=True, **small, **ids))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=head, num_key_value_heads=4,
                                             tie_word_embeddings=False, **small, **ids))
    elif name == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=head, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=16, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
            tie_word_embeddings=True, attn_implementation="eager", **small, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=head, n_embd=32, n_layer=layers,
                                           n_head=4, n_positions=256, **ids))
    head_weight = model.get_output_embeddings().weight  # type: ignore[operator]
    with torch.no_grad():  # a random init is near-uniform: widen it so top-k and tails matter
        head_weight.mul_(8.0)
        head_weight[VOCAB:].mul_(PADDING_SCALE)  # padding rows, if any
    return model


def build_family(name: str, texts: list[str], root: Path) -> Family:
    """Tokenizer, teacher (2 layers) and student (1 layer) of `name` under `root`."""
    tokenizer = family_tokenizer(name, texts, root / "tokenizer")
    heads = {"qwen2": (QWEN_TEACHER_HEAD, QWEN_STUDENT_HEAD)}.get(name, (VOCAB, VOCAB))
    folders = []
    for role, head, layers, seed in (("teacher", heads[0], 2, 0), ("student", heads[1], 1, 1)):
        folder = root / role
        _model(name, tokenizer, head, layers, seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return Family(name, root / "tokenizer", folders[0], folders[1],
                  tokenizer.bos_token_id if _TOKENS[name][2] else None, tokenizer.eos_token_id)


def permuted_tokenizer(source: Path, out: Path, first: int, second: int) -> Path:
    """A copy of the tokenizer in `source` with the ids of two tokens swapped: the same size
    and strings, another id-to-token mapping (what a wrong --tokenizer looks like)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    vocab[by_id[first]], vocab[by_id[second]] = second, first
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      bos_token=tokenizer.bos_token,
                                      eos_token=tokenizer.eos_token,
                                      pad_token=tokenizer.pad_token)
    swapped.save_pretrained(out)
    return out
