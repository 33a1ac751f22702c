"""cache-teacher → train-student → evaluate on models shaped like the families users distil.

For each family of `families.py` the KD and CE that `evaluate` reports for the trained student
must equal a float64 reference computed from the two dense models on the tokenizer's real ids
only: a padded head's extra rows (made large in these models) may enter neither softmax.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.manifest import CacheManifest
from kdpipe.trainer.config import EvalConfig, TrainConfig
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.train import train

from .conftest import STDLIB
from .families import FAMILIES, QWEN_TEACHER_HEAD, VOCAB, Family

MODULES = ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("family-corpus") / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for name in MODULES:
            f.write(json.dumps({"text": (STDLIB / name).read_text(encoding="utf-8")[:900]})
                    + "\n")
    return path


def cache_family(family: Family, corpus: Path, out: Path, top_k: int,
                 **overrides: object) -> CacheManifest:
    settings: dict[str, object] = dict(
        teacher=str(family.teacher), data=(str(corpus),), out=out, device="cpu", top_k=top_k,
        max_length=40, shard_size=8, batch_size=8, logprob_dtype="float32", progress=False)
    settings.update(overrides)
    return cache_teacher(CacheTeacherConfig(**settings))  # type: ignore[arg-type]


def cached_rows(cache: Path) -> list[tuple[list[int], np.ndarray]]:
    """(input ids, top-k ids (T-1, k)) of every cached sequence."""
    manifest = open_cache(cache).manifest
    rows = []
    for shard in manifest.shards:
        table = pq.read_table(cache / shard.file, columns=["input_ids", "topk_ids"])
        for ids, topk in zip(table.column("input_ids").to_pylist(),
                             table.column("topk_ids").to_pylist(), strict=True):
            rows.append((ids, np.asarray(topk, dtype=np.int64).reshape(len(ids) - 1, -1)))
    return rows


@torch.no_grad()
def float64_reference(teacher: Path, student: Path, cache: Path) -> tuple[float, float]:
    """(mean CE, mean forward KL on the cached top-k + tail partition) per target token,
    from both dense models in float64 over the first VOCAB logits: the real ids."""
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval()
              for p in (teacher, student)]
    ce_sum = kl_sum = 0.0
    tokens = 0
    for ids, topk in cached_rows(cache):
        x = torch.tensor([ids])
        lp, lq = (torch.log_softmax(m(input_ids=x).logits[0, :-1, :VOCAB], dim=-1)
                  for m in models)  # (T-1, V) each
        labels = x[0, 1:]
        k = torch.from_numpy(topk)  # (T-1, k)
        in_k = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, k, True)
        lp_tail = torch.logsumexp(lp.masked_fill(in_k, -torch.inf), dim=-1)  # (T-1,)
        lq_tail = torch.logsumexp(lq.masked_fill(in_k, -torch.inf), dim=-1)
        lp_k, lq_k = lp.gather(1, k), lq.gather(1, k)
        kl = (lp_k.exp() * (lp_k - lq_k)).sum(-1)
        kl = kl + torch.where(lp_tail > -torch.inf, lp_tail.exp() * (lp_tail - lq_tail), 0.0)
        kl_sum += float(kl.sum())
        ce_sum += float(-lq.gather(1, labels[:, None]).sum())
        tokens += labels.numel()
    return ce_sum / tokens, kl_sum / tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_distils_end_to_end(name: str, model_family: Callable[[str], Family],
                                   corpus: Path, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    family = model_family(name)
    cache = tmp_path / "cache"
    # Qwen2: the cache is made with the tokenizer folder itself, which AutoTokenizer loads
    # with another normaliser and pre-tokenizer than through the model folders.
    overrides = {"tokenizer": str(family.tokenizer)} if name == "qwen2" else {}
    with caplog.at_level(logging.WARNING):
        manifest = cache_family(family, corpus, cache, top_k=16, **overrides)
    assert manifest.vocab_size == VOCAB
    assert manifest.teacher_head_width == (QWEN_TEACHER_HEAD if name == "qwen2" else VOCAB)
    assert manifest.add_special_tokens

    # BOS: every sequence starts with it exactly when the tokenizer's own encoding adds one.
    firsts = {ids[0] for ids, _ in cached_rows(cache)}
    assert (firsts == {family.bos_id}) == (family.bos_id is not None)

    run = tmp_path / "run"
    train(TrainConfig.from_options(cache=str(cache), out=str(run), student=str(family.student),
                      device="cpu", batch_size=4, max_steps=3, lr=3e-3, chunk_size=64,
                      progress=False, snapshots=False))
    if name == "qwen2":  # the same mapping under another tokenizer.json: warned, accepted
        warned = [r.getMessage() for r in caplog.records if "same" in r.getMessage()]
        assert any("normalizer" in m for m in warned), warned

    if name == "qwen2":  # padding rows (made large here) are never generated
        final = AutoModelForCausalLM.from_pretrained(run / "final")
        width = final.get_output_embeddings().weight.shape[0]
        assert width > VOCAB and final.generation_config.suppress_tokens == list(range(VOCAB,
                                                                                       width))
        out = final.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
        assert int(out.max()) < VOCAB

    metrics = evaluate(EvalConfig.from_options(student=str(run / "final"), cache=str(cache),
                                               device="cpu", progress=False))
    ce, kd = float64_reference(family.teacher, run / "final", cache)
    assert metrics["kd"] == pytest.approx(kd, rel=1e-4)
    assert metrics["ce"] == pytest.approx(ce, rel=1e-4)


@pytest.mark.slow
def test_padded_heads_at_k_equal_to_the_real_vocabulary(
        model_family: Callable[[str], Family], corpus: Path, tmp_path: Path) -> None:
    """With k = V the partition is the whole distribution: the KD term is dense KL on the
    real ids, though the teacher's head has 448 rows and the student's 432."""
    family = model_family("qwen2")
    cache = tmp_path / "cache"
    manifest = cache_family(family, corpus, cache, top_k=VOCAB)
    assert manifest.top_k == manifest.vocab_size == VOCAB
    metrics = evaluate(EvalConfig.from_options(student=str(family.student), cache=str(cache),
                                               device="cpu", progress=False))
    ce, kd = float64_reference(family.teacher, family.student, cache)
    assert metrics["kd"] == pytest.approx(kd, rel=1e-4)
    assert metrics["ce"] == pytest.approx(ce, rel=1e-4)


@pytest.mark.slow
def test_a_student_from_a_config_has_no_padding_rows(
        model_family: Callable[[str], Family], corpus: Path, tmp_path: Path) -> None:
    """The teacher's head is padded to 448 rows; a student built from a config without
    vocab_size gets the 400 real ids only, since padding rows would never be trained."""
    family = model_family("qwen2")
    cache = tmp_path / "cache"
    cache_family(family, corpus, cache, top_k=8)
    spec = tmp_path / "student.json"
    spec.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "num_key_value_heads": 2}))
    run = tmp_path / "run"
    train(TrainConfig.from_options(cache=str(cache), out=str(run), student_config=str(spec),
                                   device="cpu", max_steps=1, progress=False, snapshots=False))
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert final.get_output_embeddings().weight.shape[0] == VOCAB
