"""The vLLM teacher backend: prompt log-probs of pre-tokenized sequences, turned into our columns.

vLLM is the fast way to run a teacher once over a large corpus on GPUs, but it never hands out
full logits: per prompt position it returns the top-K log-probs plus the log-prob and rank of
the token that actually follows. This module asks for exactly that (raw log-probs, flat
containers, no detokenisation, one `generate` call per shard) and converts it:

* alignment: vLLM's `prompt_logprobs[t]` is the distribution that predicted prompt token t
  (entry 0 is empty), so our target position t (predicting token t + 1) is its entry t + 1;
* the top-K at a position are exactly the entries ranked 1..K; `target_logprob` comes from the
  actual-token entry whatever its rank, but that entry never stands in for a missing top one;
* `vocab_size` is the tokenizer's vocabulary (ids 0..V-1), not the head width: checkpoints pad
  the output head (Qwen2.5: 152,064 rows for 151,665 ids) and vLLM's softmax spans the padding
  rows too. Their mass, negligible on real checkpoints, is counted in the tail bucket; a padding
  id in the top-K is refused (`--backend hf` excludes padding rows from the softmax exactly);
* the tail mass is `1 - sum(top-K probabilities)`, computed stably and bounded (see
  `tail_logmass_from_topk`); tempered tails are left to the trainer's uniform approximation;
* the per-sequence entropy is a lower bound (see `entropy_lower_bound`).

`vllm` is an optional extra (`pip install 'kdpipe[vllm]'`), imported only inside functions.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.schemas.errors import ConfigError, TeacherOutputError
from kdpipe.schemas.shard_writer import SequenceTargets

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'kdpipe[vllm]'"
# Smallest tail mass we store, so that log() stays finite when rounding pushes the top-K sum
# to 1. vLLM's log-probs come from a float32 log_softmax whose log-sum-exp error shifts all K
# together, so 1 - sum carries an absolute error of ~1e-5 (measured: 2e-5 at V = 32k, 8e-5 at
# V = 128k; docs/cache-format.md): tails below that are noise, whatever the floor.
TAIL_FLOOR = 2.0**-20  # ~9.5e-7
ENTROPY_MODE = "topk_lower_bound"  # manifest.entropy_mode of caches made by this backend


def vllm_importable() -> bool:
    """Whether `import vllm` can be attempted (cheap: does not import it)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def require_vllm() -> Any:
    """The `vllm` module, or a ConfigError that says how to get it and where it runs."""
    if not vllm_importable():
        raise ConfigError(f"--backend vllm: vLLM is not installed; install it with {INSTALL_HINT} "
                          "on a machine with a CUDA GPU, or use --backend hf")
    if not cuda_available():
        raise ConfigError("--backend vllm needs a CUDA GPU and none is visible here; use "
                          "--backend hf (or auto, which picks hf without a GPU)")
    try:
        import vllm
    except ImportError as exc:  # installed but broken (e.g. a torch it was not built for)
        raise ConfigError(f"--backend vllm: `import vllm` failed ({exc}); reinstall it with "
                          f"{INSTALL_HINT} or use --backend hf") from exc
    return vllm


# --------------------------------------------------------------------------- conversion


def tail_logmass_from_topk(topk_logprobs: np.ndarray, target_logprob: np.ndarray,
                           target_in_topk: np.ndarray, vocab_size: int,
                           floor: float = TAIL_FLOOR) -> np.ndarray:
    """log(1 - sum_j p_j) per position from top-K log-probs (T-1, K); (T-1,) float64.

    Computed as `log1p(-sum exp(l_j))` in float64 (no cancellation beyond the inputs' own
    float32 error), then clamped into what is known for certain: the tail holds at least the
    actual next token's probability when that token is outside the top-K, and at least
    `floor` (keeps the log finite); it holds at most (V - K) * p_K,
    since no id outside the top-K is more likely than the K-th. With K = V the tail is empty.
    """
    n, k = topk_logprobs.shape
    if k >= vocab_size:
        return np.full(n, -np.inf)
    lp = topk_logprobs.astype(np.float64)
    total = np.exp(lp).sum(-1)  # (T-1,)
    with np.errstate(divide="ignore"):
        rest = np.log1p(-np.minimum(total, 1.0))  # -inf where rounding pushed the sum to 1
        lower = np.full(n, math.log(floor) if floor > 0 else -np.inf)
    outside = ~target_in_topk
    lower[outside] = np.maximum(lower[outside], target_logprob[outside].astype(np.float64))
    cap = math.log(vocab_size - k) + lp[:, -1]
    return np.minimum(np.maximum(rest, lower), cap)


