"""vLLM's prompt log-prob structures, built on CPU exactly as vLLM builds them.

With vLLM installed the real `FlatLogprobs` / `Logprob` classes are used; otherwise local
mirrors with the same fields (vllm/logprobs.py: `FlatLogprobs` holds `start_indices`,
`end_indices`, `token_ids`, `logprobs`, `ranks`, `decoded_tokens`; `Logprob` holds `logprob`,
`rank`, `decoded_token`; test_vllm_real.py checks that they agree with vLLM's).
Rows come from the same computation as vLLM's sampler (`Sampler.gather_logprobs`): float32
log_softmax, `torch.topk`, the prompt token's log-prob concatenated first, its rank = number of
ids with a log-prob >= its own; positions are appended as `append_logprobs_for_next_position`
appends them (ranks: the token's, then 1..K).

`FakeVllm` stands in for the `vllm` module (LLM, SamplingParams, TokensPrompt) with a
transformers model underneath, so the whole vLLM code path of cache-teacher runs on CPU.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@dataclass
class MirrorLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class MirrorFlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, logprobs_one_position: dict[int, Any] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, lp in (logprobs_one_position or {}).items():
            self.token_ids.append(token_id)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(lp.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def append_fast(self, token_ids: list[int], logprobs: list[float], ranks: Any,
                    decoded_tokens: Any) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, lp, rank, text in zip(token_ids, logprobs, ranks, decoded_tokens,
                                            strict=False):  # as vLLM: shortest wins
            self.token_ids.append(token_id)
            self.logprobs.append(lp)
            self.ranks.append(rank)
            self.decoded_tokens.append(text)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index: int) -> dict[int, MirrorLogprob]:
        return {self.token_ids[i]: MirrorLogprob(self.logprobs[i], self.ranks[i],
                                                 self.decoded_tokens[i])
                for i in range(self.start_indices[index], self.end_indices[index])}

    def __iter__(self) -> Iterator[dict[int, MirrorLogprob]]:
        return (self[i] for i in range(len(self)))


def classes() -> tuple[Any, Any]:
    """(FlatLogprobs, Logprob): vLLM's own when installed, else the mirrors."""
    if VLLM_INSTALLED:
        from vllm.logprobs import FlatLogprobs, Logprob

        return FlatLogprobs, Logprob
    return MirrorFlatLogprobs, MirrorLogprob


def engine_rows(logits: torch.Tensor, prompt: Sequence[int], top_k: int
                ) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """vLLM's prompt log-prob tensors for one prompt: (T-1, K+1) ids/log-probs, (T-1,) ranks.

    `logits` (T, V) are the model's outputs at every prompt position; row t predicts token t+1.
    """
    logprobs = logits[:-1].float().log_softmax(-1)  # (T-1, V), like Sampler.compute_logprobs
    targets = torch.as_tensor(prompt[1:], dtype=torch.long)[:, None]  # (T-1, 1)
    top_lp, top_ids = torch.topk(logprobs, top_k, dim=-1)
    token_lp = logprobs.gather(-1, targets)
    ranks = (logprobs >= token_lp).sum(-1)  # batched_count_greater_than
    ids = torch.cat([targets, top_ids], dim=1)
    lps = torch.cat([token_lp, top_lp], dim=1)
    return ids.tolist(), lps.tolist(), ranks.tolist()


def flat_prompt_logprobs(rows: tuple[list[list[int]], list[list[float]], list[int]]) -> Any:
    """`flat_logprobs=True`: entry 0 empty, then K + 1 entries per position, no merging."""
    flat_cls, _ = classes()
    flat = flat_cls()
    flat.append(None)
    for ids, lps, rank in zip(*rows, strict=True):
        k = len(ids) - 1
        flat.append_fast(ids, lps, itertools.chain((rank,), range(1, k + 1)),
                         itertools.repeat(None))
    return flat


def dict_prompt_logprobs(rows: tuple[list[list[int]], list[list[float]], list[int]]
                         ) -> list[Any]:
    """Default (non-flat) form: [None, {id: Logprob}, ...]; a top-K actual token merges."""
    _, logprob_cls = classes()
    out: list[Any] = [None]
    for ids, lps, rank in zip(*rows, strict=True):
        ranks = itertools.chain((rank,), range(1, len(ids)))
        out.append({i: logprob_cls(logprob=lp, rank=r, decoded_token=None)
                    for i, lp, r in zip(ids, lps, ranks, strict=False)})
    return out


def legacy_dict_prompt_logprobs(rows: tuple[list[list[int]], list[list[float]], list[int]]
                                ) -> list[Any]:
    """Early vLLM v1: top-K dict with ranks 1..K, the prompt token injected with rank K + 1."""
    _, logprob_cls = classes()
    out: list[Any] = [None]
    for ids, lps, _rank in zip(*rows, strict=True):
        k = len(ids) - 1
        entry = {ids[j + 1]: logprob_cls(logprob=lps[j + 1], rank=j + 1) for j in range(k)}
        if ids[0] not in entry:
            entry[ids[0]] = logprob_cls(logprob=lps[0], rank=k + 1)
        out.append(entry)
    return out


class FakeLLM:
    """`vllm.LLM` on CPU: a transformers model computes the rows vLLM's sampler would."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.generate_calls: list[int] = []
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"],
                                                          dtype=torch.float32).eval()
        FakeLLM.instances.append(self)

    @torch.no_grad()
    def generate(self, prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = True
                 ) -> list[Any]:
        assert self.kwargs["max_logprobs"] >= params.prompt_logprobs
        self.generate_calls.append(len(prompts))
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            logits = self.model(torch.tensor([ids])).logits[0]  # (T, V)
            rows = engine_rows(logits, ids, params.prompt_logprobs)
            flat = getattr(params, "flat_logprobs", False)
            outputs.append(SimpleNamespace(
                prompt_token_ids=list(ids),
                prompt_logprobs=flat_prompt_logprobs(rows) if flat
                else dict_prompt_logprobs(rows)))
        return outputs


def fake_sampling_params(flat_supported: bool = True) -> Any:
    def make(**kwargs: Any) -> SimpleNamespace:
        if "flat_logprobs" in kwargs and not flat_supported:
            raise TypeError("Unexpected keyword argument 'flat_logprobs'")
        return SimpleNamespace(**kwargs)

    return make


def fake_vllm(flat_supported: bool = True) -> SimpleNamespace:
    """A stand-in for the `vllm` module with what kdpipe uses of it."""
    return SimpleNamespace(LLM=FakeLLM, SamplingParams=fake_sampling_params(flat_supported),
                           TokensPrompt=dict, __version__="fake")
