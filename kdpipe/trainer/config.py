"""`TrainConfig` and `EvalConfig`: every option of the student stage, declared once.

Each field is an `options.option`: its default, help text and checks, from which the typer
commands are generated (`trainer/cli.py`). The loss options (`LossConfig`) and the curriculum
options (`CurriculumConfig`) nest, and appear as flat flags. `validate()` reports every problem
at once as one `ConfigError`. A run folder holds its config as `config.json`, which is how
`--resume` and re-runs recognise the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdpipe import options
from kdpipe.options import (
    DEVICE_HELP,
    LOCAL_CACHE_HELP,
    PROGRESS_HELP,
    REMOTE_CODE_HELP,
    THREADS_HELP,
    VERIFY_READS_HELP,
    option,
)
from kdpipe.schemas.errors import CacheFormatError, KdpipeError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.manifest import CacheManifest, manifest_path, read_manifest
from kdpipe.schemas.records import from_dict, read_json, to_dict
from kdpipe.schemas.remote_cache import read_remote_manifest
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import READ_AHEAD_TARGETS
from kdpipe.schemas.storage import is_url
from kdpipe.trainer.adapter_config import AdapterConfig, is_adapter_folder
from kdpipe.trainer.choices import ATTN_IMPLEMENTATIONS, FROM_DTYPE, OPTIMIZERS, PRECISIONS
from kdpipe.trainer.curriculum_config import CurriculumConfig
from kdpipe.trainer.loss_config import SAMPLED, LossConfig, default_kind

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fields that never make a different run: where the run folder now is (moved or copied),
# where and on how many CPU threads (and loader processes) it runs, how it shows progress,
# whether it re-checks the cache's checksums (and where it keeps a remote one's shards), the
# run-folder flags themselves, and --dry-run.
COSMETIC_FIELDS = ("out", "device", "threads", "prefetch", "read_ahead", "loader_workers",
                   "progress", "verify_reads", "local_cache", "resume", "overwrite", "dry_run")
# Fields that may also differ on `--resume`: how long to train, how often to report, and
# how the body runs (the same computation: checkpointing exactly, compiled up to rounding).
# Everything else defines the run and must match.
RESUMABLE_CHANGES = COSMETIC_FIELDS + ("max_steps", "epochs", "eval_every", "save_every",
                                       "save_every_minutes", "snapshot_every", "log_every",
                                       "keep_last", "keep_snapshots", "gradient_checkpointing",
                                       "compile")
# Options renamed since run folders were first written: old name -> new name.
RENAMED_FIELDS = {"keep_checkpoints": "keep_last"}
# Options replaced since: old name -> (new name, {old value: new value}).
REPLACED_FIELDS = {"dtype": ("precision", FROM_DTYPE)}


def _cache_manifest(cache: str) -> CacheManifest | None:
    """The cache's manifest, or None when it cannot be read (`open_cache` then reports it)."""
    if is_url(cache):
        try:
            return read_remote_manifest(cache)
        except (KdpipeError, OSError, ValueError):
            return None
    if not manifest_path(cache).is_file():
        return None
    try:
        return read_manifest(cache)
    except (CacheFormatError, OSError, ValueError):
        return None


def with_cache_loss(loss: LossConfig, cache: str) -> LossConfig:
    """`loss` with the loss the cache calls for filled in when --loss was not given."""
    manifest = _cache_manifest(cache)
    if loss.kind is not None or manifest is None:
        return loss
    return replace(loss, kind=default_kind(manifest.cache_mode == "sampled"))


def loss_cache_problems(loss: LossConfig, cache: str, flag: str = "--cache") -> list[str]:
    """A sampled cache needs --loss sampled and a top-k cache any other loss (wherever the KD
    term is computed: KD training, and every evaluation, which reports it); reverse KL needs a
    tail, since with k = V it is infinite wherever the teacher gives an id zero probability.
    """
    manifest = _cache_manifest(cache)
    if manifest is None:
        return []
    sampled = manifest.cache_mode == "sampled"
    kind = loss.resolved(sampled)
    if kind == "reverse" and not sampled and manifest.top_k >= manifest.vocab_size:
        return [f"--loss reverse with {flag} {cache}, which caches every id (k = V = "
                f"{manifest.vocab_size}): reverse KL is infinite wherever the teacher gives an "
                "id zero probability; use --loss forward, jsd or skew, or a cache with "
                f"--top-k below {manifest.vocab_size}"]
    if sampled and kind != SAMPLED:
        return [f"--loss {kind} needs a top-k cache, but {flag} {cache} is sampled "
                "(--cache-mode sampled): use --loss sampled"]
    if not sampled and kind == SAMPLED:
        return [f"--loss sampled needs a sampled cache, but {flag} {cache} holds top-k "
                "log-probs: use --loss forward, or `kdpipe cache-teacher --cache-mode sampled`"]
    return []


