"""`kdpipe evaluate`: one no-grad pass of a student over a cache (or its held-out split).

Reports the mean per-token CE of the true next tokens and its perplexity, the mean KD
divergence to the cached teacher exactly as the trainer defines it (`--loss`, `--temperature`;
without τ² and λ), top-1 agreement with the teacher and the mixed loss at `--kd-weight`.
With several caches (one per teacher, aligned as for train-student), `kd` is the
--teacher-weight mix (its normalised weights are reported as `teacher_weight`) and
`kd_teacher_j` the mean KD against teacher j; top-1 agreement is against teacher 1.
The trainer's periodic eval calls `run_evaluation`, the same code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.model_parts import ModelParts
from kdpipe.progress import Progress, bars_shown, library_bars
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError, NonFiniteError
from kdpipe.schemas.shard_reader import CacheIndex, build_index, columns_for
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer.config import EvalConfig
from kdpipe.trainer.data import Batch, BatchLoader
from kdpipe.trainer.distributed import Distributed, rank_slice
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.metrics import summarise, teacher_metrics
from kdpipe.trainer.model import autocast, autocast_dtype, open_student
from kdpipe.trainer.objective import StudentObjective, call
from kdpipe.trainer.sampler import holdout_mask
from kdpipe.trainer.teachers import FixedTeacherWeights, open_teachers

log = logging.getLogger(__name__)


@torch.no_grad()
def run_evaluation(parts: ModelParts, index: CacheIndex, sample_ids: np.ndarray,
                   loss_cfg: LossConfig, device: torch.device,
                   amp_dtype: torch.dtype | None, batch_size: int, pad_id: int,
                   prefetch: int = 4, progress: bool = False, *,
                   objective: nn.Module | None = None, dist: Distributed | None = None,
                   others: Sequence[CacheIndex] = ()) -> dict[str, Any]:
    """Metrics of `parts` on `sample_ids` of `index` (the model is left in its prior mode).

    KD and top-1 agreement are always measured; the reported `loss` is the training
    objective: the λ-mix in mode "kd", plain CE in mode "ce". Distributed (`dist`, with the
    wrapped `objective`): each rank evaluates a contiguous share of `sample_ids` and the sums
    are reduced, so every rank returns the metrics of the whole set. `others`: the indexes
    of teachers 2..J's caches holding the same `sample_ids` (read in lockstep), weighted by
    `loss_cfg.teacher_mix`.
    """
    if sample_ids.size == 0:
        raise ConfigError(f"no samples to evaluate in {index.cache.location} (empty split?)")
    dist = dist or Distributed()
    vocab = index.cache.manifest.vocab_size
    objective = objective if objective is not None else StudentObjective(parts, vocab)
    kd_cfg = replace(loss_cfg, mode="kd")  # KD is measured whatever the objective
    columns = columns_for(index.cache, teacher=True, temperature=kd_cfg.temperature)
    objective_weight = loss_cfg.kd_weight if loss_cfg.mode == "kd" else 0.0
    other_columns = [(other, columns_for(other.cache, teacher=True,
                                         temperature=kd_cfg.temperature)) for other in others]
    mix = FixedTeacherWeights(loss_cfg.teacher_mix(len(others) + 1)) if others else None
    share = rank_slice(sample_ids, dist.world_size, dist.rank, batch_size)
    was_training = parts.model.training
    parts.model.eval()
    # total, ce, kd, correct top-1, then KD against each teacher (several teachers)
    sums = [0.0] * (4 + (len(others) + 1 if others else 0))
    tokens = 0
    started = time.perf_counter()
    # Storage order: one row group after another (the other caches' in their own order),
    # which the LRU alone reads once each: nothing to read ahead.
    loader = BatchLoader(index, share.sample_ids, columns, batch_size, 1, pad_id, prefetch,
                         cached_groups=2, read_ahead=1, others=other_columns)
    bar = Progress("eval", len(loader), unit="batch", progress=progress, report=dist.is_main,
                   leave=False)

    def run(cpu_batch: Batch, real: bool) -> None:
        nonlocal tokens
        batch = cpu_batch.to(device)
        lam = torch.full((batch.num_targets,), objective_weight, device=device)  # (N,)
        weights = None if mix is None else mix.tokens(0, 0, batch.target_row)  # (J, N)
        with autocast(device, amp_dtype):
            out = call(objective, batch, lam, kd_cfg, weights)
        if real:
            values = [out.total, out.ce, out.kd, out.correct_top1]
            if mix is not None:
                assert out.kd_per_teacher is not None
                values += list(out.kd_per_teacher.unbind())
            for i, value in enumerate(values):
                sums[i] += float(value)
            tokens += out.tokens

    first, done = None, 0
    with loader:
        for global_batch in loader:
            if first is None:
                first = global_batch.micro[0]
            run(global_batch.micro[0], share.real)
            done += 1
            bar.update(1)
    assert first is not None
    for _ in range(share.micro_batches - done):  # every rank makes the same forward passes
        run(first, False)
    bar.close()
    parts.model.train(was_training)
    total, ce, kd, correct, *per_teacher, tokens_all = dist.sum(sums + [float(tokens)], device)
    n = int(tokens_all)
    if not all(math.isfinite(v) for v in (total, ce, kd)):
        raise NonFiniteError(f"evaluation on {index.cache.location}: the summed loss is "
                             f"{total:.6g} "
                             f"(CE {ce:.6g}, KD {kd:.6g}); the student's output is not finite "
                             "(or --loss is infinite for this cache)")
    result = summarise({"total": total, "ce": ce, "kd": kd, "correct_top1": correct}, n)
    result.update(teacher_metrics([value / max(n, 1) for value in per_teacher]))
    result["loss"] = total / max(n, 1)
    result["samples"] = int(sample_ids.size)
    result["tokens_per_s"] = n / max(time.perf_counter() - started, 1e-9)
    return result


def eval_sample_ids(index: CacheIndex, fraction: float, max_samples: int | None) -> np.ndarray:
    """The held-out split (fraction > 0) or the whole cache, in storage order, capped."""
    ids = index.sample_ids
    if fraction > 0:
        ids = ids[holdout_mask(ids, fraction)]
    return ids[:max_samples] if max_samples is not None else ids


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a student on a cache; returns the metrics `kdpipe evaluate` prints.

    Under torchrun each process evaluates a contiguous share of the samples on its own device
    and the sums are reduced, so every process returns the metrics of the whole set.
    """
    cfg = cfg.with_cache_defaults()
    cfg.validate()
    dist = Distributed.from_env(cfg.device)
    try:
        with library_bars(bars_shown(cfg.progress and dist.is_main)):  # "Loading weights"
            result = _evaluate(cfg, dist)
    finally:
        dist.close()
    cache = cfg.cache[0] if len(cfg.cache) == 1 else list(cfg.cache)
    result.update({"student": cfg.student, "cache": cache, "loss_kind": cfg.loss.kind,
                   "temperature": cfg.loss.temperature, "world_size": dist.world_size})
    if len(cfg.cache) > 1:  # the w_j of `kd` = Σ_j w_j kd_teacher_j, normalised
        result["teacher_weight"] = list(cfg.loss.teacher_mix(len(cfg.cache)))
    return result


def _evaluate(cfg: EvalConfig, dist: Distributed) -> dict[str, Any]:
    cache = open_cache(cfg.cache[0], verify_reads=cfg.verify_reads,
                       local_cache=cfg.local_cache)
    index = build_index(cache)
    others = open_teachers(cfg.cache, index, verify_reads=cfg.verify_reads,
                           local_cache=cfg.local_cache)  # before the student is loaded
    device = dist.device(resolve_device(cfg.device))
    student = open_student(cache, device, student=cfg.student, tokenizer=cfg.tokenizer,
                           trust_remote_code=cfg.trust_remote_code, base=cfg.base,
                           attn_implementation=cfg.attn_implementation)
    ids = eval_sample_ids(index, cfg.eval_fraction, cfg.max_samples)
    pad_id = cache.manifest.tokenizer.pad_token_id or 0
    return run_evaluation(student.parts, index, ids, cfg.loss, device,
                          autocast_dtype(cfg.dtype, device), cfg.batch_size, pad_id,
                          cfg.prefetch, cfg.progress and dist.is_main, dist=dist,
                          others=others)
