"""`kdpipe train-student`: train a student from a teacher cache alone (no teacher is loaded).

`setup` builds a `Run` — the student, the data, the λ source, optimizer and schedule, resumed
from a checkpoint when asked — and `_loop` reads in one screen: order → λ → step → log → hooks
→ stop. Each optimizer step's loss is normalised by the real target tokens of its whole global
batch (all gradient-accumulation micro-batches and processes), so splitting a batch never
changes the gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.progress import Progress
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.errors import ConfigError, NonFiniteError, StorageError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.manifest import same_mapping
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import CacheIndex, Columns, build_index, columns_for
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer import checkpoint as ckpt
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.curriculum_config import (
    check_curriculum_file,
    setup_curriculum,
    setup_teacher_reliance,
)
from kdpipe.trainer.data import BatchLoader, GlobalBatch
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
from kdpipe.trainer.execution import compile_body, enable_gradient_checkpointing
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.metrics import (
    RunLogger,
    SampleStats,
    Throughput,
    record_at,
    teacher_metrics,
)
from kdpipe.trainer.model import Student, autocast, open_student, write_merged
from kdpipe.trainer.objective import StudentObjective, call, no_grad_sync
from kdpipe.trainer.optimizers import build_optimizer
from kdpipe.trainer.precision import (
    gradient_params,
    master_state_dict,
    resolve_precision,
    to_training_precision,
)
from kdpipe.trainer.preemption import CheckpointClock, Interrupted, StopRequest, stop_on_signals
from kdpipe.trainer.reliance import ConstantLambda, LambdaFn, Reliance, StepLambdas
from kdpipe.trainer.run_dir import RunStart, claim_run_dir, plan_run_dir, rewind_logs
from kdpipe.trainer.sampler import Sampler, ShuffleSampler, holdout_mask
from kdpipe.trainer.teachers import (
    FixedTeacherWeights,
    RelianceTeacherWeights,
    StepWeights,
    TeacherWeightsFn,
    mapping_detail,
    open_teachers,
)

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds; `setup` builds it, the loop advances `state`."""

    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None
    cache: Cache
    index: CacheIndex
    student: Student
    objective: nn.Module  # StudentObjective, wrapped by DDP/FSDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Sampler
    reliance: Reliance
    columns: Columns
    per_step: int  # samples per optimizer step, over all processes
    total_steps: int
    eval_index: CacheIndex | None
    eval_ids: np.ndarray
    state: ckpt.TrainerState
    stats: SampleStats | None  # this epoch's per-sample statistics (for snapshots)
    # Several teachers: teachers 2..J's caches (index, columns), their held-out caches'
    # indexes (with --eval-cache), and the weights of the teachers' KD terms.
    others: tuple[tuple[CacheIndex, Columns], ...] = ()
    eval_others: tuple[CacheIndex, ...] = ()
    teacher_weights: TeacherWeightsFn | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def pad_id(self) -> int:
        return self.cache.manifest.tokenizer.pad_token_id or 0

    @property
    def fsdp(self) -> bool:
        return self.cfg.fsdp and self.dist.enabled


# --- one step ---------------------------------------------------------------------------------