def entropy_lower_bound(topk_logprobs: np.ndarray, tail_logmass: np.ndarray) -> np.ndarray:
    """A lower bound on the full-vocabulary entropy per position from top-K + tail; (T-1,).

    H = -sum_K p_j l_j + H_tail with H_tail = -sum_{i not in K} p_i log p_i. Every tail id has
    p_i <= r (the tail mass) and p_i <= p_K, so H_tail >= r * max(-log r, -l_K). Equality needs
    a tail of a single id (or of ids all as likely as the K-th), so real teachers' long tails
    make this an underestimate; the hf backend computes the exact value instead. Pass the tail
    without the TAIL_FLOOR clamp, or the bound can exceed H by up to 1.3e-5 nats.
    """
    lp = topk_logprobs.astype(np.float64)
    head = -(np.exp(lp) * lp).sum(-1)
    r_log = tail_logmass.astype(np.float64)
    r = np.exp(r_log)
    with np.errstate(invalid="ignore"):  # r = 0 times -log r = inf: masked below
        tail = np.where(r > 0, r * np.maximum(-r_log, -lp[:, -1]), 0.0)
    return head + tail


def targets_from_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                      target_logprob: np.ndarray, labels: np.ndarray,
                      vocab_size: int) -> SequenceTargets:
    """SequenceTargets from the top-K (T-1, K) and the actual tokens' log-probs (T-1,).

    `vocab_size` is the real vocabulary (no head padding): it is the V of the tail's bound.
    """
    in_topk = (topk_ids == labels[:, None]).any(-1)  # (T-1,)
    tail = tail_logmass_from_topk(topk_logprobs, target_logprob, in_topk, vocab_size)
    unfloored = tail_logmass_from_topk(topk_logprobs, target_logprob, in_topk, vocab_size, 0.0)
    entropy = entropy_lower_bound(topk_logprobs, unfloored)
    target = target_logprob.astype(np.float32)
    return SequenceTargets(
        topk_ids=topk_ids.astype(np.int64, copy=False),
        topk_logprobs=topk_logprobs.astype(np.float32, copy=False),
        tail_logmass=tail.astype(np.float32),
        target_logprob=target,
        tail_logmass_tempered=None,
        nll=float(-target.mean()),
        entropy=float(entropy.mean()),
        confidence=float(np.exp(target.astype(np.float64)).mean()),
        top1=float((topk_ids[:, 0] == labels).mean()),
    )


