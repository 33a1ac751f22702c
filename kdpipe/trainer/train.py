"""`kdpipe train-student`: train a student from a teacher cache alone (no teacher is loaded).

Reads top to bottom: setup (run folder, student, data, optimizer, resume) → loop of
`train_step` over global batches with logging, eval, snapshots and checkpoints → final save.
Each optimizer step's loss is normalised by the real target tokens of its whole global batch
(all gradient-accumulation micro-batches), so splitting a batch never changes the gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError, NonFiniteError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.manifest import same_mapping
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer import checkpoint as ckpt
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.curriculum_config import check_curriculum_file, setup_curriculum
from kdpipe.trainer.data import BatchLoader, CacheIndex, GlobalBatch, build_index, columns_for
from kdpipe.trainer.distributed import (
    Distributed,
    RankSlice,
    gather_model_state,
    gather_optimizer_state,
    load_optimizer_state,
    local_value,
    rank_order,
    wrap,
)
from kdpipe.trainer.evaluate import run_evaluation
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.metrics import RunLogger, SampleStats
from kdpipe.trainer.model import (
    StudentParts,
    autocast,
    autocast_dtype,
    check_tokenizer,
    check_vocab,
    load_student,
    load_tokenizer,
    split_student,
)
from kdpipe.trainer.objective import StudentObjective, call, no_grad_sync
from kdpipe.trainer.run_dir import FINAL_METRICS_NAME, prepare_run_dir, rewind_logs
from kdpipe.trainer.sampler import (
    ConstantKdWeight,
    KdWeightFn,
    Sampler,
    ShuffleSampler,
    holdout_mask,
)

log = logging.getLogger(__name__)


def accumulate_gradients(parts: StudentParts, batch: GlobalBatch, kd_weight: np.ndarray,
                         loss_cfg: LossConfig, vocab_size: int, device: torch.device,
                         amp_dtype: torch.dtype | None, stats: SampleStats | None = None,
                         step: int = 0, token_kd_weight: list[torch.Tensor] | None = None, *,
                         objective: nn.Module | None = None, dist: Distributed | None = None,
                         share: RankSlice | None = None) -> dict[str, float]:
    """Forward + backward over the micro-batches of one global batch; returns per-token means.

    kd_weight: (S,) λ of each sample of `batch`, in order; token_kd_weight, when given,
    replaces it by (N_m,) λ per target token of each micro-batch. Each micro-batch's loss sum
    is divided by the global batch's real target tokens (summed over ranks) before backward,
    so the summed gradients equal those of one big batch's token mean, however the batch is
    split over micro-batches and processes. Distributed: `objective` is the DDP/FSDP-wrapped
    StudentObjective, `share` this rank's slice (its micro-batch count and whether it is real:
    placeholders and padding micro-batches run with weight 0, see distributed.py).
    """
    dist = dist or Distributed()
    objective = objective if objective is not None else StudentObjective(parts,
                                                                         vocab_size)
    real = share is None or share.real
    local_tokens = batch.num_targets if real else 0
    tokens = max(int(dist.sum([local_tokens], device)[0]), 1)
    lam_by_sample = torch.from_numpy(np.asarray(kd_weight, dtype=np.float32))  # (S,)
    # (micro-batch, weight 1 or 0); padded to the micro-batch count every rank runs.
    runs = [(mb, 1.0 if real else 0.0) for mb in batch.micro]
    planned = share.micro_batches if share is not None else len(runs)
    runs += [(batch.micro[0], 0.0)] * (planned - len(runs))
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # total, ce, kd, correct
    first = 0
    for m, (cpu_batch, weight) in enumerate(runs):
        mb = cpu_batch.to(device)
        rows = cpu_batch.sample_ids.numel()
        if not weight:
            lam = torch.zeros(mb.num_targets, device=device)
        elif token_kd_weight is not None:
            lam = token_kd_weight[m].to(device)  # (N,) λ per token
        else:
            lam = lam_by_sample[first:first + rows].to(device)[mb.target_row]  # (N,)
        first += rows
        with no_grad_sync(objective, skip=m < len(runs) - 1):
            with autocast(device, amp_dtype):
                out = call(objective, mb, lam, loss_cfg)
            # DDP/FSDP average gradients over ranks; × world size makes that a sum.
            loss = out.total / (tokens / dist.world_size)
            (loss if weight else loss * 0.0).backward()
        if not weight:
            continue
        sums += torch.stack([out.total.detach().double(), out.ce.double(), out.kd.double(),
                             out.correct_top1.double()])
        if stats is not None:
            stats.add(cpu_batch.sample_ids, mb.target_row, out.ce_per_token, step)
    total, ce_sum, kd_sum, correct = (s / tokens for s in dist.sum(sums.tolist(), device))
    return {"loss": total, "ce": ce_sum, "kd": kd_sum, "top1_agreement": correct,
            "tokens": tokens}


def train_step(parts: StudentParts, optimizer: torch.optim.Optimizer, scheduler: Any,
               batch: GlobalBatch, kd_weight: np.ndarray, loss_cfg: LossConfig,
               vocab_size: int, device: torch.device, amp_dtype: torch.dtype | None,
               max_grad_norm: float, stats: SampleStats | None, step: int,
               token_kd_weight: list[torch.Tensor] | None = None, *,
               objective: nn.Module | None = None, dist: Distributed | None = None,
               share: RankSlice | None = None) -> dict[str, float]:
    """One optimizer step: accumulate gradients, clip, AdamW, advance the LR schedule.

    Raises NonFiniteError, before the optimizer changes any weight, when the loss or the
    gradient norm is NaN or infinite (on every rank alike: both are global values).
    """
    result = accumulate_gradients(parts, batch, kd_weight, loss_cfg, vocab_size,
                                  device, amp_dtype, stats, step, token_kd_weight,
                                  objective=objective, dist=dist, share=share)
    model = objective if objective is not None else parts.model
    params = [p for p in model.parameters() if p.grad is not None]
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    result["lr"] = scheduler.get_last_lr()[0]
    result["grad_norm"] = local_value(norm)
    if not all(math.isfinite(result[k]) for k in ("loss", "ce", "kd", "grad_norm")):
        raise NonFiniteError(
            f"step {step}: the loss is {result['loss']:.6g} (CE {result['ce']:.6g}, KD "
            f"{result['kd']:.6g}) and the gradient norm {result['grad_norm']:.6g}; the step "
            "was not applied and no model was saved from it")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def split_data(cfg: TrainConfig, index: CacheIndex
               ) -> tuple[np.ndarray, CacheIndex | None, np.ndarray]:
    """(train ids, eval index or None, eval ids): --eval-cache, or --eval-fraction by hash."""
    ids = index.sample_ids
    held = holdout_mask(ids, cfg.eval_fraction)
    train_ids = ids[~held]
    if cfg.eval_cache is not None:
        eval_cache = open_cache(cfg.eval_cache)
        if not same_mapping(eval_cache.manifest, index.cache.manifest):
            raise ConfigError(f"--eval-cache {cfg.eval_cache} was made with a tokenizer that "
                              f"maps ids differently from --cache {cfg.cache}'s; cache both "
                              "with the same tokenizer")
        eval_index: CacheIndex | None = build_index(eval_cache)
        assert eval_index is not None
        eval_ids = eval_index.sample_ids
    elif cfg.eval_fraction > 0:
        eval_index, eval_ids = index, ids[held]
    else:
        eval_index, eval_ids = None, ids[:0]
    if train_ids.size == 0:
        raise ConfigError(f"--cache {cfg.cache}: no training samples left after "
                          f"--eval-fraction {cfg.eval_fraction}")
    if eval_index is not None and eval_ids.size == 0:
        raise ConfigError(f"--eval-fraction {cfg.eval_fraction} holds out no sample of "
                          f"{len(index)}; raise it or use --eval-cache")
    return train_ids, eval_index, eval_ids[:cfg.eval_max_samples]


def all_sample_stats(stats: SampleStats, dist: Distributed) -> SampleStats:
    """Every rank's per-sample statistics merged (collective); on one process, `stats`."""
    return SampleStats.merged(dist.gather(stats.rows)) if dist.enabled else stats


