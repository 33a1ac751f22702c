"""Chat data through all three stages: assistant-only targets and packed conversations.

The KD and CE that `evaluate` reports on a chat cache must equal a float64 reference computed
from the two dense models on the assistant tokens only; in the packed layout the reference
runs every conversation alone, so equality also shows that no conversation attends to
another, in the teacher's pass or the student's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.curriculum.build import build_curriculum
from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import CacheManifest, write_manifest
from kdpipe.trainer.config import EvalConfig, TrainConfig
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.train import train

from .conftest import STDLIB
from .families import VOCAB, Family
from .pipeline.chat_templates import CHATML


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversations from the standard library: the user quotes a line, the assistant gives the
    next ones."""
    lines = [line.strip() for name in ("textwrap.py", "shlex.py", "bisect.py")
             for line in (STDLIB / name).read_text(encoding="utf-8").splitlines()
             if len(line.strip()) > 20]
    rows = []
    for i in range(0, 60, 5):
        rows.append({"messages": [
            {"role": "system", "content": "Continue the code."},
            {"role": "user", "content": lines[i][:40]},
            {"role": "assistant", "content": lines[i + 1][:30]},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": lines[i + 2][:25]}]})
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_teacher(model_family: Callable[[str], Family],
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    """Qwen2 (padded heads) with a ChatML template in the teacher's tokenizer."""
    family = model_family("qwen2")
    teacher = tmp_path_factory.mktemp("chat-teacher") / "teacher"
    shutil.copytree(family.teacher, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(teacher)
    return family, teacher


def cache(teacher: Path, corpus: Path, out: Path, **overrides: object) -> CacheManifest:
    return cache_teacher(CacheTeacherConfig.from_options(
        teacher=str(teacher), data=[str(corpus)], out=out, device="cpu", top_k=8,
        max_length=256, shard_size=8, batch_size=8, logprob_dtype="float32", progress=False,
        **overrides))


def rows(cache_dir: Path) -> list[dict[str, object]]:
    manifest = open_cache(cache_dir).manifest
    found: list[dict[str, object]] = []
    for shard in manifest.shards:
        found += pq.read_table(cache_dir / shard.file).to_pylist()
    return found


@torch.no_grad()
def float64_reference(teacher: Path, student: Path, cache_dir: Path) -> tuple[float, float]:
    """(mean CE, mean forward KL on the cached top-k + tail partition) per target token, from
    the dense models in float64 over the real ids, at the cache's target positions; each
    packed document run alone."""
    k = open_cache(cache_dir).manifest.top_k
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval()
              for p in (teacher, student)]
    ce_sum = kl_sum = 0.0
    tokens = 0
    for row in rows(cache_dir):
        ids = list(row[cols.INPUT_IDS])  # type: ignore[call-overload]
        segments = row.get(cols.SEGMENTS) or [len(ids)]
        mask = np.asarray(row[cols.TARGET_MASK], dtype=bool)
        topk = np.asarray(row[cols.TOPK_IDS], dtype=np.int64).reshape(-1, k)  # (N, k)
        lp_parts, lq_parts = [], []
        start = 0
        for length in segments:  # type: ignore[union-attr]
            x = torch.tensor([ids[start:start + length]])
            lp, lq = (torch.log_softmax(m(input_ids=x).logits[0, :, :VOCAB], dim=-1)
                      for m in models)  # (length, V): position t predicts token t + 1
            lp_parts.append(lp)
            lq_parts.append(lq)
            start += length
        lp, lq = torch.cat(lp_parts)[:-1], torch.cat(lq_parts)[:-1]  # (T-1, V)
        keep = torch.from_numpy(mask)
        lp, lq = lp[keep], lq[keep]  # (N, V)
        labels = torch.tensor(ids[1:])[keep]
        kk = torch.from_numpy(topk)
        in_k = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, kk, True)
        lp_tail = torch.logsumexp(lp.masked_fill(in_k, -torch.inf), dim=-1)
        lq_tail = torch.logsumexp(lq.masked_fill(in_k, -torch.inf), dim=-1)
        lp_k, lq_k = lp.gather(1, kk), lq.gather(1, kk)
        kl = (lp_k.exp() * (lp_k - lq_k)).sum(-1) + lp_tail.exp() * (lp_tail - lq_tail)
        kl_sum += float(kl.sum())
        ce_sum += float(-lq.gather(1, labels[:, None]).sum())
        tokens += labels.numel()
    return ce_sum / tokens, kl_sum / tokens


@pytest.mark.slow
def test_assistant_only_targets_from_cache_to_evaluation(
        chat_teacher: tuple[Family, Path], chat_corpus: Path, tmp_path: Path) -> None:
    family, teacher = chat_teacher
    manifest = cache(teacher, chat_corpus, tmp_path / "cache")
    assert manifest.corpus.format == "messages" and manifest.train_on == "assistant"
    assert 0 < manifest.num_targets < manifest.num_tokens - manifest.num_sequences
    assert open_cache(tmp_path / "cache").verify() == []

    # The targets are the assistant's replies and their end-of-turn token, nothing else.
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    conversations = [json.loads(line)["messages"] for line in chat_corpus.read_text().split("\n")
                     if line]
    for row, conversation in zip(rows(tmp_path / "cache"), conversations, strict=True):
        ids = np.asarray(row[cols.INPUT_IDS])
        trained = ids[1:][np.asarray(row[cols.TARGET_MASK], dtype=bool)]
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert tokenizer.decode(trained) == "<|im_end|>".join(replies) + "<|im_end|>"
        assert row[cols.NUM_TARGETS] == trained.size

    metrics = evaluate(EvalConfig.from_options(student=str(family.student),
                                               cache=str(tmp_path / "cache"), device="cpu",
                                               progress=False))
    ce, kd = float64_reference(teacher, family.student, tmp_path / "cache")
    assert metrics["kd"] == pytest.approx(kd, rel=1e-4)
    assert metrics["ce"] == pytest.approx(ce, rel=1e-4)
    assert metrics["tokens"] == manifest.num_targets


@pytest.mark.slow
def test_packed_conversations_never_attend_to_each_other(
        chat_teacher: tuple[Family, Path], chat_corpus: Path, tmp_path: Path) -> None:
    family, teacher = chat_teacher
    packed = cache(teacher, chat_corpus, tmp_path / "packed", pack=True)
    single = cache(teacher, chat_corpus, tmp_path / "single")
    assert packed.segments and packed.num_sequences < single.num_sequences
    assert packed.num_targets == single.num_targets  # the same assistant tokens
    assert any(len(r[cols.SEGMENTS]) > 1 for r in rows(tmp_path / "packed"))  # type: ignore
    assert open_cache(tmp_path / "packed").verify() == []

    metrics = evaluate(EvalConfig.from_options(student=str(family.student),
                                               cache=str(tmp_path / "packed"), device="cpu",
                                               progress=False))
    ce, kd = float64_reference(teacher, family.student, tmp_path / "packed")
    assert metrics["kd"] == pytest.approx(kd, rel=1e-4)
    assert metrics["ce"] == pytest.approx(ce, rel=1e-4)

    # A student trains on it, and scores it for a curriculum, on the same targets.
    run = tmp_path / "run"
    final = train(TrainConfig.from_options(cache=str(tmp_path / "packed"), out=str(run),
                                           student=str(family.student), device="cpu",
                                           batch_size=4, max_steps=2, progress=False,
                                           snapshots=False))
    assert np.isfinite(final["train_loss"])
    curriculum = build_curriculum(BuildCurriculumConfig.from_options(
        cache=str(tmp_path / "packed"), out=str(tmp_path / "cl.parquet"), source="student",
        student=str(run / "final"), device="cpu", progress=False))
    assert curriculum.info.num_samples == packed.num_sequences


@pytest.mark.slow
def test_verify_refuses_a_target_at_a_packed_document_boundary(
        chat_teacher: tuple[Family, Path], chat_corpus: Path, tmp_path: Path) -> None:
    """A mask that marks a document's last position (which would predict the next document's
    first token) fails verify, even with the number of targets and every checksum intact."""
    _, teacher = chat_teacher
    manifest = cache(teacher, chat_corpus, tmp_path / "packed", pack=True)
    for info in manifest.shards:
        table = pq.read_table(tmp_path / "packed" / info.file)
        masks, segments = (table.column(cols.TARGET_MASK).to_pylist(),
                           table.column(cols.SEGMENTS).to_pylist())
        row = next((r for r, s in enumerate(segments) if len(s) > 1), None)
        if row is not None:
            break
    assert row is not None
    boundary = segments[row][0] - 1
    assert masks[row][boundary] is False
    masks[row][boundary] = True
    masks[row][masks[row].index(True, boundary + 1)] = False  # the same number of targets
    index = table.schema.get_field_index(cols.TARGET_MASK)
    pq.write_table(table.set_column(index, table.field(index),
                                    pa.array(masks, table.schema.field(index).type)),
                   tmp_path / "packed" / info.file, row_group_size=cols.ROW_GROUP_SIZE)
    path = tmp_path / "packed" / info.file
    write_manifest(tmp_path / "packed", manifest.with_shard(
        replace(info, sha256=sha256_file(path), bytes=path.stat().st_size)))
    problems = open_cache(tmp_path / "packed").verify()
    assert len(problems) == 1 and "last position of a packed document" in problems[0]
