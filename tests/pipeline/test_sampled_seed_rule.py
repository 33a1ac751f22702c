"""The sampled cache's draws, reproduced from docs/cache-format.md ("Sampled caches") with the
teacher, pyarrow and torch only: no kdpipe code decodes or draws here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from kdpipe.pipeline.cache_stage import cache_teacher

from .conftest import small_config

SAMPLES = 12
SEED = 7
CHUNK = 2048  # positions per multinomial call, as documented


def documented_seed(sample_seed: int, sample_id: int) -> int:
    """The first 8 bytes of the digest, little-endian, shifted right by one bit."""
    digest = hashlib.sha256(f"kdpipe-samples:{sample_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def former_wording_seed(sample_seed: int, sample_id: int) -> int:
    """What the docs used to say: the first 63 bits, the top bit dropped."""
    digest = hashlib.sha256(f"kdpipe-samples:{sample_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stored_draws(row: dict) -> list[list[tuple[int, int]]]:
    """Per target position, (id, count) pairs: ids are delta-coded per position (the first
    absolute), `sampled_lengths` delimits the positions."""
    positions, at = [], 0
    for n in row["sampled_lengths"]:
        deltas, counts = row["sampled_id_deltas"][at:at + n], row["sampled_counts"][at:at + n]
        ids = [sum(deltas[:j + 1]) for j in range(n)]
        positions.append(list(zip(ids, counts, strict=True)))
        at += n
    return positions


@torch.no_grad()
def documented_draws(model: torch.nn.Module, input_ids: list[int], vocab_size: int,
                     seed: int) -> list[list[tuple[int, int]]]:
    logits = model(input_ids=torch.tensor([input_ids])).logits[0, :-1, :vocab_size]  # (T-1, V)
    probs = torch.softmax(logits.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    positions = []
    for start in range(0, probs.shape[0], CHUNK):
        drawn = torch.multinomial(probs[start:start + CHUNK], SAMPLES, replacement=True,
                                  generator=generator)  # (chunk, N)
        for row in drawn.sort(dim=-1).values:
            ids, counts = torch.unique_consecutive(row, return_counts=True)
            positions.append(list(zip(ids.tolist(), counts.tolist(), strict=True)))
    return positions


def test_the_documented_seed_rule_reproduces_the_stored_draws(
        tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    # One sequence per forward pass, as below, so both see bit-identical logits.
    cache_teacher(small_config(tiny_teacher_dir, small_corpus, out, cache_mode="sampled",
                               samples=SAMPLES, sample_seed=SEED, batch_size=1,
                               progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["samples"], manifest["sample_seed"]) == (SAMPLES, SEED)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()

    def reproduced(rule: Callable[[int, int], int], row: dict) -> bool:
        seed = rule(manifest["sample_seed"], row["sample_id"])
        return documented_draws(model, row["input_ids"], manifest["vocab_size"],
                                seed) == stored_draws(row)

    rows = [pq.read_table(out / shard["file"]).slice(0, 2).to_pylist()
            for shard in manifest["shards"][:3]]
    checked = [row for shard_rows in rows for row in shard_rows]
    assert len(checked) == 6
    for row in checked:
        assert reproduced(documented_seed, row), row["sample_id"]
    # The test can tell rules apart: the former wording reproduces none of them.
    assert not any(reproduced(former_wording_seed, row) for row in checked)
