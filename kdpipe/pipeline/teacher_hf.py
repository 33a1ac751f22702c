"""The transformers teacher backend: one no-grad forward pass, reduced to what students need.

For every position t that predicts token t+1 we keep the top-k ids and log-probs, the exact
tail log-mass (a log-sum-exp over the ids outside the top-k, never `log(1 - sum)`), the
log-prob of the actual next token, and optionally the exact tail log-mass at other
temperatures. The teacher's body runs on the batch, then its head on a chunk of positions at a
time (`model_parts`), so full-vocabulary rows exist only a chunk at a time: peak memory is
O(chunk × V), not O(B × T × V). A teacher whose head cannot be split off runs whole.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdpipe.model_parts import ModelParts, SplitError, split_model
from kdpipe.packing import forward_inputs
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.shard_writer import SequenceTargets
from kdpipe.torch_runtime import MODEL_INIT_LOCK

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logits computed and reduced at once, in elements: bounds each float32 (n, V) buffer of the
# reduction to 256 MiB (n = 523 positions at V = 128,256; 2,048 at V = 32,000).
CHUNK_ELEMENTS = 2**26
# CPU BLAS multiplies fewer rows than this by another kernel (matrix-vector), whose rounding
# differs from the whole batch's product; a chunk is padded to this many rows so that its
# logits are the bits of the model's own forward.
MIN_GEMM_ROWS = 4


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_teacher(name_or_path: str, device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool) -> Any:
    """AutoModelForCausalLM in eval mode, on `device`, no grad needed."""
    from transformers import AutoModelForCausalLM

    model: Any
    try:
        with MODEL_INIT_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--teacher {name_or_path}: cannot load a causal LM ({first_line})"
                          ) from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_parts(model: Any, name: str) -> ModelParts | Any:
    """The teacher as body and head (`model_parts.split_model`), so that its logits are built
    a chunk of positions at a time; or, for a head that cannot be split off (its check
    fails), the model itself, run whole, with a warning that it needs (B, T, V) logits."""
    try:
        return split_model(model, f"teacher {name}")
    except SplitError as exc:
        log.warning("%s; its full (batch, length, vocabulary) logits are built at once, so a "
                    "smaller --batch-size may be needed", exc)
        return model


def _reduce_positions(logits: torch.Tensor, labels: torch.Tensor, top_k: int,
                      temperatures: Sequence[float]) -> dict[str, torch.Tensor]:
    """Reduce full rows of logits (n, V) to the per-position cache columns, in float32.

    One top-(k+1) and one exp pass over the rows give everything: with c the row maximum
    and m the (k+1)-th largest logit, every id outside the top-k has exp(z - m) <= 1 and
    the (k+1)-th contributes exactly 1, so the tail sum neither overflows nor underflows
    however small the tail is, and no full log-softmax row is ever built.
    """
    z = logits.float()  # (n, V); no copy for a float32 teacher
    vocab = z.shape[-1]
    top_z, top_ids = z.topk(min(top_k + 1, vocab), dim=-1, sorted=True)  # (n, k+1)
    c = top_z[:, :1]  # (n, 1) row maximum
    head = top_z[:, :top_k] - c  # (n, k) logits relative to the maximum
    top_ids = top_ids[:, :top_k]
    out: dict[str, torch.Tensor] = {"topk_ids": top_ids}
    if top_k < vocab:
        m = top_z[:, top_k:]  # (n, 1)
        rest = (z - m).exp_().scatter_(1, top_ids, 0.0)  # (n, V): exp(z - m) outside top-k
        rest_sum = rest.sum(-1, keepdim=True)  # >= 1
        log_rest = (m - c) + rest_sum.log()  # log sum_{i not in K} exp(z_i - c)
        # sum e_i (z_i - c); einsum fuses the product and the sum (4x faster than mul + sum)
        rest_dot = torch.einsum("nv,nv->n", rest, z)[:, None] - c * rest_sum
    else:
        log_rest = torch.full_like(c, float("-inf"))
    lse = torch.logaddexp(torch.logsumexp(head, -1, keepdim=True), log_rest)  # (n, 1)
    out["topk_logprobs"] = head - lse
    out["tail_logmass"] = (log_rest - lse).squeeze(1)
    # Entropy H = lse - sum_i p_i (z_i - c), split into the top-k and the tail.
    expected = (out["topk_logprobs"].exp() * head).sum(-1, keepdim=True)
    if top_k < vocab:
        expected = expected + (m - c - lse).exp() * rest_dot
    out["entropy"] = (lse - expected).squeeze(1)
    out["target_logprob"] = (z.gather(1, labels[:, None]) - c - lse).squeeze(1)
    out["top1"] = (top_ids[:, 0] == labels).float()
    if temperatures:
        tempered = []
        for tau in temperatures:
            if top_k < vocab:
                rest_tau = ((z - m) / tau).exp_().scatter_(1, top_ids, 0.0).sum(-1, keepdim=True)
                log_rest_tau = (m - c) / tau + rest_tau.log()
            else:
                log_rest_tau = log_rest
            lse_tau = torch.logaddexp(torch.logsumexp(head / tau, -1, keepdim=True),
                                      log_rest_tau)
            tempered.append((log_rest_tau - lse_tau).squeeze(1))
        out["tail_logmass_tempered"] = torch.stack(tempered, dim=-1)  # (n, n_temps)
    return out


def sample_generator(seed: int, sample_id: int, device: torch.device) -> torch.Generator:
    """The generator of one sequence's draws: seeded from (seed, sample_id) alone, so a
    sample's draws do not depend on batching, sharding or which worker computes it."""
    digest = hashlib.sha256(f"kdpipe-samples:{seed}:{sample_id}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_unique(logits: torch.Tensor, samples: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N draws per row of softmax(logits) (n, V), with replacement, as unique ids with counts.

    Returns (ids (entries,), counts (entries,), lengths (n,)), ids ascending within a row.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    # A row with NaN/inf (float16 overflow) draws uniform placeholders: its log-probs are not
    # finite either, so its shard is refused with a one-line error before it is written.
    probs[~torch.isfinite(probs).all(dim=-1)] = 1.0
    drawn = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (n, N)
    drawn = drawn.sort(dim=-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)  # (n, N): first of its run of equal ids
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    starts = new.flatten().nonzero().squeeze(1)  # every row starts a run
    counts = torch.diff(starts, append=starts.new_tensor([drawn.numel()]))
    return drawn.flatten()[starts], counts, new.sum(dim=-1)


@torch.no_grad()
def teacher_targets(teacher: ModelParts | Any, sequences: Sequence[Sequence[int]], top_k: int,
                    temperatures: Sequence[float], pad_id: int, samples: int = 0,
                    sample_ids: Sequence[int] | None = None, sample_seed: int = 0,
                    vocab_size: int | None = None,
                    target_masks: Sequence[np.ndarray | None] | None = None,
                    segments: Sequence[Sequence[int] | None] | None = None
                    ) -> list[SequenceTargets]:
    """Run the teacher on one batch of sequences (right-padded) and reduce each to targets.

    `teacher`: `teacher_parts(model)`, whose head runs a chunk of positions at a time (peak
    O(chunk × V)), or a model, run whole ((B, T, V) logits at once); both give equal bits.
    With `samples` > 0, also draw that many ids per position from the teacher's distribution
    (τ = 1), each sequence with `sample_generator(sample_seed, sample_ids[row])`.
    `vocab_size`: the tokenizer's real ids; the head's rows beyond them are padding, left out
    of the softmax (and so of every cached value), as if the head had exactly those rows.
    `target_masks`: per sequence, (T-1,) bool of the positions to keep (chat data's targets),
    or None for all; only those positions are reduced (and sampled), in order. `segments`:
    per sequence, the lengths of the documents packed into it, which never attend to each
    other (`packing.forward_inputs`), or None for one document.
    """
    if samples and (sample_ids is None or len(sample_ids) != len(sequences)):
        raise ValueError("drawing samples needs one sample id per sequence")
    model: Any = teacher.model if isinstance(teacher, ModelParts) else teacher
    device = next(model.parameters()).device
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    if isinstance(teacher, ModelParts):
        # (B, T, H): a chunk's logits are the head's on its rows, like the model's own head.
        states = teacher.hidden_states(input_ids, attention, segments)

        def logits_of(row: int, where: slice | torch.Tensor) -> torch.Tensor:
            rows = states[row, where]  # (n, H)
            n = rows.shape[0]
            if n < MIN_GEMM_ROWS:  # zero rows: their logits are computed, then dropped
                rows = torch.cat([rows, rows.new_zeros(MIN_GEMM_ROWS - n, rows.shape[1])])
            return teacher.logits(rows)[:n, :vocab_size]  # (n, V)
    else:
        full = model(input_ids=input_ids,
                     **forward_inputs(attention, segments, model.config)).logits  # (B, T, V_head)

        def logits_of(row: int, where: slice | torch.Tensor) -> torch.Tensor:
            return full[row, where, :vocab_size]  # (n, V) a view: padding rows never enter
    # the config's vocabulary is the head's width, which only sizes the chunks here
    chunk_size = max(1, CHUNK_ELEMENTS // (vocab_size or int(model.config.vocab_size)))

    # Row r, positions 0..len_r - 2 predict tokens 1..len_r - 1.
    parts: dict[str, list[torch.Tensor]] = {}
    kept = []  # per row: its target positions, as slices (all of them) or an index tensor
    for row, length in enumerate(lengths):
        mask = target_masks[row] if target_masks is not None else None
        if mask is not None and not mask.any():
            raise ValueError(f"sequence {row} of the batch has no target position")
        kept.append(slice(0, length - 1) if mask is None else
                    torch.from_numpy(np.flatnonzero(mask)).to(device))
    for row, positions in enumerate(kept):
        generator = (sample_generator(sample_seed, int(sample_ids[row]), device)
                     if samples and sample_ids is not None else None)
        count = (positions.stop if isinstance(positions, slice) else positions.numel())
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            if isinstance(positions, slice):
                here = logits_of(row, slice(start, stop))
                labels = input_ids[row, start + 1:stop + 1]
            else:
                chosen = positions[start:stop]
                here, labels = logits_of(row, chosen), input_ids[row, chosen + 1]
            chunk = _reduce_positions(here, labels, top_k, temperatures)
            if generator is not None:
                ids, counts, unique = draw_unique(here, samples, generator)
                chunk |= {"sampled_ids": ids, "sampled_counts": counts,
                          "sampled_lengths": unique}
            for name, value in chunk.items():
                parts.setdefault(name, []).append(value)
    columns = {name: torch.cat(values).cpu().numpy() for name, values in parts.items()}

    results = []
    offset = entry = 0
    for positions in kept:
        count = positions.stop if isinstance(positions, slice) else positions.numel()
        span = slice(offset, offset + count)
        offset += count
        target_lp = columns["target_logprob"][span]
        sampled: dict[str, np.ndarray] = {}
        if samples:
            per_position = columns["sampled_lengths"][span].astype(np.int64)
            entries = slice(entry, entry + int(per_position.sum()))
            entry = entries.stop
            sampled = {"sampled_ids": columns["sampled_ids"][entries].astype(np.int64),
                       "sampled_counts": columns["sampled_counts"][entries].astype(np.int64),
                       "sampled_lengths": per_position}
        results.append(SequenceTargets(
            topk_ids=columns["topk_ids"][span],
            topk_logprobs=columns["topk_logprobs"][span],
            tail_logmass=columns["tail_logmass"][span],
            target_logprob=target_lp,
            tail_logmass_tempered=(columns["tail_logmass_tempered"][span]
                                   if temperatures else None),
            nll=float(-target_lp.mean()),
            entropy=float(columns["entropy"][span].mean()),
            confidence=float(np.exp(target_lp).mean()),
            top1=float(columns["top1"][span].mean()),
            **sampled,
        ))
    return results
