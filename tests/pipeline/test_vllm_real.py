"""The vLLM backend against the real `vllm` package's Python classes, on CPU.

No engine runs here (that needs a GPU: test_vllm_gpu.py). What runs is vLLM's own code around
it: `SamplingParams` and `EngineArgs` validate exactly the arguments `teacher_vllm` passes,
vLLM's sampler (`Sampler.compute_logprobs`, `Sampler.gather_logprobs`) and output processor
(`LogprobsProcessor`) turn teacher logits into the `FlatLogprobs` of a real `RequestOutput`,
and our converter must give the hf backend's columns from it. A test also checks that
`vllm_mirror` (used where vLLM is absent) agrees with the real classes on the fields we read.

Skipped unless `import vllm` works in this interpreter; scripts/test.sh runs this file with
the pinned CPU-only vLLM install of scripts/vllm_cpu_env.sh (docs/vllm.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.pipeline import teacher_vllm
from kdpipe.pipeline.teacher_hf import teacher_targets

from . import vllm_mirror

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not importable in this interpreter; scripts/test.sh runs these tests "
                "with the CPU-only vLLM install of scripts/vllm_cpu_env.sh",
                allow_module_level=True)
# Without a GPU vLLM resolves no platform, and its config classes then have no device to
# check against; its CPU platform runs the same argument checks. Set before vLLM resolves
# its platform (on first use, in the imports below).
if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import vllm  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.logprobs import (  # noqa: E402
    FlatLogprobs,
    Logprob,
    append_logprobs_for_next_position,
    create_prompt_logprobs,
)
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.engine.logprobs import LogprobsProcessor  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402

K = 8
MAX_LENGTH = 48
TOP = [-1.0 - 0.5 * j for j in range(K)]  # top-K log-probs of the chosen positions (sum 0.92)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path) -> tuple[Any, list[list[int]]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    texts = ["def wrap(text, width=70):\n    return text", "import bisect\nx = [1, 2]", "a b"]
    return model, [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def engine_config(tiny_teacher_dir: Path) -> Any:
    """vLLM's full engine config built from our exact engine arguments (validates them)."""
    args = teacher_vllm.engine_arguments(
        str(tiny_teacher_dir), top_k=K, max_length=MAX_LENGTH, position_limit=256,
        dtype="float32", tensor_parallel_size=1, gpu_memory_utilization=0.9,
        trust_remote_code=False)
    return EngineArgs(**args).create_engine_config()


def _request_output(params: Any, prompt: list[int], logits: torch.Tensor) -> RequestOutput:
    """What `LLM.generate` returns for one prompt, built by vLLM's own sampler and processor.

    `logits` (T, V): row t predicts prompt token t + 1. The sampler's torch.compile'd rank
    count runs eagerly here (compiling it on CPU takes ~40 s and computes the same counts).
    """
    with torch._dynamo.config.patch(disable=True):
        logprobs = Sampler.compute_logprobs(logits[:-1])  # (T-1, V) float32
        tensors = Sampler.gather_logprobs(logprobs, params.prompt_logprobs,
                                          torch.tensor(prompt[1:], dtype=torch.int64))
    processor = LogprobsProcessor.from_new_request(None, SimpleNamespace(sampling_params=params))
    processor._update_prompt_logprobs(tensors)
    completion = CompletionOutput(index=0, text="", token_ids=[0], cumulative_logprob=None,
                                  logprobs=None, finish_reason="length")
    return RequestOutput(request_id="0", prompt=None, prompt_token_ids=list(prompt),
                         prompt_logprobs=processor.pop_prompt_logprobs(),
                         outputs=[completion], finished=True)


