"""The dataset card (`README.md`) a finished cache carries: its folder is a Hugging Face dataset.

The YAML header is the Hub's dataset card metadata. Its `configs` entry names the shards as
the data files of one `train` split, so that the folder can be uploaded as it is (`hf upload`,
`huggingface-cli upload` before huggingface_hub 1.0) and the Hub's dataset viewer and
`datasets.load_dataset(FOLDER or REPO)` read the shards and nothing else (not
`manifest.json`, not `tokenizer/`). The text states what a user needs to know before
training on the targets: teacher, tokenizer, k, temperatures, corpus, size.

Informational: kdpipe never reads it back, `kdpipe verify` does not check it, and it may be
edited before an upload. `cache-teacher` writes it when a cache is complete.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kdpipe.schemas.io import atomic_write_text
from kdpipe.schemas.manifest import DATASET_CARD_NAME, TOKENIZER_DIR, CacheManifest

SHARD_GLOB = "shard-*.parquet"  # every shard, never a worker's manifest part or a temporary
TAGS = ("kdpipe", "knowledge-distillation")
# The Hub's fixed `size_categories` values (upper bounds, exclusive), by number of rows.
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                    (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
                    (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def size_category(rows: int) -> str:
    """The Hub's `size_categories` value for a dataset of `rows` rows (sequences here)."""
    return next((name for bound, name in _SIZE_CATEGORIES if rows < bound), "n>1B")


def card_metadata(m: CacheManifest) -> dict[str, object]:
    """The YAML header: one config whose `train` split is every shard of the folder."""
    return {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": SHARD_GLOB}]}],
        "tags": list(TAGS),
        "size_categories": [size_category(m.num_sequences)],
    }


def _cell(text: object) -> str:
    """`text` as one Markdown table cell (a `|` would end the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _targets(m: CacheManifest) -> str:
    if m.cache_mode == "sampled":
        return (f"{m.samples} ids drawn per position from the teacher's distribution (seed "
                f"{m.sample_seed}), stored as unique ids and counts")
    return f"k = {m.top_k}: the teacher's top-{m.top_k} next-token ids and log-probs per position"


def _columns(m: CacheManifest) -> str:
    if m.cache_mode == "sampled":
        return ("`sampled_lengths` gives the number of unique ids drawn at each, "
                "`sampled_id_deltas` and `sampled_counts` the ids (ascending, delta-coded) and "
                "how often each was drawn")
    if m.encoding == "compact":
        return ("`topk_id_deltas` and `topk_logprob_q` hold the top-k, flat with stride k, in "
                "the compact encoding (ids ascending and delta-coded, log-probs quantised)")
    return "`topk_ids` and `topk_logprobs` hold the top-k, flat with stride k"


def _temperatures(m: CacheManifest) -> str:
    parts = [f"log-probs at τ = {m.capture_temperature:g} (raw)"]
    if m.tail_temperatures:
        parts.append("exact tail masses also at τ = "
                     + ", ".join(f"{t:g}" for t in m.tail_temperatures))
    elif m.tail_mode == "uniform":
        parts.append("tempered tails approximated from the top-k (vLLM teacher: no full logits)")
    parts.append("the distillation temperature is chosen at training time")
    return "; ".join(parts)


def _corpus(m: CacheManifest) -> str:
    c = m.corpus
    parts = [", ".join(f"`{s}`" for s in c.sources)]
    if c.split:
        parts.append(f"split `{c.split}`")
    parts.append(f"{c.format} data" + (f", field `{c.text_field}`" if c.format == "text" else ""))
    if m.train_on != "all":
        parts.append(f"targets on `{m.train_on}` tokens only")
    parts.append(f"{c.documents_read} documents read, {c.documents_skipped} skipped")
    return "; ".join(parts)


def render_card(m: CacheManifest) -> str:
    """The whole README.md of a cache described by manifest `m` (YAML header, then Markdown)."""
    header = yaml.safe_dump(card_metadata(m), sort_keys=False, allow_unicode=True)
    teacher = m.teacher
    made = [f"`{teacher.name_or_path}`"]
    if teacher.revision:
        made.append(f"revision `{teacher.revision}`")
    made += [f"{teacher.backend} backend", teacher.dtype]
    saved = (f"; saved in `{TOKENIZER_DIR}/`" if m.tokenizer.files else "")
    per_token = m.num_bytes / max(m.num_targets, 1)
    rows = [
        ("teacher", f"{made[0]} ({', '.join(made[1:])})"),
        ("tokenizer", f"`{m.tokenizer.name_or_path}`, {m.vocab_size} ids{saved}"),
        ("targets", _targets(m)),
        ("temperature", _temperatures(m)),
        ("corpus", _corpus(m)),
        ("sequences", f"{m.num_sequences:,} of at most {m.max_length} tokens ({m.layout} "
                      "layout)"),
        ("tokens", f"{m.num_tokens:,}"),
        ("target tokens", f"{m.num_targets:,} (positions with a teacher distribution)"),
        ("size", f"{m.num_bytes:,} bytes in {len(m.shards)} Parquet shards"),
        ("bytes per target token", f"{per_token:.1f}"),
        ("storage", f"{m.encoding} encoding, ids {m.id_dtype}, log-probs {m.logprob_dtype}"),
        ("made by", f"kdpipe {m.kdpipe_version}, cache schema {m.schema_version}, settings "
                    f"fingerprint `{m.settings_fingerprint[:16]}`"),
    ]
    table = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
    return f"""---
{header}---

# Teacher targets for knowledge distillation

A kdpipe cache: what a teacher predicts at every target position of a corpus, stored once so
that any number of students can be distilled from it without running the teacher again.

| | |
|---|---|
{table}

## Use

With kdpipe (the cache, as downloaded, is what `--cache` takes; the tokenizer comes with it):

```
hf download USER/REPO --repo-type dataset --local-dir cache
kdpipe verify cache
kdpipe train-student --cache cache --student-config student.json --out runs/student
```

Without kdpipe: the shards are plain Parquet, one row per sequence.

```python
from datasets import load_dataset

ds = load_dataset("USER/REPO", split="train")
# a downloaded copy: load_dataset("parquet", data_files="cache/{SHARD_GLOB}", split="train")
```

Per-position columns hold one entry per target position (position t predicts
`input_ids[t + 1]`); {_columns(m)}. `manifest.json` records how the cache was made and every
shard's sha256; kdpipe's `docs/cache-format.md` describes each column.
"""


def write_dataset_card(cache_dir: Path, m: CacheManifest) -> Path:
    """Write (atomically, replacing any) the README.md of the cache in `cache_dir`."""
    path = cache_dir / DATASET_CARD_NAME
    atomic_write_text(path, render_card(m))
    return path
