"""`TrainConfig` and `EvalConfig`: every default of the student stage, validated in one place.

The CLI fills these from flags, Python users build them directly; `validate()` reports every
problem at once as one `ConfigError`. A run folder holds its config as `config.json`, which is
how `--resume` and re-runs recognise the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdpipe.schemas.errors import CacheFormatError, ConfigError, check_finite, choice_problems
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.manifest import manifest_path, read_manifest
from kdpipe.schemas.records import from_dict, read_json, to_dict
from kdpipe.trainer.chunked_loss import LossConfig, loss_problems
from kdpipe.trainer.curriculum_config import CurriculumConfig

CONFIG_NAME = "config.json"
MODES = ("kd", "ce")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fields that never make a different run: where the run folder now is (moved or copied),
# where it runs, how it shows progress, and the run-folder flags themselves.
COSMETIC_FIELDS = ("out", "device", "prefetch", "progress", "resume", "overwrite")
# Fields that may also differ on `--resume`: how long to train and how often to report.
# Everything else defines the run and must match.
RESUMABLE_CHANGES = COSMETIC_FIELDS + ("max_steps", "epochs", "eval_every", "save_every",
                                       "snapshot_every", "log_every", "keep_checkpoints")


def _common_problems(c: Any, loss: str | None) -> list[str]:
    """Checks shared by `TrainConfig` and `EvalConfig` (loss settings, device, batch).

    `loss`: the one that will run (a default follows the cache); None when the cache cannot
    be read, which is reported apart."""
    problems = loss_problems(loss or "forward", c.temperature, c.beta, c.alpha, c.chunk_size)
    if not 0.0 <= c.kd_weight <= 1.0:
        problems.append(f"--kd-weight {c.kd_weight} must be within [0, 1]")
    if c.batch_size < 1:
        problems.append(f"--batch-size {c.batch_size} must be >= 1")
    problems += choice_problems("--dtype", c.dtype, DTYPES)
    if c.prefetch < 1:
        problems.append(f"--prefetch {c.prefetch} must be >= 1")
    if not 0.0 <= c.eval_fraction < 1.0:
        problems.append(f"--eval-fraction {c.eval_fraction} must be within [0, 1)")
    return problems


def default_loss(cache: str) -> str | None:
    """The loss a cache calls for: `sampled` for a sampled cache, `forward` for a top-k one;
    None when the cache cannot be read (`open_cache` reports that with its own hint)."""
    if not manifest_path(cache).is_file():
        return None
    try:
        return "sampled" if read_manifest(cache).cache_mode == "sampled" else "forward"
    except (CacheFormatError, OSError, ValueError):
        return None


def _loss_cache_problems(loss: str | None, cache: str, flag: str = "--cache") -> list[str]:
    """A sampled cache needs --loss sampled and a top-k cache any other loss (wherever the KD
    term is computed: KD training, and every evaluation, which reports it); reverse KL needs a
    tail, since with k = V it is infinite wherever the teacher gives an id zero probability.

    An unreadable cache is left to `open_cache`, which reports it with its own hint.
    """
    if loss is None or not manifest_path(cache).is_file():
        return []
    try:
        manifest = read_manifest(cache)
    except (CacheFormatError, OSError, ValueError):
        return []
    sampled = manifest.cache_mode == "sampled"
    if loss == "reverse" and not sampled and manifest.top_k >= manifest.vocab_size:
        return [f"--loss reverse with {flag} {cache}, which caches every id (k = V = "
                f"{manifest.vocab_size}): reverse KL is infinite wherever the teacher gives an "
                "id zero probability; use --loss forward, jsd or skew, or a cache with "
                f"--top-k below {manifest.vocab_size}"]
    if sampled and loss != "sampled":
        return [f"--loss {loss} needs a top-k cache, but {flag} {cache} is sampled "
                "(--cache-mode sampled): use --loss sampled"]
    if not sampled and loss == "sampled":
        return [f"--loss sampled needs a sampled cache, but {flag} {cache} holds top-k "
                "log-probs: use --loss forward, or `kdpipe cache-teacher --cache-mode sampled`"]
    return []


def _path_problems(flag: str, value: str | None, kind: str) -> list[str]:
    if value is None:
        return []
    path = Path(value)
    if kind == "dir" and not path.is_dir():
        return [f"{flag} {value}: no such folder"]
    if kind == "file" and not path.is_file():
        return [f"{flag} {value}: no such file"]
    return []


@dataclass(frozen=True)
class TrainConfig:
    """Everything `kdpipe train-student` needs; see `kdpipe train-student --help` for each."""

    cache: str
    out: str
    student: str | None = None  # path or hub name of an AutoModelForCausalLM
    student_config: str | None = None  # JSON file with `model_type`: a student from scratch
    tokenizer: str | None = None  # default: the student's, else the cache manifest's
    eval_cache: str | None = None
    eval_fraction: float = 0.0  # held out of --cache by a hash of sample_id
    mode: str = "kd"  # "kd" or "ce" (cached tokens only, no teacher terms)
    loss: str | None = None  # None: follows the cache (with_cache_defaults)
    kd_weight: float = 0.5  # λ in (1-λ)·CE + λ·τ²·KD
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 0
    scheduler: str = "cosine"
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int | None = None
    epochs: int | None = None  # default 1 when --max-steps is not given
    eval_every: int = 0  # steps; 0: only at the end
    eval_max_samples: int | None = None  # cap on held-out sequences per periodic eval
    save_every: int = 0  # steps; 0: only the final checkpoint
    keep_checkpoints: int = 0  # newest checkpoints kept; 0 keeps all
    snapshots: bool = True  # per-sample loss/confidence after each epoch
    snapshot_every: int = 0  # steps; 0: only after each epoch
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 on CPU
    chunk_size: int = 1024  # target tokens per chunk of the output head + loss
    shuffle_window: int = 16  # row groups shuffled together (see sampler.ShuffleSampler)
    prefetch: int = 4  # global batches decoded ahead by the loader thread
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    fsdp: bool = False  # under torchrun: shard the student with FSDP2 instead of DDP
    # Curriculum and selective reliance (docs/curriculum.md; curriculum_config.py).
    curriculum: str | None = None  # a `kdpipe build-curriculum` index
    curriculum_source: str = "file"  # file, or snapshot: re-rank from each epoch's losses
    curriculum_metric: str = "nll"  # what snapshot re-ranking sorts by: nll or confidence
    pacing: str = "linear"
    pacing_start: float = 0.2
    pacing_full: float = 0.8
    pacing_increase: float = 2.0
    pacing_step_length: int | None = None
    pacing_buckets: int | None = None
    order: str = "curriculum"  # curriculum (easy -> hard), anti, random
    reliance: str = "constant"
    kd_weight_low: float = 0.1
    kd_weight_high: float = 0.9
    reliance_quantile: float = 0.5
    reliance_control: str = "none"
    kd_weight_schedule: str = "none"

    def with_cache_defaults(self) -> TrainConfig:
        """This config with the defaults that follow from --cache filled in (the loss)."""
        return replace(self, loss=self.loss or default_loss(self.cache))

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, or return None."""
        check_finite(self, "train-student")
        loss = self.loss or default_loss(self.cache)
        problems = _common_problems(self, loss)
        problems += self.curriculum_config().problems(self.mode, self.snapshots)
        if (self.student is None) == (self.student_config is None):
            problems.append("give exactly one of --student PATH and --student-config JSON")
        problems += _path_problems("--student-config", self.student_config, "file")
        problems += _path_problems("--cache", self.cache, "dir")
        problems += _path_problems("--eval-cache", self.eval_cache, "dir")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            problems.append(f"--out {self.out} is a file; give a folder for the run")
        problems += choice_problems("--mode", self.mode, MODES)
        if self.mode == "kd" or self.eval_fraction > 0:  # evaluation reports the KD term too
            problems += _loss_cache_problems(loss, self.cache)
        if self.eval_cache is not None:
            problems += _loss_cache_problems(loss, self.eval_cache, "--eval-cache")
        if self.eval_cache is not None and self.eval_fraction > 0:
            problems.append("give at most one of --eval-cache and --eval-fraction")
        problems += choice_problems("--scheduler", self.scheduler, SCHEDULERS)
        if not self.lr > 0:
            problems.append(f"--lr {self.lr} must be > 0")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay {self.weight_decay} must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            problems.append("--adam-beta1/--adam-beta2 must be within [0, 1)")
        if self.max_grad_norm < 0:
            problems.append(f"--max-grad-norm {self.max_grad_norm} must be >= 0 (0 disables)")
        if self.grad_accum < 1:
            problems.append(f"--grad-accum {self.grad_accum} must be >= 1")
        if self.max_steps is not None and self.epochs is not None:
            problems.append("give at most one of --max-steps and --epochs")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps {self.max_steps} must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"--epochs {self.epochs} must be >= 1")
        if self.warmup_steps < 0:
            problems.append(f"--warmup-steps {self.warmup_steps} must be >= 0")
        for flag, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every),
                            ("--snapshot-every", self.snapshot_every),
                            ("--keep-checkpoints", self.keep_checkpoints)):
            if value < 0:
                problems.append(f"{flag} {value} must be >= 0 (0 disables)")
        if self.log_every < 1:
            problems.append(f"--log-every {self.log_every} must be >= 1")
        if self.shuffle_window < 1:
            problems.append(f"--shuffle-window {self.shuffle_window} must be >= 1")
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            problems.append(f"--eval-max-samples {self.eval_max_samples} must be >= 1")
        if self.dtype == "float16":
            problems.append("--dtype float16 trains without loss scaling, so small gradients "
                            "underflow; use bfloat16 (or float32)")
        if self.resume and self.overwrite:
            problems.append("give at most one of --resume and --overwrite")
        if problems:
            raise ConfigError("invalid train-student options: " + "; ".join(problems))

    def loss_config(self) -> LossConfig:
        return LossConfig(kind=self.loss or "forward", temperature=self.temperature,
                          beta=self.beta, alpha=self.alpha, chunk_size=self.chunk_size,
                          mode=self.mode)

    def curriculum_config(self) -> CurriculumConfig:
        return CurriculumConfig(
            file=self.curriculum, source=self.curriculum_source, metric=self.curriculum_metric,
            pacing=self.pacing, pacing_start=self.pacing_start, pacing_full=self.pacing_full,
            pacing_increase=self.pacing_increase, pacing_step_length=self.pacing_step_length,
            pacing_buckets=self.pacing_buckets, order=self.order, reliance=self.reliance,
            kd_weight_low=self.kd_weight_low, kd_weight_high=self.kd_weight_high,
            reliance_quantile=self.reliance_quantile, reliance_control=self.reliance_control,
            kd_weight_schedule=self.kd_weight_schedule)

    def to_json_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def changed_fields(self, other: TrainConfig) -> list[str]:
        """Names of the fields whose values differ between two configs."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    atomic_write_json(run_dir / CONFIG_NAME, cfg.to_json_dict())


def read_config(run_dir: Path) -> TrainConfig:
    """The config a run folder was created with (validated field by field)."""
    path = run_dir / CONFIG_NAME
    return from_dict(TrainConfig, read_json(path), str(path))


@dataclass(frozen=True)
class EvalConfig:
    """Everything `kdpipe evaluate` needs: a student, a cache and the loss settings."""

    student: str
    cache: str
    tokenizer: str | None = None
    eval_fraction: float = 0.0  # > 0: evaluate only the held-out split train-student uses
    loss: str | None = None  # None: follows the cache (with_cache_defaults)
    kd_weight: float = 0.5  # only for the reported mixed `loss`
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    batch_size: int = 8
    max_samples: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    chunk_size: int = 1024
    prefetch: int = 4
    progress: bool = True
    trust_remote_code: bool = False

    def with_cache_defaults(self) -> EvalConfig:
        """This config with the defaults that follow from --cache filled in (the loss)."""
        return replace(self, loss=self.loss or default_loss(self.cache))

    def validate(self) -> None:
        check_finite(self, "evaluate")
        loss = self.loss or default_loss(self.cache)
        problems = _common_problems(self, loss)
        problems += _path_problems("--cache", self.cache, "dir")
        problems += _loss_cache_problems(loss, self.cache)
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"--max-samples {self.max_samples} must be >= 1")
        if problems:
            raise ConfigError("invalid evaluate options: " + "; ".join(problems))

    def loss_config(self) -> LossConfig:
        return LossConfig(kind=self.loss or "forward", temperature=self.temperature,
                          beta=self.beta, alpha=self.alpha, chunk_size=self.chunk_size,
                          mode="kd")