def accumulate_gradients(objective: nn.Module, batch: GlobalBatch, lam: StepLambdas,
                         loss_cfg: LossConfig, device: torch.device,
                         amp_dtype: torch.dtype | None, *, dist: Distributed | None = None,
                         share: RankSlice | None = None, stats: SampleStats | None = None,
                         step: int = 0, teacher_weights: StepWeights | None = None
                         ) -> dict[str, float]:
    """Forward + backward over the micro-batches of one global batch; returns per-token means.

    `objective` is a StudentObjective (DDP/FSDP-wrapped when distributed); `lam` the step's λ
    for this process's samples. Each micro-batch's loss sum is divided by the global batch's
    real target tokens (summed over processes) before backward, so the summed gradients equal
    those of one big batch's token mean however the batch is split. Distributed: `share` is
    this rank's slice (its micro-batch count, and whether it is real: placeholders and
    padding micro-batches run with weight 0 so every rank makes the same passes). Several
    teachers (`batch.micro[m].other_teachers`): `teacher_weights` gives the step's (J, N)
    weights per micro-batch (default: --teacher-weight); `kd_teacher_j` (1-based) is each
    teacher's mean KD and `teacher_weight_j` its mean weight per token.
    """
    dist = dist or Distributed()
    teachers = len(batch.micro[0].teachers)
    if teachers > 1 and teacher_weights is None:
        teacher_weights = FixedTeacherWeights(loss_cfg.teacher_mix(teachers))
    real = share is None or share.real
    tokens = max(int(dist.sum([batch.num_targets if real else 0], device)[0]), 1)
    # (micro-batch, weight 1 or 0); padded to the micro-batch count every rank runs.
    runs = [(mb, 1.0 if real else 0.0) for mb in batch.micro]
    planned = share.micro_batches if share is not None else len(runs)
    runs += [(batch.micro[0], 0.0)] * (planned - len(runs))
    # total, ce, kd, correct, then KD against each teacher and each teacher's summed weight
    # (several teachers)
    sums = torch.zeros(4 + (2 * teachers if teachers > 1 else 0), dtype=torch.float64,
                       device=device)
    first = 0
    for m, (cpu_batch, weight) in enumerate(runs):
        mb = cpu_batch.to(device)
        lam_tokens = (lam.tokens(m, first, mb.target_row) if weight else
                      torch.zeros(mb.num_targets, device=device))  # (N,)
        mix = None  # (J, N); a zero-weight micro-batch takes equal weights
        if teacher_weights is not None and teachers > 1:
            mix = (teacher_weights.tokens(m, first, mb.target_row) if weight else
                   torch.full((teachers, mb.num_targets), 1.0 / teachers, device=device))
        first += cpu_batch.sample_ids.numel()
        with no_grad_sync(objective, skip=m < len(runs) - 1):
            with autocast(device, amp_dtype):
                out = call(objective, mb, lam_tokens, loss_cfg, mix)
            # DDP/FSDP average gradients over ranks; × world size makes that a sum.
            loss = out.total / (tokens / dist.world_size)
            (loss if weight else loss * 0.0).backward()
        if not weight:
            continue
        values = [out.total.detach().double(), out.ce.double(), out.kd.double(),
                  out.correct_top1.double()]
        if teachers > 1:
            assert out.kd_per_teacher is not None and mix is not None
            values += list(out.kd_per_teacher.double().unbind())
            values += list(mix.double().sum(dim=1).unbind())
        sums += torch.stack(values)
        if stats is not None:
            stats.add(cpu_batch.sample_ids, mb.target_row, out.ce_per_token, step)
    total, ce_sum, kd_sum, correct, *per_teacher = (
        s / tokens for s in dist.sum(sums.tolist(), device))
    kd_teachers, weights = per_teacher[:len(per_teacher) // 2], per_teacher[len(per_teacher) // 2:]
    return {"loss": total, "ce": ce_sum, "kd": kd_sum, "top1_agreement": correct,
            **teacher_metrics(kd_teachers),
            **{f"teacher_weight_{j}": w for j, w in enumerate(weights, start=1)},
            "tokens": tokens}


def train_step(run: Run, batch: GlobalBatch, lam: StepLambdas, share: RankSlice | None,
               step: int, mix: StepWeights | None = None) -> dict[str, float]:
    """One optimizer step: accumulate gradients, clip, --optimizer, advance the LR schedule.

    Raises NonFiniteError, before the optimizer changes any weight, when the loss or the
    gradient norm is NaN or infinite (on every rank alike: both are global values).
    """
    result = accumulate_gradients(run.objective, batch, lam, run.cfg.loss, run.device,
                                  run.amp_dtype, dist=run.dist, share=share, stats=run.stats,
                                  step=step, teacher_weights=mix)
    params = gradient_params(run.optimizer, run.objective)  # bf16-master: the fp32 masters
    clip = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    result["lr"] = run.scheduler.get_last_lr()[0]
    result["grad_norm"] = local_value(norm)
    if not all(math.isfinite(result[k]) for k in ("loss", "ce", "kd", "grad_norm")):
        raise NonFiniteError(
            f"step {step}: the loss is {result['loss']:.6g} (CE {result['ce']:.6g}, KD "
            f"{result['kd']:.6g}) and the gradient norm {result['grad_norm']:.6g}; the step "
            "was not applied and no model was saved from it")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return result


# --- setup ------------------------------------------------------------------------------------

def split_data(cfg: TrainConfig, index: CacheIndex, others: Sequence[CacheIndex] = ()
               ) -> tuple[np.ndarray, CacheIndex | None, np.ndarray, tuple[CacheIndex, ...]]:
    """(train ids, eval index or None, eval ids, the other teachers' eval indexes):
    --eval-cache (one per --cache, checked to align with each other and to come from the
    same teachers as `others`, teachers 2..J's training caches), or --eval-fraction by hash
    (the other teachers' held-out rows are then in their training caches)."""
    ids = index.sample_ids
    held = holdout_mask(ids, cfg.eval_fraction)
    train_ids = ids[~held]
    eval_others: tuple[CacheIndex, ...] = ()
    if cfg.eval_cache:
        eval_cache = open_cache(cfg.eval_cache[0], verify_reads=cfg.verify_reads,
                                local_cache=cfg.local_cache, flag="--eval-cache")
        if not same_mapping(eval_cache.manifest, index.cache.manifest):
            raise ConfigError(f"--eval-cache {cfg.eval_cache[0]} was made with a tokenizer that "
                              f"maps ids differently from --cache {cfg.cache[0]}'s"
                              + mapping_detail(index.cache, eval_cache,
                                               ("--cache", "--eval-cache"))
                              + "; cache both with the same tokenizer")
        eval_index: CacheIndex | None = build_index(eval_cache)
        assert eval_index is not None
        eval_ids = eval_index.sample_ids
        eval_others = open_teachers(cfg.eval_cache, eval_index, "--eval-cache",
                                    verify_reads=cfg.verify_reads, local_cache=cfg.local_cache)
        _check_eval_teachers(cfg, [index.cache, *(i.cache for i in others)],
                             [eval_index.cache, *(i.cache for i in eval_others)])
    elif cfg.eval_fraction > 0:
        eval_index, eval_ids = index, ids[held]
    else:
        eval_index, eval_ids = None, ids[:0]
    if train_ids.size == 0:
        raise ConfigError(f"--cache {cfg.cache[0]}: no training samples left after "
                          f"--eval-fraction {cfg.eval_fraction}")
    if eval_index is not None and eval_ids.size == 0:
        raise ConfigError(f"--eval-fraction {cfg.eval_fraction} holds out no sample of "
                          f"{len(index)}; raise it or use --eval-cache")
    return train_ids, eval_index, eval_ids[:cfg.eval_max_samples], eval_others


def _check_eval_teachers(cfg: TrainConfig, train: Sequence[Cache], held: Sequence[Cache]
                         ) -> None:
    """Several teachers: --eval-cache j must come from --cache j's teacher (the same weights
    fingerprint), so that kd_teacher_j means one teacher in training and evaluation."""
    if len(train) < 2:
        return
    for j, (cache, eval_cache) in enumerate(zip(train, held, strict=True), start=1):
        ours, theirs = cache.manifest.teacher, eval_cache.manifest.teacher
        if ours.fingerprint != theirs.fingerprint:
            raise ConfigError(f"--eval-cache {cfg.eval_cache[j - 1]} was made by teacher "
                              f"{theirs.name_or_path}, but --cache {cfg.cache[j - 1]} (teacher "
                              f"{j}) by {ours.name_or_path}: give one --eval-cache per --cache, "
                              "from the same teacher, in the same order")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig, dist: Distributed | None = None, start: RunStart | None = None,
          sampler: Sampler | None = None, lambda_fn: LambdaFn | None = None,
          teacher_weights: TeacherWeightsFn | None = None) -> Run:
    """Build a run: student, data and order, λ source, teachers' weights, optimizer and
    schedule, resumed from `start.checkpoint` when given. `cfg` is validated; the run folder
    exists (`start`). Several --cache are checked to align before anything else is built."""
    dist = dist or Distributed()
    seed_everything(cfg.seed + dist.rank)  # rank 0 as on one process; dropout differs by rank
    device = dist.device(resolve_device(cfg.device))
    cache = open_cache(cfg.cache[0], verify_reads=cfg.verify_reads,
                       local_cache=cfg.local_cache)
    index = build_index(cache)
    other_indexes = open_teachers(cfg.cache, index, verify_reads=cfg.verify_reads,
                                  local_cache=cfg.local_cache)

    checkpoint = start.checkpoint if start is not None else None
    precision = resolve_precision(cfg.precision, device)
    student = open_student(cache, device, student=cfg.student,
                           student_config=cfg.student_config, tokenizer=cfg.tokenizer,
                           weights=checkpoint, seed=cfg.seed,
                           trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=cfg.attn_implementation, adapter=cfg.adapter)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student.model, cfg.student or cfg.student_config or "")
    if cfg.compile:
        compile_body(student.parts)
    student.model.train()
    masters = to_training_precision(student.model, precision)  # before DDP fixes grad dtypes
    objective = wrap(StudentObjective(student.parts, cache.manifest.vocab_size), dist,
                     cfg.fsdp and dist.enabled, device)

    train_ids, eval_index, eval_ids, eval_others = split_data(cfg, index, other_indexes)
    per_step = cfg.batch_size * cfg.grad_accum * dist.world_size  # the global batch
    epoch_size = sampler.epoch_size if sampler is not None else lambda epoch: train_ids.size
    total_steps = cfg.max_steps or sum(-(-epoch_size(e) // per_step)
                                       for e in range(cfg.epochs or 1))
    plugins = setup_curriculum(cfg.curriculum, cache, index.sample_ids, train_ids,
                               seed=cfg.seed, per_step=per_step, total_steps=total_steps,
                               kd_weight=cfg.loss.kd_weight, run_dir=cfg.out,
                               loader_groups=cfg.shuffle_window, read_ahead=cfg.read_ahead,
                               sum_across=lambda v: dist.sum(v, device))
    sampler = sampler or plugins.sampler or ShuffleSampler(index, train_ids, cfg.seed,
                                                           cfg.shuffle_window)
    reliance = Reliance(lambda_fn or plugins.per_sample
                        or ConstantLambda(cfg.loss.kd_weight), plugins.per_token,
                        gather=lambda values: (np.concatenate(dist.gather(values))
                                               if dist.enabled else values))
    if other_indexes and teacher_weights is None:  # several teachers
        teacher_weights = _teacher_weights(cfg, [cache, *(i.cache for i in other_indexes)],
                                           train_ids, lambda v: dist.sum(v, device))
    weights_read_logprob = teacher_weights is not None and teacher_weights.target_logprob
    columns = columns_for(cache, teacher=cfg.loss.mode == "kd",
                          temperature=cfg.loss.temperature,
                          target_logprob=plugins.per_token is not None or weights_read_logprob)
    others = tuple((other, columns_for(other.cache, teacher=cfg.loss.mode == "kd",
                                       temperature=cfg.loss.temperature,
                                       target_logprob=weights_read_logprob))
                   for other in other_indexes)

    # After wrapping: FSDP's parameters are shards.
    optimizer = build_optimizer(objective, cfg, device, masters)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    state = ckpt.TrainerState(step=0, epoch=0, batches_in_epoch=0, tokens_seen=0,
                              samples_seen=0, config=cfg.to_json_dict(),
                              world_size=dist.world_size)
    run = Run(cfg, dist, device, precision.autocast, cache, index, student,
              objective, optimizer, scheduler, sampler, reliance, columns, per_step,
              total_steps, eval_index, eval_ids, state, SampleStats() if cfg.snapshots else None,
              others, eval_others, teacher_weights)
    if checkpoint is not None:
        _resume(run, checkpoint)
    return run


def _teacher_weights(cfg: TrainConfig, caches: Sequence[Cache], train_ids: np.ndarray,
                     sum_across: Callable[[list[float]], list[float]]) -> TeacherWeightsFn:
    """--teacher-weight as it is, or reshaped by --teacher-reliance softmax|best."""
    if cfg.curriculum.teacher_reliance == "fixed":
        return FixedTeacherWeights(cfg.loss.teacher_mix(len(caches)))
    return RelianceTeacherWeights(setup_teacher_reliance(
        cfg.curriculum, caches, train_ids, cfg.loss.teacher_weights, seed=cfg.seed,
        sum_across=sum_across))


def _resume(run: Run, checkpoint: Path) -> None:
    """Optimizer, schedule, RNG, data position and per-sample statistics of a checkpoint."""
    run.state = replace(ckpt.read_trainer_state(checkpoint), config=run.cfg.to_json_dict())
    saved = ckpt.load_training_state(checkpoint)
    load_optimizer_state(run.objective, run.optimizer, saved[ckpt.OPTIMIZER_KEY], run.fsdp)
    run.scheduler.load_state_dict(saved[ckpt.SCHEDULER_KEY])
    rngs = saved.get(ckpt.RANK_RNG_KEY) or [saved[ckpt.RNG_KEY]]
    ckpt.set_rng_state(rngs[run.dist.rank] if len(rngs) == run.dist.world_size else rngs[0])
    if run.stats is not None and ckpt.SAMPLE_STATS_KEY in saved and run.dist.is_main:
        run.stats.load_state_dict(saved[ckpt.SAMPLE_STATS_KEY])  # merged: rank 0 holds it
    log.info("resuming %s from %s (step %d, epoch %d)", run.run_dir, checkpoint.name,
             run.state.step, run.state.epoch)


# --- what happens between steps ---------------------------------------------------------------

def all_sample_stats(stats: SampleStats, dist: Distributed) -> SampleStats:
    """Every rank's per-sample statistics merged (collective); on one process, `stats`."""
    return SampleStats.merged(dist.gather(stats.rows)) if dist.enabled else stats


def write_snapshot(run: Run, complete: bool) -> None:
    """Every rank's per-sample statistics, merged, written by rank 0 (collective)."""
    assert run.stats is not None
    merged = all_sample_stats(run.stats, run.dist)
    if run.dist.is_main and len(merged):
        epoch, step = run.state.epoch, run.state.step
        name = snap.snapshot_name(epoch, None if complete else step)
        snap.write_snapshot(run.layout.snapshots / name, merged.table(epoch), epoch, step,
                            complete, run.cache.manifest.settings_fingerprint)
        prune_snapshots(run)
    run.dist.barrier()


def prune_snapshots(run: Run) -> None:
    """Delete the snapshots of all but the last --keep-snapshots epochs. A snapshot curriculum
    re-reads every finished epoch's snapshot when it resumes, so those stay."""
    keep, found = run.cfg.keep_snapshots, snap.list_snapshots(run.run_dir)
    epochs = sorted({epoch for epoch, _, _ in found})
    if keep <= 0 or len(epochs) <= keep:
        return
    inputs = run.cfg.curriculum.source == "snapshot"
    for epoch, step, path in found:
        if epoch < epochs[-keep] and not (inputs and step is None):
            path.unlink()  # a snapshot curriculum reads it on every rank at the next epoch


def save(run: Run, folder: Path, with_training_state: bool) -> None:
    """Every rank takes part (FSDP gathers the shards); rank 0 writes. A LoRA/DoRA student
    saves its adapters only."""
    adapter_base = run.student.adapter_base
    weights = gather_model_state(run.objective, run.fsdp, trainable_only=adapter_base is not None)
    if weights is None:  # bf16-master: the float32 masters; otherwise the model's own
        weights = master_state_dict(run.student.model, run.optimizer)
    training_state = None
    if with_training_state:
        training_state = {
            ckpt.OPTIMIZER_KEY: gather_optimizer_state(run.objective, run.optimizer, run.fsdp),
            ckpt.SCHEDULER_KEY: run.scheduler.state_dict(), ckpt.RNG_KEY: ckpt.rng_state()}
        if run.dist.enabled:
            training_state[ckpt.RANK_RNG_KEY] = run.dist.gather(ckpt.rng_state())
        if run.stats is not None:
            training_state[ckpt.SAMPLE_STATS_KEY] = all_sample_stats(run.stats,
                                                                     run.dist).state_dict()
    if run.dist.is_main:
        ckpt.save_checkpoint(folder, run.student.model, run.student.tokenizer, run.state,
                             training_state, weights, adapter_base)
        if with_training_state:
            ckpt.prune_checkpoints(run.run_dir, run.cfg.keep_last)
    run.dist.barrier()


def evaluate_now(run: Run) -> dict[str, Any] | None:
    """Metrics on the held-out split (every rank takes part), or None without one."""
    if run.eval_index is None:
        return None
    # --eval-fraction: the other teachers' held-out rows are in their training caches.
    others = run.eval_others or tuple(index for index, _ in run.others)
    return run_evaluation(run.student.parts, run.eval_index, run.eval_ids, run.cfg.loss,
                          run.device, run.amp_dtype, run.cfg.batch_size, run.pad_id,
                          run.cfg.prefetch, progress=False, objective=run.objective,
                          dist=run.dist, others=others)


def after_step(run: Run, epoch_done: bool, logger: RunLogger | None, save_now: bool) -> None:
    """The hooks of a finished step: snapshots, the next epoch, evaluation, checkpoints
    (every --save-every steps, or now: on a signal or when the clock says so)."""
    cfg, step, epoch = run.cfg, run.state.step, run.state.epoch
    if epoch_done:  # the epoch's snapshot, then the next epoch
        if run.stats is not None:
            write_snapshot(run, complete=True)
            run.stats = SampleStats()
        run.state = replace(run.state, epoch=run.state.epoch + 1, batches_in_epoch=0)
    elif cfg.snapshot_every and step % cfg.snapshot_every == 0 and run.stats is not None:
        write_snapshot(run, complete=False)
    if step < run.total_steps and cfg.eval_every and step % cfg.eval_every == 0:
        metrics = evaluate_now(run)
        if metrics is not None and logger is not None:
            logger.log({"split": "eval", "step": step, "epoch": epoch, **metrics})
    if step < run.total_steps and (save_now or cfg.save_every and step % cfg.save_every == 0):
        save(run, run.layout.checkpoint(run.state.step), with_training_state=True)


def should_stop_or_save(run: Run, stop: StopRequest, clock: CheckpointClock
                        ) -> tuple[int | None, bool]:
    """(the signal to stop on, or None; whether to checkpoint now), agreed by every rank.

    A signal reaching any rank stops all of them; the checkpoint clock is rank 0's, so ranks
    whose clocks drift still save the same step."""
    flags = run.dist.sum([1.0 if stop.signum is not None else 0.0,
                          1.0 if run.dist.is_main and clock.due() else 0.0], run.device)
    signum = (stop.signum or signal.SIGTERM) if flags[0] > 0 else None
    save_now = signum is not None or flags[1] > 0
    if save_now:
        clock.reset()
    return signum, save_now


def stopped_by_store(run: Run, exc: StorageError) -> StorageError:
    """The one-line error of a run whose loader could not deliver the next batch because the
    store failed (after its library's retries), once the run has kept its work.

    The loop is between steps then: `run.state` is the last completed step, whose hooks have
    run, so a checkpoint of it is saved as a signal saves one (`save`), unless it is there
    already. Under torchrun it is not: `save` is collective, and the other ranks, which did
    not see the failure, are inside the next step's collectives; the run's last checkpoint
    is what --resume continues from (torchrun ends the other ranks when this one exits).
    """
    step, at = run.state.step, run.layout.checkpoint(run.state.step)
    stopped = f"training stopped after step {step} of {run.total_steps}"
    if run.dist.enabled:
        latest = ckpt.latest_checkpoint(run.run_dir)
        kept = (f"{stopped} with no checkpoint saved (under torchrun the other ranks did not "
                "see the failure): " + (f"add --resume to continue from {latest}"
                                        if latest is not None else "none to resume from yet"))
    elif at in ckpt.list_checkpoints(run.run_dir):  # --save-every, or the step resumed from
        kept = f"{stopped}: add --resume to continue from its checkpoint {at}"
    elif step == 0:
        kept = f"{stopped}: nothing to save"
    else:
        save(run, at, with_training_state=True)
        kept = f"{stopped} and saved checkpoint {at}: add --resume to continue from it"
    return StorageError(f"{exc}; {kept}")


# --- the loop ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, sampler: Sampler | None = None,
          lambda_fn: LambdaFn | None = None,
          teacher_weights: TeacherWeightsFn | None = None) -> dict[str, Any]:
    """Run `kdpipe train-student`; returns the final metrics (also in RUN/final_metrics.json).

    `sampler` and `lambda_fn` replace the seeded shuffle and the constant λ (curricula and
    selective reliance plug in here), `teacher_weights` the fixed --teacher-weight mix of
    several teachers; all must be deterministic for --resume to be exact.
    Without them, `--curriculum*`/`--reliance*` options build them (curriculum_config.py).
    Under torchrun every process calls this; see distributed.py for how the work is split.
    """
    if cfg.dry_run:
        raise ConfigError("--dry-run plans the run without training it: run `kdpipe "
                          "train-student ... --dry-run`, or kdpipe.trainer.memory_plan.dry_run")
    cfg = cfg.with_cache_defaults()
    cfg.validate()
    # before any write
    check_curriculum_file(cfg.curriculum, cfg.cache[0], cfg.verify_reads, cfg.local_cache)
    dist = Distributed.from_env(cfg.device)
    if cfg.fsdp and not dist.enabled:
        log.warning("--fsdp shards the student over the processes torchrun starts; on one "
                    "process it has no effect")
    try:
        start = dist.on_main(lambda: plan_run_dir(cfg, dist.world_size))
        if start.finished is not None:
            return start.finished
        # every check before any write
        run = setup(cfg, dist, start, sampler, lambda_fn, teacher_weights)
        dist.on_main(lambda: claim_run_dir(cfg, start))
        return _loop(run)
    except NonFiniteError as exc:
        latest = ckpt.latest_checkpoint(Path(cfg.out))
        kept = (f"the last good checkpoint, {latest}, is kept: start a new run from its "
                f"weights with --student {latest} (and, say, a lower --lr); --resume would "
                "repeat the same step" if latest is not None else
                "no checkpoint was written before it (--save-every N keeps some)")
        raise NonFiniteError(f"{exc}; {kept}") from exc
    finally:
        dist.close()