def _flat_rows(prompt_logprobs: Any, labels: np.ndarray, top_k: int
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """(T-1, K+1) ids and log-probs from a FlatLogprobs whose positions are all K + 1 wide.

    None when the container is not flat or not regular: positions of another width, or top
    entries not ranked exactly 1..K in order (the caller then reads positions one by one and
    applies the rank rule there). Row t is vLLM's entry t + 1: the actual token first, then the
    top-K by rank.
    """
    if not all(hasattr(prompt_logprobs, a) for a in ("start_indices", "end_indices",
                                                     "token_ids", "logprobs")):
        return None
    starts = np.asarray(prompt_logprobs.start_indices, dtype=np.int64)
    ends = np.asarray(prompt_logprobs.end_indices, dtype=np.int64)
    n = len(labels)
    if len(starts) != n + 1 or len(ends) != n + 1 or ends[0] != starts[0]:
        return None
    width = top_k + 1
    expected = starts[1] + width * np.arange(1, n + 1)
    if not np.array_equal(ends[1:], expected) or not np.array_equal(starts[1:], expected - width):
        return None
    lo, hi = int(starts[1]), int(ends[-1])
    ranks = getattr(prompt_logprobs, "ranks", None)
    if ranks is not None:
        top_ranks = np.asarray(ranks[lo:hi]).reshape(n, width)[:, 1:]  # (T-1, K)
        # Ranks of None (very old vLLMs) make an object array: the layout is trusted there.
        if top_ranks.dtype != object and not (top_ranks == np.arange(1, width)).all():
            return None
    ids = np.asarray(prompt_logprobs.token_ids[lo:hi], dtype=np.int64).reshape(n, width)
    lps = np.asarray(prompt_logprobs.logprobs[lo:hi], dtype=np.float32).reshape(n, width)
    return ids, lps


def _position(entries: Any, label: int, top_k: int, t: int
              ) -> tuple[list[int], list[float], float]:
    """Top-K ids, their log-probs and the actual token's log-prob from one position's dict.

    The top-K are the entries ranked 1..K, ordered by rank (then log-prob). The actual token
    comes first with its true rank and is merged with its top-K entry when it has one, so a dict
    holds K or K + 1 ids; ranking, not counting, keeps an actual token ranked past K from
    filling the place of a top entry vLLM did not return. Without ranks (very old vLLMs) the
    top-K are the K ids left after dropping an extra actual token.
    """
    if not entries or label not in entries:
        raise TeacherOutputError(f"vLLM prompt log-probs at target position {t} do not include "
                                 f"the prompt token {label}; is prompt_logprobs set?")
    if len(entries) > top_k + 1:
        raise TeacherOutputError(f"vLLM returned {len(entries)} log-probs at target position "
                                 f"{t}, expected {top_k} or {top_k + 1}; is prompt_logprobs "
                                 "above --top-k?")
    target = float(entries[label].logprob)
    items = [(int(tid), float(lp.logprob), lp.rank) for tid, lp in entries.items()]
    if all(item[2] is not None for item in items):
        top = [item for item in items if item[2] <= top_k]
    else:
        top = [item for item in items if item[0] != label] if len(items) == top_k + 1 else items
    if len(top) != top_k:
        raise TeacherOutputError(f"vLLM prompt log-probs at target position {t} have {len(top)} "
                                 f"top entries (rank <= {top_k}), expected {top_k}: "
                                 "max_logprobs and prompt_logprobs must be >= --top-k")
    top.sort(key=lambda it: (it[2] if it[2] is not None else math.inf, -it[1]))
    return [it[0] for it in top], [it[1] for it in top], target


def _check_real_ids(topk_ids: np.ndarray, vocab_size: int) -> None:
    """Refuse top-K ids (T-1, K) beyond the tokenizer: vLLM cannot leave padding rows out."""
    beyond = topk_ids >= vocab_size  # (T-1, K)
    if beyond.any():
        t = int(beyond.any(-1).argmax())
        token = int(topk_ids[t][beyond[t]][0])
        raise TeacherOutputError(f"vLLM prompt log-probs at target position {t} have id {token} "
                                 f"in the top-K, beyond the tokenizer's {vocab_size} ids: the "
                                 "teacher puts probability on its head's padding rows (ids >= "
                                 f"{vocab_size}); use --backend hf, which excludes padding rows "
                                 "from the softmax exactly")


def convert_prompt_logprobs(prompt_logprobs: Any, sequence: Sequence[int], top_k: int,
                            vocab_size: int, mask: np.ndarray | None = None) -> SequenceTargets:
    """Turn one request's `RequestOutput.prompt_logprobs` into the cache's columns.

    `prompt_logprobs` is vLLM's FlatLogprobs (`flat_logprobs=True`: entry 0 empty, then K + 1
    entries per position, actual token first with its true rank, then the top-K with ranks
    1..K) or a list of `{token_id: Logprob}` dicts (entry 0 None). `sequence` is the prompt
    (T tokens); the result has T - 1 positions, aligned exactly as the hf backend aligns them.
    `vocab_size` is the tokenizer's vocabulary: a top-K id at or beyond it is refused.
    `mask` ((T-1,) bool, or None for all): the positions kept (chat data's targets), in order.
    """
    labels = np.asarray(sequence[1:], dtype=np.int64)  # (T-1,) the token each position predicts
    n = len(labels)
    if prompt_logprobs is None or len(prompt_logprobs) != n + 1:
        got = "None" if prompt_logprobs is None else f"{len(prompt_logprobs)} entries"
        raise TeacherOutputError(f"vLLM prompt log-probs: expected {n + 1} entries (one per "
                                 f"prompt token), got {got}")
    rows = _flat_rows(prompt_logprobs, labels, top_k)
    if rows is not None:
        ids, lps = rows
        if not np.array_equal(ids[:, 0], labels):
            bad = int(np.flatnonzero(ids[:, 0] != labels)[0])
            raise TeacherOutputError(f"vLLM prompt log-probs at target position {bad} are for "
                                     f"token {ids[bad, 0]}, the prompt has {labels[bad]}")
        topk_ids, topk_lps, target = ids[:, 1:], lps[:, 1:], lps[:, 0]
    else:
        topk_ids = np.empty((n, top_k), dtype=np.int64)
        topk_lps = np.empty((n, top_k), dtype=np.float32)
        target = np.empty(n, dtype=np.float32)
        for t in range(n):
            ids_t, lps_t, target[t] = _position(prompt_logprobs[t + 1], int(labels[t]), top_k, t)
            topk_ids[t], topk_lps[t] = ids_t, lps_t
    _check_real_ids(topk_ids, vocab_size)  # every position: it names the position as verify
    if mask is not None:
        topk_ids, topk_lps, target, labels = (a[mask] for a in (topk_ids, topk_lps, target,
                                                                labels))
    return targets_from_topk(topk_ids, topk_lps, target, labels, vocab_size)


# --------------------------------------------------------------------------- engine


@dataclass
class VllmTeacher:
    """A loaded vLLM engine plus the request settings that make it return our columns."""

    llm: Any
    params: Any
    make_prompt: Any  # vllm.inputs.TokensPrompt
    top_k: int
    vocab_size: int  # the tokenizer's ids, not the (padded) head width

    def targets(self, sequences: Sequence[Sequence[int]], sample_ids: Sequence[int],
                masks: Sequence[np.ndarray | None] | None = None) -> list[SequenceTargets]:
        """Teacher targets for many sequences in one `generate` call (vLLM batches them), at
        the positions `masks` keep (one (T-1,) bool array per sequence; None: all).

        Raises TeacherOutputError naming the sample (`sample_ids`, one per sequence) and the
        target position of output the cache cannot hold."""
        prompts = [self.make_prompt(prompt_token_ids=list(s)) for s in sequences]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        if len(outputs) != len(sequences):
            raise TeacherOutputError(f"vLLM returned {len(outputs)} outputs for "
                                     f"{len(sequences)} prompts")
        results = []
        masks = masks if masks is not None else [None] * len(sequences)
        for seq, out, sample_id, mask in zip(sequences, outputs, sample_ids, masks, strict=True):
            if list(out.prompt_token_ids) != list(seq):
                raise TeacherOutputError(f"sample {sample_id}: vLLM returned outputs in another "
                                         "order than the prompts")
            try:
                results.append(convert_prompt_logprobs(out.prompt_logprobs, seq, self.top_k,
                                                       self.vocab_size, mask))
            except TeacherOutputError as exc:
                raise TeacherOutputError(f"sample {sample_id}: {exc}") from exc
        return results

    def close(self) -> None:
        """Drop the engine so its GPU memory can be reused in this process."""
        self.llm = None
        gc.collect()


def sampling_params(vllm: Any, top_k: int) -> Any:
    """One generated token (required, ignored), K prompt log-probs, flat, not detokenised."""
    settings = dict(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)
    try:
        return vllm.SamplingParams(**settings, flat_logprobs=True)
    except TypeError:  # vLLM before FlatLogprobs: same values, one dict per position
        log.warning("this vLLM has no flat_logprobs; reading per-position dicts (slower). "
                    "Upgrade with %s", INSTALL_HINT)
        return vllm.SamplingParams(**settings)


def engine_arguments(name_or_path: str, *, top_k: int, max_length: int,
                     position_limit: int | None, dtype: str, tensor_parallel_size: int,
                     gpu_memory_utilization: float, trust_remote_code: bool) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` (and so of `vllm.EngineArgs`) for the teacher.

    Raw log-probs (`logprobs_mode`, vLLM >= 0.10.2), `max_logprobs` = K so a request for K
    prompt log-probs passes vLLM's check, no prefix caching (a cached prefix has no prompt
    log-probs; vLLM 0.33 skips the cache for such requests itself, older releases need it off)
    and no tokenizer (prompts arrive as token ids). Checked by vLLM's own `EngineArgs` in
    tests/pipeline/test_vllm_real.py.
    """
    args: dict[str, Any] = dict(
        model=name_or_path, dtype=dtype, max_logprobs=top_k, logprobs_mode="raw_logprobs",
        enable_prefix_caching=False, skip_tokenizer_init=True,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)
    # Each prompt also generates one token; a short context keeps more KV blocks in memory.
    if position_limit is not None and max_length + 1 <= position_limit:
        args["max_model_len"] = max_length + 1
    return args


def load_vllm_teacher(name_or_path: str, *, top_k: int, vocab_size: int, max_length: int,
                      position_limit: int | None, dtype: str, tensor_parallel_size: int,
                      gpu_memory_utilization: float, trust_remote_code: bool) -> VllmTeacher:
    """Start a vLLM engine for the teacher (no tokenizer: prompts arrive as token ids)."""
    vllm = require_vllm()
    engine_args = engine_arguments(
        name_or_path, top_k=top_k, max_length=max_length, position_limit=position_limit,
        dtype=dtype, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)
    try:
        llm = vllm.LLM(**engine_args)
    except TypeError as exc:
        raise ConfigError(f"--backend vllm: this vLLM ({getattr(vllm, '__version__', '?')}) "
                          f"does not accept {exc}; upgrade it with pip install -U "
                          "'kdpipe[vllm]'") from exc
    make_prompt = getattr(vllm, "TokensPrompt", None)  # top-level export in recent vLLMs
    if make_prompt is None:
        make_prompt = importlib.import_module("vllm.inputs").TokensPrompt
    return VllmTeacher(llm=llm, params=sampling_params(vllm, top_k), make_prompt=make_prompt,
                       top_k=top_k, vocab_size=vocab_size)
