"""Helpers of the chat-data tests: tokenizers with chat templates, corpora, reading them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.pipeline.corpus import CorpusStats, resolve_sources
from kdpipe.pipeline.inputs import cache_sequences, resolve_reading
from kdpipe.pipeline.sequences import TokenSequence

from ..conftest import stdlib_texts
from ..families import family_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [SYSTEM,
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello, world."},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Yes again."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"type": "function",
                  "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "sunny, 21 C"},
             {"role": "assistant", "content": "It is sunny."}]
TOOL_CALL_TURN = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                  '</tool_call><|im_end|>')


def make_tokenizer(family: str, out: Path, template: str | None) -> Any:
    """A family's tokenizer (tests/families.py) with `template` as its chat template; Llama's
    also gets Llama 3's header tokens as special tokens."""
    family_tokenizer(family, stdlib_texts(), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if family == "llama":
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.chat_template = template
    return tokenizer


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as Parquet, with the schema pyarrow infers: structs get every key any row has,
    null where a row lacks it (as datasets exported to Parquet have)."""
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def config(data: Path | list[Path], **options: Any) -> CacheTeacherConfig:
    paths = data if isinstance(data, list) else [data]
    settings: dict[str, Any] = dict(teacher="unused", out=paths[0].parent / "cache",
                                    data=tuple(str(p) for p in paths), max_length=512)
    settings.update(options)
    return CacheTeacherConfig(**settings)


def read(data: Path | list[Path], tokenizer: Any, **options: Any
         ) -> tuple[list[TokenSequence], CorpusStats]:
    """The sequences cache-teacher would cache from `data`, and the corpus counters."""
    cfg = config(data, **options)
    assert not cfg.problems(), cfg.problems()
    sources = resolve_sources(cfg.data)
    stats = CorpusStats()
    reading = resolve_reading(cfg, sources, tokenizer)
    return list(cache_sequences(cfg, reading, sources, tokenizer, stats)), stats


def trained_text(tokenizer: Any, sequence: TokenSequence) -> list[str]:
    """The decoded runs of consecutive target tokens (token t + 1 of each target position t)."""
    assert sequence.targets is not None and len(sequence.targets) == len(sequence.ids)
    assert not sequence.targets[-1]  # the last position predicts nothing in the sequence
    runs: list[list[int]] = []
    previous = False
    for t, target in enumerate(sequence.targets):
        if target:
            if not previous:
                runs.append([])
            runs[-1].append(sequence.ids[t + 1])
        previous = target
    return [tokenizer.decode(run) for run in runs]