def _steps(run: Run) -> Generator[tuple[GlobalBatch, RankSlice, np.ndarray, int], None, None]:
    """(batch, this rank's share, the global batch's sample ids, batches in its epoch) for
    every step from where the run stands: each epoch's order, cut into global batches."""
    cfg, dist, per_step = run.cfg, run.dist, run.per_step
    while run.state.step < run.total_steps:
        order = run.sampler.epoch_order(run.state.epoch)
        batches = -(-order.size // per_step)
        if batches == 0:
            raise ConfigError(f"the sampler gave no samples for epoch {run.state.epoch}")
        remaining = order[run.state.batches_in_epoch * per_step:]
        local, shares = rank_order(remaining, per_step, dist.world_size, dist.rank,
                                   cfg.batch_size)
        with BatchLoader(run.index, local, run.columns, cfg.batch_size, cfg.grad_accum,
                         run.pad_id, cfg.prefetch, cached_groups=cfg.shuffle_window,
                         workers=cfg.loader_workers, read_ahead=cfg.read_ahead,
                         others=run.others) as loader:
            for b, batch in enumerate(loader):
                yield batch, shares[b], remaining[b * per_step:(b + 1) * per_step], batches


def _loop(run: Run) -> dict[str, Any]:
    if run.dist.is_main:
        rewind_logs(run.run_dir, run.state.step, run.state.epoch)
    run.dist.barrier()
    logger = RunLogger(run.run_dir) if run.dist.is_main else None
    throughput, last = Throughput(), {}
    clock = CheckpointClock(run.cfg.save_every_minutes)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop_on_signals())
        bar = stack.enter_context(Progress(
            "train-student", run.total_steps, unit="step", initial=run.state.step,
            progress=run.cfg.progress, report=run.dist.is_main))
        if logger is not None:
            stack.enter_context(logger)
        steps = stack.enter_context(contextlib.closing(_steps(run)))
        while True:
            try:
                batch, share, global_ids, batches = next(steps)
            except StopIteration:
                break
            except StorageError as exc:  # the loader could not read the next batch
                raise stopped_by_store(run, exc) from exc
            step = run.state.step + 1
            # λ of every sample (or token) this rank trains on, the same on every rank.
            lam = run.reliance.for_step(global_ids, step, batch, share)
            # Several teachers: the weight of each (collective under a matched control).
            mix = (run.teacher_weights.for_step(global_ids, step, batch, share)
                   if run.teacher_weights is not None else None)
            # Step.
            result = train_step(run, batch, lam, share, step, mix)
            run.state = replace(
                run.state, step=step, batches_in_epoch=run.state.batches_in_epoch + 1,
                tokens_seen=run.state.tokens_seen + int(result["tokens"]),
                samples_seen=run.state.samples_seen + global_ids.size)
            # Log: the order (and λ) of every step, metrics every --log-every steps.
            last = log_step(run, logger, bar, throughput, global_ids, lam, result)
            # Hooks: snapshots, the next epoch, evaluation, checkpoints (not timed).
            signum, save_now = should_stop_or_save(run, stop, clock)
            with throughput.paused():
                after_step(run, run.state.batches_in_epoch == batches, logger, save_now)
            # Stop.
            if step >= run.total_steps:
                break
            if signum is not None:
                raise Interrupted(
                    f"{signal.Signals(signum).name} after step {step} of {run.total_steps}: "
                    f"checkpoint {run.layout.checkpoint(step)} saved; continue with the same "
                    "command and --resume", signum)
        return finish(run, last, logger)