def write_snapshot(run_dir: Path, stats: SampleStats, epoch: int, step: int, complete: bool,
                   fingerprint: str, dist: Distributed) -> None:
    """Every rank's per-sample statistics, merged, written by rank 0 (collective)."""
    merged = all_sample_stats(stats, dist)
    if dist.is_main and len(merged):
        name = snap.snapshot_name(epoch, None if complete else step)
        snap.write_snapshot(run_dir / snap.SNAPSHOTS_DIR / name, merged.table(epoch), epoch,
                            step, complete, fingerprint)
    dist.barrier()  # a snapshot curriculum reads it on every rank at the next epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, sampler: Sampler | None = None,
          kd_weight_fn: KdWeightFn | None = None) -> dict[str, Any]:
    """Run `kdpipe train-student`; returns the final metrics (also in RUN/final_metrics.json).

    `sampler` and `kd_weight_fn` replace the seeded shuffle and the constant λ (curricula and
    selective reliance plug in here); both must be deterministic for --resume to be exact.
    Without them, `--curriculum*`/`--reliance*` options build them (curriculum_config.py).
    Under torchrun every process calls this; see distributed.py for how the work is split.
    """
    cfg = cfg.with_cache_defaults()
    cfg.validate()
    check_curriculum_file(cfg.curriculum, cfg.cache)  # before touching the run folder
    dist = Distributed.from_env(cfg.device)
    try:
        return _train(cfg, dist, sampler, kd_weight_fn)
    except NonFiniteError as exc:
        latest = ckpt.latest_checkpoint(Path(cfg.out))
        kept = (f"the last good checkpoint, {latest}, is kept (resume from it with --resume "
                "after lowering --lr or fixing the cause)" if latest is not None else
                "no checkpoint was written before it (--save-every N keeps some)")
        raise NonFiniteError(f"{exc}; {kept}") from exc
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Distributed, sampler: Sampler | None,
           kd_weight_fn: KdWeightFn | None) -> dict[str, Any]:
    # --- setup ---------------------------------------------------------------------------
    main = dist.is_main
    if cfg.fsdp and not dist.enabled:
        log.warning("--fsdp shards the student over the processes torchrun starts; on one "
                    "process it has no effect")
    start = dist.on_main(lambda: prepare_run_dir(cfg, dist.world_size))
    if start.finished is not None:
        return start.finished
    run_dir = Path(cfg.out)
    seed_everything(cfg.seed + dist.rank)  # rank 0 as on one process; dropout differs by rank
    device = dist.device(resolve_device(cfg.device))
    amp_dtype = autocast_dtype(cfg.dtype, device)
    cache = open_cache(cfg.cache)
    manifest = cache.manifest
    name = cfg.student or cfg.student_config or "student"
    tokenizer = load_tokenizer(cfg.student, cfg.tokenizer, cache, cfg.trust_remote_code)
    check_tokenizer(tokenizer, cache, cfg.trust_remote_code)
    source = str(start.checkpoint) if start.checkpoint is not None else cfg.student
    model = load_student(source, None if source else cfg.student_config, manifest, tokenizer,
                         cfg.seed, cfg.trust_remote_code)
    check_vocab(model, manifest, name)
    model.to(device)
    model.train()
    parts = split_student(model, name)
    fsdp = cfg.fsdp and dist.enabled
    objective = wrap(StudentObjective(parts, manifest.vocab_size), dist, fsdp, device)

    index = build_index(cache)
    train_ids, eval_index, eval_ids = split_data(cfg, index)
    per_step = cfg.batch_size * cfg.grad_accum * dist.world_size  # the global batch
    plugins = setup_curriculum(cfg.curriculum, cache, index.sample_ids, train_ids,
                               seed=cfg.seed, per_step=per_step, max_steps=cfg.max_steps,
                               epochs=cfg.epochs, kd_weight=cfg.loss.kd_weight, run_dir=run_dir,
                               loader_groups=cfg.shuffle_window,
                               sum_across=lambda v: dist.sum(v, device))
    sampler = sampler or plugins.sampler or ShuffleSampler(index, train_ids, cfg.seed,
                                                           cfg.shuffle_window)
    kd_weight_fn = kd_weight_fn or plugins.kd_weight_fn or ConstantKdWeight(cfg.loss.kd_weight)
    token_fn = plugins.token_fn  # token-level reliance: λ per target token
    log_kd_weights = not isinstance(kd_weight_fn, ConstantKdWeight) or token_fn is not None
    total_steps = cfg.max_steps or sum(-(-sampler.epoch_size(e) // per_step)
                                       for e in range(cfg.epochs or 1))
    loss_cfg = cfg.loss
    columns = columns_for(cache, teacher=loss_cfg.mode == "kd", temperature=loss_cfg.temperature,
                          target_logprob=token_fn is not None)
    pad_id = manifest.tokenizer.pad_token_id or 0

    optimizer = build_optimizer(objective, cfg)  # after wrapping: FSDP's parameters are shards
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    state = ckpt.TrainerState(step=0, epoch=0, batches_in_epoch=0, tokens_seen=0,
                              samples_seen=0, config=cfg.to_json_dict(),
                              world_size=dist.world_size)
    stats = SampleStats() if cfg.snapshots else None
    if start.checkpoint is not None:
        state = replace(ckpt.read_trainer_state(start.checkpoint), config=cfg.to_json_dict())
        saved = ckpt.load_training_state(start.checkpoint)
        load_optimizer_state(objective, optimizer, saved[ckpt.OPTIMIZER_KEY], fsdp)
        scheduler.load_state_dict(saved[ckpt.SCHEDULER_KEY])
        rngs = saved.get(ckpt.RANK_RNG_KEY) or [saved[ckpt.RNG_KEY]]
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
        if stats is not None and ckpt.SAMPLE_STATS_KEY in saved and main:
            stats.load_state_dict(saved[ckpt.SAMPLE_STATS_KEY])  # merged: rank 0 holds it
        log.info("resuming %s from %s (step %d, epoch %d)", run_dir, start.checkpoint.name,
                 state.step, state.epoch)
    if main:
        rewind_logs(run_dir, state.step, state.epoch)
    dist.barrier()

    def save(folder: Path, with_training_state: bool) -> None:
        """Every rank takes part (FSDP gathers the shards); rank 0 writes."""
        weights, training_state = gather_model_state(objective, fsdp), None
        if with_training_state:
            training_state = {ckpt.OPTIMIZER_KEY: gather_optimizer_state(objective, optimizer,
                                                                         fsdp),
                              ckpt.SCHEDULER_KEY: scheduler.state_dict(),
                              ckpt.RNG_KEY: ckpt.rng_state()}
            if dist.enabled:
                training_state[ckpt.RANK_RNG_KEY] = dist.gather(ckpt.rng_state())
            if stats is not None:
                training_state[ckpt.SAMPLE_STATS_KEY] = all_sample_stats(stats, dist).state_dict()
        if main:
            ckpt.save_checkpoint(folder, model, tokenizer, state, training_state, weights)
            if with_training_state:
                ckpt.prune_checkpoints(run_dir, cfg.keep_checkpoints)
        dist.barrier()

    def evaluate_now() -> dict[str, Any] | None:
        if eval_index is None:
            return None
        return run_evaluation(parts, eval_index, eval_ids, loss_cfg, device,
                              amp_dtype, cfg.batch_size, pad_id, cfg.prefetch, progress=False,
                              objective=objective, dist=dist)

    # --- train ---------------------------------------------------------------------------
    last: dict[str, Any] = {}
    window_tokens, window_start = 0, time.perf_counter()
    logger = RunLogger(run_dir) if main else None
    with contextlib.ExitStack() as closing, tqdm(
            total=total_steps, initial=state.step, desc="train-student", unit="step",
            disable=not (cfg.progress and main), dynamic_ncols=True) as bar:
        if logger is not None:
            closing.enter_context(logger)
        while state.step < total_steps:
            order = sampler.epoch_order(state.epoch)
            batches = -(-order.size // per_step)
            if batches == 0:
                raise ConfigError(f"the sampler gave no samples for epoch {state.epoch}")
            remaining = order[state.batches_in_epoch * per_step:]
            local_order, shares = rank_order(remaining, per_step, dist.world_size, dist.rank,
                                             cfg.batch_size)
            with BatchLoader(index, local_order, columns, cfg.batch_size, cfg.grad_accum,
                             pad_id, cfg.prefetch, cached_groups=cfg.shuffle_window) as loader:
                for b, batch in enumerate(loader):
                    step = state.step + 1
                    share = shares[b]
                    global_ids = remaining[b * per_step:(b + 1) * per_step]
                    global_lam = kd_weight_fn(global_ids, step)  # (S,) the same on every rank
                    lam = (global_lam[share.start:share.start + share.sample_ids.size]
                           if share.real else np.zeros(share.sample_ids.size, np.float32))
                    token_lam = None
                    if token_fn is not None:  # λ per token; log each sample's mean λ
                        micro = batch.micro if share.real else []
                        token_lam, lam = token_fn(
                            [(mb.target_logprob, mb.target_row, mb.sample_ids.numel())
                             for mb in micro], step)
                        global_lam = (np.concatenate(dist.gather(lam)) if dist.enabled
                                      else lam)
                    result = train_step(parts, optimizer, scheduler, batch, lam, loss_cfg,
                                        manifest.vocab_size, device, amp_dtype,
                                        cfg.max_grad_norm, stats, step, token_lam,
                                        objective=objective, dist=dist, share=share)
                    epoch = state.epoch
                    state = replace(state, step=step, batches_in_epoch=state.batches_in_epoch + 1,
                                    tokens_seen=state.tokens_seen + int(result["tokens"]),
                                    samples_seen=state.samples_seen + global_ids.size)
                    if logger is not None:
                        logger.log_order(step, epoch, global_ids,
                                         global_lam if log_kd_weights else None)
                    window_tokens += int(result["tokens"])
                    last = {"split": "train", "step": step, "epoch": epoch, **result}
                    if step % cfg.log_every == 0 or step == total_steps:
                        now = time.perf_counter()
                        last["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                        window_tokens, window_start = 0, now
                        if logger is not None:
                            logger.log(last)
                        bar.set_postfix(loss=f"{result['loss']:.4f}",
                                        tok_s=f"{last['tokens_per_s']:.0f}")
                    bar.update(1)
                    paused = time.perf_counter()  # snapshots, eval, saving: not in tokens/s
                    if state.batches_in_epoch == batches:  # epoch done: snapshot, next epoch
                        if stats is not None:
                            write_snapshot(run_dir, stats, epoch, step, True,
                                           manifest.settings_fingerprint, dist)
                            stats = SampleStats()
                        state = replace(state, epoch=epoch + 1, batches_in_epoch=0)
                    elif (cfg.snapshot_every and step % cfg.snapshot_every == 0
                          and stats is not None):
                        write_snapshot(run_dir, stats, epoch, step, False,
                                       manifest.settings_fingerprint, dist)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                        metrics = evaluate_now()
                        if metrics is not None and logger is not None:
                            logger.log({"split": "eval", "step": step, "epoch": epoch, **metrics})
                    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                        save(run_dir / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(step), True)
                    window_start += time.perf_counter() - paused
                    if step >= total_steps:
                        break

        # --- final save ----------------------------------------------------------------------
        if stats is not None and state.batches_in_epoch:  # stopped mid-epoch: what it saw
            write_snapshot(run_dir, stats, state.epoch, state.step, False,
                           manifest.settings_fingerprint, dist)
        final_eval = evaluate_now()
        if final_eval is not None and logger is not None:
            logger.log({"split": "eval", "step": state.step, "epoch": state.epoch, **final_eval})
    save(run_dir / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(state.step), True)
    save(run_dir / ckpt.FINAL_DIR, False)
    final: dict[str, Any] = {"run_dir": str(run_dir), "step": state.step, "epoch": state.epoch,
                             "tokens_seen": state.tokens_seen,
                             "samples_seen": state.samples_seen,
                             "world_size": dist.world_size}
    final.update({f"train_{k}": v for k, v in last.items() if k not in ("split", "step", "epoch")})
    if final_eval is not None:
        final.update({f"eval_{k}": v for k, v in final_eval.items()})
    if main:
        atomic_write_json(run_dir / FINAL_METRICS_NAME, final)
        log.info("finished %s: step %d, train loss %s", run_dir, state.step,
                 final.get("train_loss"))
    dist.barrier()
    return final
