"""Typer commands `train-student` and `evaluate`: build the stage's config and call it.

Registered by `kdpipe/cli.py`; the functions here only translate flags into `TrainConfig` /
`EvalConfig` (whose `validate()` checks everything) and print the result.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kdpipe.trainer.config import EvalConfig, TrainConfig
from kdpipe.trainer.distributed import is_main_process

_LOSS_HELP = ("KD divergence on the cached top-k + tail partition: forward (KL with the tail "
              "bucket, exact), zero (renormalised top-k, biased; for comparison), reverse, "
              "jsd, skew, tvd; sampled (count-weighted CE, for a --cache-mode sampled cache). "
              "Default: follows the cache: sampled for a sampled cache, else forward.")


def train_student(
    cache: Annotated[str, typer.Option(help="Teacher cache folder (from `kdpipe cache-teacher`).")],
    out: Annotated[str, typer.Option(help="Run folder: config, metrics, checkpoints, final/.")],
    student: Annotated[str | None, typer.Option(
        help="Student to train: local folder or hub name of any causal LM.")] = None,
    student_config: Annotated[str | None, typer.Option(
        help="JSON model config with `model_type` (e.g. llama): train a student from scratch "
        "(vocab_size defaults to the teacher's head width).")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer path/name; default: the student's own, else the cache's. Must map "
        "every cached id to the same token as the cache's tokenizer.")] = None,
    eval_cache: Annotated[str | None, typer.Option(
        help="Held-out cache (same tokenizer) for periodic and final evaluation.")] = None,
    eval_fraction: Annotated[float, typer.Option(
        help="Hold out this fraction of --cache, chosen by a hash of sample_id "
        "(deterministic, the same for every run).")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: only at the end).")
                          ] = 0,
    eval_max_samples: Annotated[int | None, typer.Option(
        help="At most this many held-out sequences per evaluation.")] = None,
    mode: Annotated[str, typer.Option(
        help="kd: (1-λ)·CE + λ·τ²·KD; ce: cross-entropy on the cached tokens only (the "
        "baseline, or to train a teacher).")] = "kd",
    loss: Annotated[str | None, typer.Option(help=_LOSS_HELP)] = None,
    kd_weight: Annotated[float, typer.Option(help="λ: weight of the KD term, in [0, 1].")] = 0.5,
    temperature: Annotated[float, typer.Option(
        help="τ of the KD term (the term is scaled by τ²; exact tempered tail when the cache "
        "stores it, else the uniform-tail approximation).")] = 1.0,
    beta: Annotated[float, typer.Option(help="JSD mixture weight β.")] = 0.5,
    alpha: Annotated[float, typer.Option(help="Skew KL weight α in KL(p || αp + (1-α)q).")
                     ] = 0.1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")
                            ] = 0.1,
    adam_beta1: Annotated[float, typer.Option(help="AdamW β1.")] = 0.9,
    adam_beta2: Annotated[float, typer.Option(help="AdamW β2.")] = 0.95,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 0,
    scheduler: Annotated[str, typer.Option(
        help="LR schedule after warmup: cosine, linear, constant, constant_with_warmup.")
    ] = "cosine",
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(
        help="Optimizer steps to train (cycles epochs as needed).")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Epochs to train (default 1 when --max-steps is not given).")] = None,
    save_every: Annotated[int, typer.Option(
        help="Checkpoint every N steps (0: only at the end).")] = 0,
    keep_checkpoints: Annotated[int, typer.Option(
        help="Keep only the newest N checkpoints (0: keep all).")] = 0,
    snapshots: Annotated[bool, typer.Option(
        help="Write per-sample loss/confidence snapshots after each epoch.")] = True,
    snapshot_every: Annotated[int, typer.Option(
        help="Also write a snapshot every N steps (0: only after each epoch).")] = 0,
    log_every: Annotated[int, typer.Option(help="Log train metrics every N steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and dropout.")
                    ] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="Autocast dtype: auto (bfloat16 on GPU, none on CPU), float32, bfloat16, "
        "float16.")] = "auto",
    chunk_size: Annotated[int, typer.Option(
        help="Target tokens per chunk of the output head and loss (bounds logits memory).")
    ] = 1024,
    shuffle_window: Annotated[int, typer.Option(
        help="Row groups (64 sequences each) shuffled together; larger = closer to a full "
        "shuffle, more memory.")] = 16,
    prefetch: Annotated[int, typer.Option(help="Batches decoded ahead in the background.")] = 4,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its latest checkpoint (exactly).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Delete a previous run in --out and start over.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        help="Allow the student/tokenizer to run code from its repository.")] = False,
    fsdp: Annotated[bool, typer.Option(
        help="Under torchrun: shard parameters, gradients and optimizer state over the "
        "processes (FSDP2) instead of replicating the student (DDP). See "
        "docs/distributed.md.")] = False,
    curriculum: Annotated[str | None, typer.Option(
        help="Curriculum index from `kdpipe build-curriculum` (same cache): present samples "
        "easy → hard. See docs/curriculum.md.")] = None,
    curriculum_source: Annotated[str, typer.Option(
        help="file: the --curriculum ranking throughout; snapshot: re-rank after every epoch "
        "from that epoch's per-sample training losses (epoch 0: --curriculum, else "
        "shuffled).")] = "file",
    curriculum_metric: Annotated[str, typer.Option(
        help="What snapshot re-ranking sorts by: nll (loss) or confidence.")] = "nll",
    pacing: Annotated[str, typer.Option(
        help="Share of the easiest data available at step t: linear, root, exp, step, "
        "baby-steps, or none (every sample once per epoch, in ranked order).")] = "linear",
    pacing_start: Annotated[float, typer.Option(help="b: starting share of the data.")] = 0.2,
    pacing_full: Annotated[float, typer.Option(
        help="a: share of training after which all data is available.")] = 0.8,
    pacing_increase: Annotated[float, typer.Option(
        help="inc: growth factor per step of --pacing exp.")] = 2.0,
    pacing_step_length: Annotated[int | None, typer.Option(
        help="Steps per stage of exp, step and baby-steps (default: all data at a·T).")
    ] = None,
    pacing_buckets: Annotated[int | None, typer.Option(
        help="Difficulty buckets of baby-steps (default: the curriculum's, else 10).")] = None,
    order: Annotated[str, typer.Option(
        help="curriculum (easy → hard); controls: anti (hard → easy), random (shuffled).")
    ] = "curriculum",
    reliance: Annotated[str, typer.Option(
        help="λ per sample: constant (--kd-weight), threshold, linear (from the difficulty "
        "percentile), token (from the teacher's per-token uncertainty 1 - p_T(y)).")
    ] = "constant",
    kd_weight_low: Annotated[float, typer.Option(help="λ_lo of selective reliance.")] = 0.1,
    kd_weight_high: Annotated[float, typer.Option(help="λ_hi of selective reliance.")] = 0.9,
    reliance_quantile: Annotated[float, typer.Option(
        help="q of --reliance threshold: λ_hi above this percentile, λ_lo below.")] = 0.5,
    reliance_control: Annotated[str, typer.Option(
        help="none, or shuffled: the same λ values given to random samples.")] = "none",
    kd_weight_schedule: Annotated[str, typer.Option(
        help="Control: none; linear (λ_lo → λ_hi over steps, all samples alike); matched "
        "(each step's mean selective λ for all its samples).")] = "none",
) -> None:
    """Train a student from a teacher cache (no teacher is loaded); prints final metrics."""
    from kdpipe.trainer.train import train

    cfg = TrainConfig(
        cache=cache, out=out, student=student, student_config=student_config,
        tokenizer=tokenizer, eval_cache=eval_cache, eval_fraction=eval_fraction, mode=mode,
        loss=loss, kd_weight=kd_weight, temperature=temperature, beta=beta, alpha=alpha, lr=lr,
        weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        warmup_steps=warmup_steps, scheduler=scheduler, batch_size=batch_size,
        grad_accum=grad_accum, max_grad_norm=max_grad_norm, max_steps=max_steps, epochs=epochs,
        eval_every=eval_every, eval_max_samples=eval_max_samples, save_every=save_every,
        keep_checkpoints=keep_checkpoints, snapshots=snapshots, snapshot_every=snapshot_every,
        log_every=log_every, seed=seed, device=device, dtype=dtype, chunk_size=chunk_size,
        shuffle_window=shuffle_window, prefetch=prefetch, progress=progress, resume=resume,
        overwrite=overwrite, trust_remote_code=trust_remote_code, fsdp=fsdp,
        curriculum=curriculum,
        curriculum_source=curriculum_source, curriculum_metric=curriculum_metric,
        pacing=pacing, pacing_start=pacing_start, pacing_full=pacing_full,
        pacing_increase=pacing_increase, pacing_step_length=pacing_step_length,
        pacing_buckets=pacing_buckets, order=order, reliance=reliance,
        kd_weight_low=kd_weight_low, kd_weight_high=kd_weight_high,
        reliance_quantile=reliance_quantile, reliance_control=reliance_control,
        kd_weight_schedule=kd_weight_schedule)
    final = train(cfg)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        typer.echo(json.dumps(final, allow_nan=False))


def evaluate(
    student: Annotated[str, typer.Option(help="Student folder or hub name (e.g. RUN/final).")],
    cache: Annotated[str, typer.Option(help="Teacher cache folder to evaluate on.")],
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer path/name; default: the student's own, else the cache's.")] = None,
    eval_fraction: Annotated[float, typer.Option(
        help="Evaluate only the held-out split train-student made with this --eval-fraction "
        "(0: the whole cache).")] = 0.0,
    max_samples: Annotated[int | None, typer.Option(help="At most this many sequences.")
                           ] = None,
    loss: Annotated[str | None, typer.Option(help=_LOSS_HELP)] = None,
    kd_weight: Annotated[float, typer.Option(help="λ of the reported mixed `loss`.")] = 0.5,
    temperature: Annotated[float, typer.Option(help="τ of the KD divergence.")] = 1.0,
    beta: Annotated[float, typer.Option(help="JSD mixture weight β.")] = 0.5,
    alpha: Annotated[float, typer.Option(help="Skew KL weight α.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="Autocast dtype: auto, float32, bfloat16, float16.")] = "auto",
    chunk_size: Annotated[int, typer.Option(help="Target tokens per head/loss chunk.")] = 1024,
    prefetch: Annotated[int, typer.Option(help="Batches decoded ahead in the background.")] = 4,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        help="Allow the student/tokenizer to run code from its repository.")] = False,
) -> None:
    """One pass of a student over a cache; prints one JSON object (ce, ppl, kd, top1...).

    Under torchrun the processes split the samples and reduce the sums."""
    from kdpipe.trainer.evaluate import evaluate as run

    cfg = EvalConfig(
        student=student, cache=cache, tokenizer=tokenizer, eval_fraction=eval_fraction,
        max_samples=max_samples, loss=loss, kd_weight=kd_weight, temperature=temperature,
        beta=beta, alpha=alpha, batch_size=batch_size, device=device, dtype=dtype,
        chunk_size=chunk_size, prefetch=prefetch, progress=progress,
        trust_remote_code=trust_remote_code)
    result = run(cfg)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        typer.echo(json.dumps(result, allow_nan=False))
