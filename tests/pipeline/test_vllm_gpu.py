"""The real vLLM backend against the hf backend and an exact float32 reference, on a GPU.

Skipped unless vLLM imports and CUDA is available; `KDPIPE_REQUIRE_GPU=1` turns the skip into
a failure (for GPU CI, where a silent skip would hide a broken install).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.manifest import CacheManifest

from .conftest import small_config

pytestmark = pytest.mark.gpu
TOL = 0.05  # nats: float16 teacher passes (different kernels) against a float32 reference


def _require_gpu() -> None:
    reason = None
    if importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed (pip install 'kdpipe[vllm]')"
    elif not torch.cuda.is_available():
        reason = "no CUDA GPU"
    if reason is None:
        return
    if os.environ.get("KDPIPE_REQUIRE_GPU") == "1":
        pytest.fail(f"KDPIPE_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def gpu_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A small Llama whose head size (64) every vLLM attention backend supports."""
    _require_gpu()
    out = tmp_path_factory.mktemp("gpu-teacher")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # logits std ~3: peaked, with a real tail
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _rows(out: Path, manifest: CacheManifest) -> dict[str, list]:
    tables = [pq.read_table(out / s.file).to_pydict() for s in manifest.shards]
    return {key: [v for t in tables for v in t[key]] for key in tables[0]}


def test_vllm_cache_matches_hf_and_the_exact_distribution(gpu_teacher_dir: Path,
                                                          small_corpus: Path,
                                                          tmp_path: Path) -> None:
    k = 8
    hf_cfg = small_config(gpu_teacher_dir, small_corpus, tmp_path / "hf", backend="hf",
                          dtype="float16", top_k=k, device="cuda")
    hf = cache_teacher(hf_cfg)
    vllm_cfg = replace(hf_cfg, out=tmp_path / "vllm", backend="vllm", device="auto",
                       gpu_memory_utilization=0.3)
    vl = cache_teacher(vllm_cfg)

    assert vl.teacher.backend == "vllm" and vl.tail_mode == "uniform"
    assert vl.entropy_mode == "topk_lower_bound" and vl.teacher.dtype == "float16"
    assert [(s.file, s.rows, s.tokens_sha256) for s in vl.shards] == \
        [(s.file, s.rows, s.tokens_sha256) for s in hf.shards]
    assert open_cache(vllm_cfg.out).verify() == []
    a, b = _rows(vllm_cfg.out, vl), _rows(hf_cfg.out, hf)
    assert a["sample_id"] == b["sample_id"] and a["input_ids"] == b["input_ids"]

    reference = LlamaForCausalLM.from_pretrained(gpu_teacher_dir, dtype=torch.float32)
    reference = reference.to("cuda").eval()  # type: ignore[arg-type]
    same_ids = total = 0
    for i, ids in enumerate(a["input_ids"]):
        t = len(ids) - 1
        with torch.no_grad():
            logits = reference(torch.tensor([ids], device="cuda")).logits[0, :-1]
        exact = logits.float().log_softmax(-1).cpu().numpy()  # (T-1, V), exact distribution
        rows = np.arange(t)
        top_ids = np.array(a["topk_ids"][i]).reshape(t, k)
        top_lp = np.array(a["topk_logprobs"][i], dtype=np.float32).reshape(t, k)
        labels = np.array(ids[1:])
        # Every cached log-prob is the exact one of its id (alignment: position t -> token t+1),
        # and the cached ids are a top-k up to ties within the tolerance.
        np.testing.assert_allclose(top_lp, exact[rows[:, None], top_ids], atol=TOL)
        kth = np.sort(exact, axis=-1)[:, -k]
        assert np.all(top_lp[:, -1] >= kth - TOL)
        np.testing.assert_allclose(a["target_logprob"][i], exact[rows, labels], atol=TOL)
        exact_tail = 1 - np.exp(exact[rows[:, None], top_ids]).sum(-1)
        np.testing.assert_allclose(np.exp(a["tail_logmass"][i]), exact_tail, atol=0.02)
        hf_ids = np.array(b["topk_ids"][i]).reshape(t, k)
        same_ids += int((hf_ids == top_ids).all(-1).sum())
        total += t
    assert same_ids >= 0.9 * total  # the two backends agree but for near-ties
    np.testing.assert_allclose(a["teacher_nll"], b["teacher_nll"], atol=TOL)
    np.testing.assert_allclose(a["teacher_confidence"], b["teacher_confidence"], atol=0.02)
    np.testing.assert_allclose(a["teacher_top1"], b["teacher_top1"], atol=0.1)
    assert all(x <= y + TOL for x, y in zip(a["teacher_entropy"], b["teacher_entropy"],
                                            strict=True))
