"""Small Llama-style models for the demo, made from a config and saved like a hub model.

Every stage then loads them by path, exactly as it would load `meta-llama/...`. The teacher is
initialised here and trained by `train-student --mode ce`; students are JSON model configs
(`--student-config`) initialised by the trainer from each run's seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.schemas.io import atomic_write_text


@dataclass(frozen=True)
class ModelSize:
    """A Llama shape: width, depth, heads (head size = hidden / heads)."""

    hidden: int
    layers: int
    heads: int

    def spec(self, max_length: int) -> dict[str, Any]:
        """The `--student-config` JSON (vocab size and special ids come from the cache)."""
        return {"model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": int(self.hidden * 8 / 3) // 8 * 8,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.heads, "max_position_embeddings": max_length,
                "tie_word_embeddings": True}

    def parameters(self, vocab: int) -> int:
        """Weights of this shape with tied embeddings (norms included)."""
        ffn = int(self.hidden * 8 / 3) // 8 * 8
        per_layer = 4 * self.hidden * self.hidden + 3 * self.hidden * ffn + 2 * self.hidden
        return vocab * self.hidden + self.layers * per_layer + self.hidden


def write_spec(path: Path, size: ModelSize, max_length: int) -> Path:
    """Write a `--student-config` JSON file (unchanged files are not rewritten)."""
    text = json.dumps(size.spec(max_length), indent=2, allow_nan=False) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def init_model(tokenizer_dir: Path, out: Path, size: ModelSize, max_length: int,
               seed: int = 0) -> Path:
    """A freshly initialised Llama saved with its tokenizer; skipped when OUT holds one."""
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = size.spec(max_length)
    spec.pop("model_type")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)  # config.json + safetensors last: their presence means done
    return out
