"""Sampled caches: draws are unique ids with counts, deterministic per (seed, sample id),
stored and decoded exactly, and refused where they cannot be made."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.pipeline.teacher_hf import draw_unique, sample_generator, teacher_targets
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache, summarize
from kdpipe.schemas.encoding import decode_sampled, delta_encode_segments
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.shard_reader import build_index, columns_for
from kdpipe.trainer.data import BatchLoader

from .conftest import small_config

SAMPLES = 20


def test_draws_are_unique_ids_with_counts() -> None:
    logits = torch.randn(7, 30) * 3  # (n, V)
    ids, counts, lengths = draw_unique(logits, SAMPLES, sample_generator(0, 5, logits.device))
    assert int(lengths.sum()) == ids.numel() == counts.numel()
    start = 0
    for n in lengths.tolist():
        row, c = ids[start:start + n], counts[start:start + n]
        assert (row.diff() > 0).all() and int(c.sum()) == SAMPLES
        start += n
    again = draw_unique(logits, SAMPLES, sample_generator(0, 5, logits.device))
    assert all(torch.equal(a, b) for a, b in zip((ids, counts, lengths), again, strict=True))
    other = draw_unique(logits, SAMPLES, sample_generator(0, 6, logits.device))
    assert not torch.equal(ids, other[0]) or not torch.equal(counts, other[1])


def test_delta_coding_round_trips() -> None:
    ids = np.array([3, 9, 10, 0, 4095, 7])
    lengths = np.array([3, 0, 2, 1])
    deltas = delta_encode_segments(ids, lengths)
    assert deltas.tolist() == [3, 6, 1, 0, 4095, 7]
    decoded, offsets = decode_sampled(deltas.astype(np.uint16), lengths.astype(np.uint8))
    assert decoded.tolist() == ids.tolist() and offsets.tolist() == [0, 3, 3, 5, 6]


def test_sampled_cache_round_trip_and_determinism(tiny_teacher_dir: Path, small_corpus: Path,
                                                  tmp_path: Path) -> None:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "a", cache_mode="sampled",
                       samples=SAMPLES, sample_seed=3)
    manifest = cache_teacher(cfg)
    cache = open_cache(cfg.out)
    assert cache.verify() == []
    assert manifest.settings()["cache_mode"] == "sampled" and manifest.samples == SAMPLES
    assert summarize(cache)["cache_mode"] == f"sampled (N={SAMPLES})"
    assert summarize(cache)["topk_mass"] == "-"  # no tail column to measure it from
    table = pq.read_table(cfg.out / manifest.shards[0].file)
    assert cols.TOPK_IDS not in table.column_names and cols.TAIL_LOGMASS not in table.column_names

    # The stored draws of a sequence are the teacher's own draws for its sample id.
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    row = table.slice(1, 1).to_pylist()[0]
    expected = teacher_targets(model, [row["input_ids"]], 8, [], pad_id=1, samples=SAMPLES,
                               sample_ids=[row["sample_id"]], sample_seed=3)[0]
    assert expected.sampled_ids is not None and expected.sampled_counts is not None
    ids, _ = decode_sampled(np.array(row["sampled_id_deltas"]), np.array(row["sampled_lengths"]))
    np.testing.assert_array_equal(ids, expected.sampled_ids)
    np.testing.assert_array_equal(row["sampled_counts"], expected.sampled_counts)

    # The loader's padded targets: weights c_j / N summing to 1 per token.
    index = build_index(cache)
    columns = columns_for(cache, teacher=True, temperature=1.0)
    with BatchLoader(index, index.sample_ids, columns, batch_size=4) as loader:
        batch = next(iter(loader)).micro[0]
    assert batch.teacher is not None and batch.teacher.sampled_weights is not None
    weights = batch.teacher.sampled_weights
    assert weights.shape[0] == batch.num_targets
    torch.testing.assert_close(weights.sum(1), torch.ones(batch.num_targets))
    assert batch.teacher.topk_ids.shape == (batch.num_targets, 1)

    # Same seed: the same bytes; another seed: other draws.
    again = cache_teacher(replace(cfg, out=tmp_path / "b"))
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    other = cache_teacher(replace(cfg, out=tmp_path / "c", sample_seed=4))
    assert [s.sha256 for s in other.shards] != [s.sha256 for s in manifest.shards]


def test_sampled_mode_refusals(tiny_teacher_dir: Path, small_corpus: Path,
                               tmp_path: Path) -> None:
    for bad, match in (({"samples": 0}, "--samples"), ({"samples": 256}, "--samples"),
                       ({"backend": "vllm"}, "needs --backend hf"),
                       ({"tail_temperatures": (2.0,)}, "--tail-temperatures"),
                       ({"encoding": "compact"}, "--encoding compact"),
                       ({"cache_mode": "dense"}, "--cache-mode")):
        settings = {"cache_mode": "sampled", **bad}
        with pytest.raises(ConfigError, match=match):
            small_config(tiny_teacher_dir, small_corpus, tmp_path / "x", **settings).validate()