def as_paths(value: str | Path | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """A cache option as a tuple of paths: one path (a string), None (none) or a sequence."""
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        return (str(value),)
    return tuple(str(v) for v in value)


def cache_list_problems(caches: tuple[str, ...], eval_caches: tuple[str, ...],
                        loss: LossConfig) -> list[str]:
    """Checks of the teacher caches as a list: at least one, each a folder, one --eval-cache
    and one --teacher-weight per --cache when given, and one kind of cache (top-k or sampled:
    one --loss serves every teacher). That the caches hold the same sequences is checked when
    they are opened (`trainer/teachers.py`)."""
    if not caches:
        return ["give --cache PATH (one per teacher)"]
    found = [p for cache in caches for p in options.path_problems("--cache", cache, "dir")]
    found += [p for cache in eval_caches
              for p in options.path_problems("--eval-cache", cache, "dir")]
    if eval_caches and len(eval_caches) != len(caches):
        found.append(f"give one --eval-cache per --cache, in the same order: {len(caches)} "
                     f"--cache but {len(eval_caches)} --eval-cache")
    weights = loss.teacher_weights
    if weights and len(weights) != len(caches):
        found.append(f"give one --teacher-weight per --cache, in the same order: "
                     f"{len(caches)} --cache but {len(weights)} --teacher-weight")
    elif weights and all(w == 0 for w in weights):  # a negative one is its own problem
        found.append("--teacher-weight: the weights are all 0; give at least one above 0")
    if mixed_cache_modes(caches + eval_caches):
        modes = {f"{flag} {cache}": m.cache_mode == "sampled"
                 for flag, group in (("--cache", caches), ("--eval-cache", eval_caches))
                 for cache in group if (m := _cache_manifest(cache)) is not None}
        sampled = next(name for name, is_sampled in modes.items() if is_sampled)
        topk = next(name for name, is_sampled in modes.items() if not is_sampled)
        found.append(f"{sampled} is sampled (--cache-mode sampled) but {topk} holds top-k "
                     "log-probs: one --loss serves every teacher and held-out cache, so cache "
                     "them all with the same --cache-mode (`kdpipe cache-teacher`)")
    return found


def mixed_cache_modes(caches: tuple[str, ...]) -> bool:
    """Whether the readable manifests of `caches` mix sampled and top-k caches (no --loss then
    suits them all, so the per-cache --loss advice is left out)."""
    return len({m.cache_mode == "sampled" for cache in caches
                if (m := _cache_manifest(cache)) is not None}) > 1


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `kdpipe train-student`; `kdpipe train-student --help` shows them."""

    cache: tuple[str, ...] = option(
        help="Teacher cache folder (from `kdpipe cache-teacher`). Repeat it, one per teacher, "
        "to distil several teachers at once: the caches must hold the same sequences "
        "(docs/training.md, \"Several teachers\").")
    out: str = option(help="Run folder: config, metrics, checkpoints, final/.")
    student: str | None = option(
        None, "Student to train: local folder or hub name of any causal LM.")
    student_config: str | None = option(
        None, "JSON model config with `model_type` (e.g. llama): train a student from scratch "
        "(vocab_size defaults to the teacher's head width).")
    tokenizer: str | None = option(
        None, "Tokenizer path/name; default: the student's own, else the cache's. Must map "
        "every cached id to the same token as the cache's tokenizer.")
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval_cache: tuple[str, ...] = option(
        (), "Held-out cache (same tokenizer) for periodic and final evaluation; with several "
        "--cache, one per --cache, in the same order.")
    eval_fraction: float = option(
        0.0, "Hold out this fraction of --cache, chosen by a hash of sample_id "
        "(deterministic, the same for every run).", ge=0, lt=1)
    eval_every: int = option(0, "Evaluate every N steps (0: only at the end).", ge=0)
    eval_max_samples: int | None = option(
        None, "At most this many held-out sequences per evaluation.", ge=1)
    loss: LossConfig = field(default_factory=LossConfig)
    lr: float = option(3e-4, "Peak learning rate, at most 1 (adafactor: the largest relative "
                       "step).", gt=0, le=1)
    optimizer: str = option("adamw", "adamw, adamw-8bit (bitsandbytes: pip install "
                            "'kdpipe[bnb]'), adafactor (torch's) or sgd.", choices=OPTIMIZERS)
    weight_decay: float = option(0.1, "Weight decay (matrices only).", ge=0)
    adam_beta1: float = option(0.9, "AdamW β1 (adamw, adamw-8bit).", ge=0, lt=1)
    adam_beta2: float = option(0.95, "AdamW β2 (adamw, adamw-8bit).", ge=0, lt=1)
    momentum: float = option(0.0, "SGD momentum (--optimizer sgd; 0: none).", ge=0, lt=1)
    warmup_steps: int = option(0, "Linear warmup steps.", ge=0)
    scheduler: str = option("cosine", "LR schedule after warmup: cosine, linear, constant, "
                            "constant_with_warmup.", choices=SCHEDULERS)
    batch_size: int = option(8, "Sequences per micro-batch.", ge=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", ge=0)
    max_steps: int | None = option(
        None, "Optimizer steps to train (cycles epochs as needed).", ge=1)
    epochs: int | None = option(
        None, "Epochs to train (default 1 when --max-steps is not given).", ge=1)
    save_every: int = option(0, "Checkpoint every N steps (0: by time and at the end).", ge=0)
    save_every_minutes: float = option(
        30.0, "Also checkpoint every N minutes of training (0: off), so a job killed without "
        "warning loses at most that much. SIGINT/SIGTERM always save before exiting.", ge=0)
    keep_last: int = option(3, "Keep the newest N checkpoints (0: all).", ge=0)
    snapshots: bool = option(True, "Write per-sample loss/confidence snapshots after each "
                             "epoch.")
    keep_snapshots: int = option(
        5, "Keep the snapshots of the last N epochs (0: all). --curriculum-source snapshot "
        "keeps every epoch's, since its re-ranking reads them all.", ge=0)
    snapshot_every: int = option(
        0, "Also write a snapshot every N steps (0: only after each epoch).", ge=0)
    log_every: int = option(10, "Log train metrics every N steps.", ge=1)
    seed: int = option(0, "Seed of initialisation, data order and dropout.")
    device: str = option("auto", DEVICE_HELP)
    threads: int = option(0, THREADS_HELP, ge=0)
    precision: str = option(
        "auto", "fp32, bf16-mixed (float32 weights, bfloat16 autocast), bf16-master (bfloat16 "
        "weights, float32 masters in the optimizer); auto: bf16-mixed on a GPU with bfloat16, "
        "else fp32. No float16: there is no loss scaling.", choices=PRECISIONS)
    attn_implementation: str | None = option(
        None, "Attention kernel: sdpa, flash_attention_2, eager (default: the model's own).",
        choices=ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = option(
        False, "Recompute each transformer block's activations in backward instead of keeping "
        "them (less memory, one more forward of the body per step).")
    compile: bool = option(False, "torch.compile the student's body (falls back to eager, with "
                           "a warning, where it fails).")
    shuffle_window: int = option(
        16, "Row groups (64 sequences each) shuffled together; larger = closer to a full "
        "shuffle, more memory.", ge=1)
    prefetch: int = option(4, "Batches decoded ahead in the background.", ge=1)
    read_ahead: int = option(
        READ_AHEAD_TARGETS, "Target tokens of upcoming samples the loader reads ahead, each row "
        "group they touch decoded once and only their rows kept (~k x 4 bytes a token, per "
        "--cache: J teachers hold J such copies): what keeps a curriculum's scattered order "
        "fast; same batches at any value.", ge=1)
    loader_workers: int = option(
        0, "Processes that read and decode the cache's row groups ahead of the loader (0: its "
        "one background thread). For a GPU at tens of thousands of tokens per step: 2-4.", ge=0)
    progress: bool = option(True, PROGRESS_HELP)
    verify_reads: bool = option(True, VERIFY_READS_HELP)
    local_cache: str | None = option(None, LOCAL_CACHE_HELP)
    resume: bool = option(False, "Continue the run in --out from its latest checkpoint "
                          "(exactly).")
    overwrite: bool = option(False, "Delete a previous run in --out and start over.")
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)
    dry_run: bool = option(
        False, "Print the memory plan of one process (parameters, trainable parameters, bytes "
        "of weights, gradients, optimizer state, activations and the KD head's chunks; tokens "
        "per step; steps) and exit. Reads the student's config and the cache's manifest only: "
        "no weights, no cache rows; trains nothing and writes nothing to --out. Plans for "
        "WORLD_SIZE processes (torchrun sets it). See docs/training.md.")
    fsdp: bool = option(
        False, "Under torchrun: shard parameters, gradients and optimizer state over the "
        "processes (FSDP2) instead of replicating the student (DDP). See docs/distributed.md.")
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    @classmethod
    def from_options(cls, **values: Any) -> TrainConfig:
        """A TrainConfig from flat option names, as on the command line (`lr=1e-3`,
        `temperature=2`, `pacing="root"`)."""
        return options.build(cls, values)

    def __post_init__(self) -> None:
        # `from_options(cache="PATH")` and Python callers give one cache as a string.
        object.__setattr__(self, "cache", as_paths(self.cache))
        object.__setattr__(self, "eval_cache", as_paths(self.eval_cache))

    def with_cache_defaults(self) -> TrainConfig:
        """This config with the defaults that follow from --cache filled in (the loss, from
        the first cache)."""
        if not self.cache:
            return self
        return replace(self, loss=with_cache_loss(self.loss, self.cache[0]))

    def problems(self) -> list[str]:
        """Checks across options (each option's own checks are declared with it)."""
        found = self.loss.problems() + self.curriculum.problems(self.loss.mode, self.snapshots,
                                                                len(self.cache))
        if (self.student is None) == (self.student_config is None):
            found.append("give exactly one of --student PATH and --student-config JSON")
        found += options.path_problems("--student-config", self.student_config, "file")
        found += self.adapter.problems(self.student, self.student_config)
        found += cache_list_problems(self.cache, self.eval_cache, self.loss)
        if is_url(self.out):
            found.append(f"--out {self.out}: a run folder is local (checkpoints are replaced in "
                         "place); give a local folder and copy final/ to the store afterwards")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            found.append(f"--out {self.out} is a file; give a folder for the run")
        loss = self.with_cache_defaults().loss  # every --eval-cache must suit it too
        if not mixed_cache_modes(self.cache + self.eval_cache):  # else no --loss would fix it
            if self.loss.mode == "kd" or self.eval_fraction > 0:  # evaluation reports KD too
                for cache in self.cache:
                    found += loss_cache_problems(loss, cache)
            for cache in self.eval_cache:
                found += loss_cache_problems(loss, cache, "--eval-cache")
        if self.eval_cache and self.eval_fraction > 0:
            found.append("give at most one of --eval-cache and --eval-fraction")
        if self.max_steps is not None and self.epochs is not None:
            found.append("give at most one of --max-steps and --epochs")
        from kdpipe.trainer.execution import attention_problems  # torch: not for --help
        from kdpipe.trainer.optimizers import optimizer_problems

        found += optimizer_problems(self.optimizer, self.momentum, self.fsdp)
        found += attention_problems(self.attn_implementation)
        if self.precision == "bf16-master" and self.fsdp:
            found.append("--precision bf16-master does not work with --fsdp (the float32 masters "
                         "would not be sharded); use --precision bf16-mixed")
        if self.precision == "bf16-master" and self.adapter.enabled:
            found.append("--precision bf16-master with LoRA/DoRA adapters is not supported "
                         "(adapter checkpoints would not hold the float32 masters); use "
                         "--precision bf16-mixed")
        if self.resume and self.overwrite:
            found.append("give at most one of --resume and --overwrite")
        return found

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, or return None."""
        options.raise_problems("train-student", options.field_problems(self) + self.problems())

    def to_json_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def changed_fields(self, other: TrainConfig) -> list[str]:
        """Option names whose values differ between two configs. --teacher-weight compares
        the normalised weights the run trains with, so equivalent values (0.5 0.5 and the
        default, 1 3 and 2 6) are no change and a run folder resumes whichever was given."""
        mine, theirs = options.flat_values(self), options.flat_values(other)
        return [name for name in mine if mine[name] != theirs[name]
                and not (name == "teacher_weight" and self._same_teacher_mix(other))]

    def _same_teacher_mix(self, other: TrainConfig) -> bool:
        teachers = len(as_paths(self.cache))
        if teachers != len(as_paths(other.cache)):
            return False
        try:
            mine, theirs = self.loss.teacher_mix(teachers), other.loss.teacher_mix(teachers)
        except ValueError:  # not one weight per cache, or all 0: compared as given
            return False
        return all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
                   for a, b in zip(mine, theirs, strict=True))


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    atomic_write_json(RunLayout(run_dir).config, cfg.to_json_dict())


def read_config(run_dir: Path) -> TrainConfig:
    """The config a run folder was created with (validated field by field). Run folders made
    before the loss and curriculum options nested hold them flat, or under a name since
    changed (RENAMED_FIELDS), or an option since replaced (REPLACED_FIELDS: --dtype float32
    is --precision fp32), and still read."""
    path = RunLayout(run_dir).config
    data = read_json(path)
    if isinstance(data, dict):
        data = {RENAMED_FIELDS.get(key, key): value for key, value in data.items()}
        for old, (new, values) in REPLACED_FIELDS.items():
            if old in data and new not in data:
                value = data.pop(old)
                data[new] = values.get(value, value)  # an unknown value fails validation
        if not isinstance(data.get("loss"), dict):
            data = options.nested(TrainConfig, data)
        for key in ("cache", "eval_cache"):  # one path or null, before several teachers
            if key in data and (data[key] is None or isinstance(data[key], str)):
                data[key] = [] if data[key] is None else [data[key]]
    return from_dict(TrainConfig, data, str(path))


@dataclass(frozen=True)
class EvalConfig:
    """Every option of `kdpipe evaluate`: a student, a cache and the loss settings."""

    student: str = option(help="Student folder or hub name (e.g. RUN/final), or a folder of "
                          "LoRA/DoRA adapters (evaluated merged into their base).")
    cache: tuple[str, ...] = option(
        help="Teacher cache folder to evaluate on; repeat it, one per teacher, for the KD to "
        "each (the caches must hold the same sequences, as for train-student).")
    base: str | None = option(
        None, "Base model of an adapter folder --student, where it is now (default: the one "
        "its adapter_base.json or adapter_config.json names).")
    tokenizer: str | None = option(
        None, "Tokenizer path/name; default: the student's own, else the cache's.")
    eval_fraction: float = option(
        0.0, "Evaluate only the held-out split train-student made with this --eval-fraction "
        "(0: the whole cache).", ge=0, lt=1)
    max_samples: int | None = option(None, "At most this many sequences.", ge=1)
    loss: LossConfig = field(default_factory=LossConfig)
    batch_size: int = option(8, "Sequences per batch.", ge=1)
    device: str = option("auto", DEVICE_HELP)
    threads: int = option(0, THREADS_HELP, ge=0)
    dtype: str = option("auto", "Autocast dtype: auto, float32, bfloat16, float16.",
                        choices=DTYPES)
    attn_implementation: str | None = option(
        None, "Attention kernel: sdpa, flash_attention_2, eager (default: the model's own).",
        choices=ATTN_IMPLEMENTATIONS)
    prefetch: int = option(4, "Batches decoded ahead in the background.", ge=1)
    read_ahead: int = option(
        READ_AHEAD_TARGETS, "Target tokens of upcoming samples the loader reads ahead, each row "
        "group they touch decoded once and only their rows kept (~k x 4 bytes a token, per "
        "--cache: J teachers hold J such copies): what keeps a curriculum's scattered order "
        "fast; same batches at any value.", ge=1)
    progress: bool = option(False, PROGRESS_HELP)
    verify_reads: bool = option(True, VERIFY_READS_HELP)
    local_cache: str | None = option(None, LOCAL_CACHE_HELP)
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)

    @classmethod
    def from_options(cls, **values: Any) -> EvalConfig:
        """An EvalConfig from flat option names, as on the command line."""
        return options.build(cls, values)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", as_paths(self.cache))  # one cache: a string

    def with_cache_defaults(self) -> EvalConfig:
        """This config with the defaults that follow from --cache filled in (the loss, from
        the first cache)."""
        if not self.cache:
            return self
        return replace(self, loss=with_cache_loss(self.loss, self.cache[0]))

    def validate(self) -> None:
        problems = self.loss.problems() + cache_list_problems(self.cache, (), self.loss)
        if not mixed_cache_modes(self.cache):  # else no --loss would fix it
            for cache in self.cache:
                problems += loss_cache_problems(self.loss, cache)
        from kdpipe.trainer.execution import attention_problems  # torch: not for --help
        problems += attention_problems(self.attn_implementation)
        if self.base is not None and not is_adapter_folder(self.student):
            problems.append(f"--base {self.base} is the base of an adapter folder, but "
                            f"--student {self.student} holds no adapter_config.json; drop "
                            "--base")
        options.raise_problems("evaluate", options.field_problems(self) + problems)