def log_step(run: Run, logger: RunLogger | None, bar: Progress, throughput: Throughput,
             global_ids: np.ndarray, lam: StepLambdas, result: dict[str, float]
             ) -> dict[str, Any]:
    """Log a finished step (order and λ always, metrics every --log-every steps); returns its
    train record."""
    step, epoch = run.state.step, run.state.epoch
    if logger is not None:
        logger.log_order(step, epoch, global_ids, lam.logged)
    throughput.add(int(result["tokens"]))
    record = {"split": "train", "step": step, "epoch": epoch, **result}
    if step % run.cfg.log_every == 0 or step == run.total_steps:
        record["tokens_per_s"] = throughput.rate()
        if logger is not None:
            logger.log(record)
        bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
    bar.update(1)
    return record


def finish(run: Run, last: dict[str, Any], logger: RunLogger | None) -> dict[str, Any]:
    """The last snapshot and evaluation, a checkpoint, `final/` and final_metrics.json.

    `last`: the last step's train record; empty when this process ran no step (a finished
    run resumed to change a reporting option), and then the train record of the run's last
    step is read back from metrics.jsonl, so that final_metrics.json keeps its train_*
    fields."""
    if not last:
        last = record_at(run.layout.metrics, "train", run.state.step) or {}
    if run.stats is not None and run.state.batches_in_epoch:  # stopped mid-epoch
        write_snapshot(run, complete=False)
    final_eval = evaluate_now(run)
    if final_eval is not None and logger is not None:
        logger.log({"split": "eval", "step": run.state.step, "epoch": run.state.epoch,
                    **final_eval})
    save(run, run.layout.checkpoint(run.state.step), with_training_state=True)
    save(run, run.layout.final, with_training_state=False)
    if run.cfg.adapter.merge_adapter and run.dist.is_main:
        assert run.cfg.student is not None
        write_merged(run.layout.final, run.cfg.student, run.cache.manifest,
                     run.student.tokenizer, run.cfg.trust_remote_code)
    final: dict[str, Any] = {"run_dir": str(run.run_dir), "step": run.state.step,
                             "epoch": run.state.epoch, "tokens_seen": run.state.tokens_seen,
                             "samples_seen": run.state.samples_seen,
                             "world_size": run.dist.world_size}
    final.update({f"train_{k}": v for k, v in last.items() if k not in ("split", "step", "epoch")})
    if final_eval is not None:
        final.update({f"eval_{k}": v for k, v in final_eval.items()})
    if run.dist.is_main:
        atomic_write_json(run.layout.final_metrics, final)
        log.info("finished %s: step %d, train loss %s", run.run_dir, run.state.step,
                 final.get("train_loss"))
    run.dist.barrier()
    return final