class _Engine:
    """`vllm.LLM` reduced to `generate`, answering with real RequestOutputs."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[Any], params: Any, *, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        return [_request_output(params, p["prompt_token_ids"],
                                self.model(torch.tensor([p["prompt_token_ids"]])).logits[0])
                for p in prompts]


def test_our_sampling_params_pass_vllm_validation(engine_config: Any) -> None:
    params = teacher_vllm.sampling_params(vllm, K)
    assert isinstance(params, vllm.SamplingParams)
    assert (params.prompt_logprobs, params.flat_logprobs, params.max_tokens,
            params.detokenize) == (K, True, 1, False)
    params.verify(engine_config.model_config, None, None, None)  # raises if refused
    too_many = teacher_vllm.sampling_params(vllm, K + 1)
    with pytest.raises(VLLMValidationError, match="prompt logprobs"):  # the check is real
        too_many.verify(engine_config.model_config, None, None, None)


def test_our_engine_arguments_pass_vllm_validation(engine_config: Any) -> None:
    model = engine_config.model_config
    assert (model.max_logprobs, model.logprobs_mode, model.skip_tokenizer_init,
            model.max_model_len) == (K, "raw_logprobs", True, MAX_LENGTH + 1)
    assert engine_config.cache_config.enable_prefix_caching is False
    assert engine_config.parallel_config.tensor_parallel_size == 1
    assert "use_tqdm" in inspect.signature(vllm.LLM.generate).parameters


def test_a_bad_engine_argument_is_refused(tiny_teacher_dir: Path) -> None:
    args = teacher_vllm.engine_arguments(
        str(tiny_teacher_dir), top_k=K, max_length=MAX_LENGTH, position_limit=256,
        dtype="float32", tensor_parallel_size=1, gpu_memory_utilization=0.9,
        trust_remote_code=False)
    with pytest.raises(ValueError, match="logprobs_mode"):
        EngineArgs(**{**args, "logprobs_mode": "unnormalised"}).create_model_config()


def test_tokens_prompt_is_the_top_level_export() -> None:
    assert vllm.TokensPrompt(prompt_token_ids=[3, 4]) == {"prompt_token_ids": [3, 4]}


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "dicts"])
def test_real_request_outputs_give_the_hf_columns(teacher: tuple, flat: bool) -> None:
    model, prompts = teacher
    params = teacher_vllm.sampling_params(vllm, K)
    if not flat:  # what a vLLM without flat_logprobs returns
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=K,
                                     detokenize=False)
    engine = teacher_vllm.VllmTeacher(llm=_Engine(model), params=params,
                                      make_prompt=vllm.TokensPrompt, top_k=K,
                                      vocab_size=model.config.vocab_size)
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert isinstance(outputs[0].prompt_logprobs, FlatLogprobs if flat else list)
    got = engine.targets(prompts, list(range(len(prompts))))
    for prompt, mine in zip(prompts, got, strict=True):
        expected = teacher_targets(model, [prompt], K, (), pad_id=1)[0]
        assert mine.topk_ids.shape == (len(prompt) - 1, K)
        np.testing.assert_array_equal(mine.topk_ids, expected.topk_ids)
        np.testing.assert_allclose(mine.topk_logprobs, expected.topk_logprobs, atol=2e-5)
        np.testing.assert_allclose(mine.target_logprob, expected.target_logprob, atol=2e-5)
        np.testing.assert_allclose(np.exp(mine.tail_logmass), np.exp(expected.tail_logmass),
                                   atol=2e-6)


def _chosen_positions(flat: bool) -> tuple[Any, list[int], int]:
    """Two positions through vLLM's own append: the prompt token in the top-K, then past it.

    V = 50. Position 1 predicts token 5 (rank 1), position 2 predicts token 40 (rank 17).
    """
    container = create_prompt_logprobs(flat)
    top = TOP  # ranks 1..K
    append_logprobs_for_next_position(container, [5, 5, *range(6, 6 + K - 1)], [top[0], *top],
                                      iter([None] * (K + 1)), rank=1, num_logprobs=K)
    append_logprobs_for_next_position(container, [40, *range(10, 10 + K)], [-6.0, *top],
                                      iter([None] * (K + 1)), rank=17, num_logprobs=K)
    return container, [2, 5, 40], 50


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "dicts"])
def test_chosen_positions_rank_beyond_k_and_empty_first(flat: bool) -> None:
    container, prompt, vocab = _chosen_positions(flat)
    assert container[0] == ({} if flat else None)  # position 0 predicts nothing
    out = RequestOutput(request_id="0", prompt=None, prompt_token_ids=prompt,
                        prompt_logprobs=container, outputs=[], finished=True)
    got = teacher_vllm.convert_prompt_logprobs(out.prompt_logprobs, out.prompt_token_ids, K,
                                               vocab)
    assert got.topk_ids[0].tolist() == [5, *range(6, 6 + K - 1)]
    assert got.topk_ids[1].tolist() == list(range(10, 10 + K))  # token 40 is not top-K
    np.testing.assert_allclose(got.target_logprob, [TOP[0], -6.0])
    np.testing.assert_allclose(got.topk_logprobs[1], TOP)
    assert got.tail_logmass[1] >= -6.0  # the tail holds token 40 at least
    assert got.top1 == 0.5


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_mirror_agrees_with_vllm(teacher: tuple) -> None:
    assert _fields(vllm_mirror.MirrorFlatLogprobs) == _fields(FlatLogprobs)
    assert _fields(vllm_mirror.MirrorLogprob) == _fields(Logprob)
    for name in ("append", "append_fast"):
        mine = inspect.signature(getattr(vllm_mirror.MirrorFlatLogprobs, name)).parameters
        theirs = inspect.signature(getattr(FlatLogprobs, name)).parameters
        assert list(mine) == list(theirs), name
    model, prompts = teacher
    params = teacher_vllm.sampling_params(vllm, K)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0]
    real = _request_output(params, prompts[0], logits).prompt_logprobs
    rows = vllm_mirror.engine_rows(logits, prompts[0], K)
    mirror = vllm_mirror.MirrorFlatLogprobs()
    mirror.append(None)
    for ids, lps, rank in zip(*rows, strict=True):
        mirror.append_fast(ids, lps, iter([rank, *range(1, K + 1)]), iter([None] * (K + 1)))
    for name in ("start_indices", "end_indices", "token_ids", "ranks", "decoded_tokens"):
        assert getattr(mirror, name) == getattr(real, name), name
    np.testing.assert_allclose(mirror.logprobs, real.logprobs, atol=1e-6)
    assert len(mirror) == len(real)
    positions: Iterator[tuple[dict, dict]] = zip(mirror, real, strict=True)
    for mine_pos, real_pos in positions:
        assert list(mine_pos) == list(real_pos)
        assert [v.rank for v in mine_pos.values()] == [v.rank for v in real_pos.values()]
