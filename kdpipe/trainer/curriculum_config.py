"""`CurriculumConfig`: the curriculum and selective-reliance options of `train-student`, and the
one function that turns them into the trainer's plug-ins (sampler, λ per sample or token).

Nested in `TrainConfig` (its `curriculum` field): the options appear as train-student's flat
flags, a run folder's `config.json` records them and `--resume` refuses to change them.
docs/curriculum.md describes every option.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.options import option
from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.curriculum import check_matches_cache, read_curriculum
from kdpipe.schemas.shard import ROW_GROUP_SIZE, SAMPLE_ID
from kdpipe.schemas.storage import file_exists
from kdpipe.trainer.curriculum_sampler import ORDERS, SNAPSHOT_METRICS, CurriculumSampler, Ranking
from kdpipe.trainer.pacing import PACINGS, Pacing

if TYPE_CHECKING:
    from kdpipe.trainer.reliance import LambdaFn, TokenReliance
    from kdpipe.trainer.teacher_reliance import TeacherReliance

log = logging.getLogger(__name__)

# The choices live here, not beside the torch code that implements them, so that the commands'
# --help builds without importing torch.
RELIANCE_MODES = ("constant", "threshold", "linear", "token")
RELIANCE_CONTROLS = ("none", "shuffled")
KD_WEIGHT_SCHEDULES = ("none", "linear", "matched")
TEACHER_RELIANCE_MODES = ("fixed", "softmax", "best")
TEACHER_RELIANCE_LEVELS = ("sample", "token")
TEACHER_RELIANCE_CONTROLS = ("none", "shuffled", "matched")

CURRICULUM_SOURCES = ("file", "snapshot")
DEFAULT_BUCKETS = 10  # baby-steps buckets when neither --pacing-buckets nor a file gives them
# Rows of each decoded row group a curriculum's loader should use: ~11 kept it 20x ahead of a
# 1.3M student on one CPU thread (docs/benchmarks.md, "Curriculum order at scale").
USED_ROWS = 16


@dataclass(frozen=True)
class CurriculumConfig:
    """Every curriculum / selective-reliance option of train-student, with its default."""

    file: str | None = option(
        None, "Curriculum index from `kdpipe build-curriculum` (same cache): present samples "
        "easy → hard. See docs/curriculum.md.", flag="curriculum")
    source: str = option(
        "file", "file: the --curriculum ranking throughout; snapshot: re-rank after every "
        "epoch from that epoch's per-sample training losses (epoch 0: --curriculum, else "
        "shuffled).", flag="curriculum_source", choices=CURRICULUM_SOURCES)
    metric: str = option("nll", "What snapshot re-ranking sorts by: nll (loss) or confidence.",
                         flag="curriculum_metric", choices=SNAPSHOT_METRICS)
    pacing: str = option(
        "linear", "Share of the easiest data available at step t: linear, root, exp, step, "
        "baby-steps, or none (every sample once per epoch, in ranked order).",
        choices=PACINGS)
    pacing_start: float = option(0.2, "b: starting share of the data.", gt=0, le=1)
    pacing_full: float = option(0.8, "a: share of training after which all data is "
                                "available.", gt=0, le=1)
    pacing_increase: float = option(2.0, "inc: growth factor per step of --pacing exp.", gt=1)
    pacing_step_length: int | None = option(
        None, "Steps per stage of exp, step and baby-steps (default: all data at a·T).", ge=1)
    pacing_buckets: int | None = option(
        None, "Difficulty buckets of baby-steps (default: the curriculum's, else 10).", ge=1)
    order: str = option("curriculum", "curriculum (easy → hard); controls: anti (hard → easy), "
                        "random (shuffled).", choices=ORDERS)
    reliance: str = option(
        "constant", "λ per sample: constant (--kd-weight), threshold, linear (from the "
        "difficulty percentile), token (from the teacher's per-token uncertainty 1 - p_T(y)).",
        choices=RELIANCE_MODES)
    kd_weight_low: float = option(0.1, "λ_lo of selective reliance.", ge=0, le=1)
    kd_weight_high: float = option(0.9, "λ_hi of selective reliance.", ge=0, le=1)
    reliance_quantile: float = option(
        0.5, "q of --reliance threshold: λ_hi above this percentile, λ_lo below.", ge=0, le=1)
    reliance_control: str = option(
        "none", "none, or shuffled: the same λ values given to random samples (token: each "
        "sample's λ given to random targets of that sample).",
        choices=RELIANCE_CONTROLS)
    kd_weight_schedule: str = option(
        "none", "Control: none; linear (λ_lo → λ_hi over steps, all samples alike); matched "
        "(each step's mean selective λ for all its samples).", choices=KD_WEIGHT_SCHEDULES)
    teacher_reliance: str = option(
        "fixed", "Weight of each teacher (several --cache): fixed (--teacher-weight); softmax "
        "(--teacher-weight times exp(-NLL/T), normalised over teachers); best (all on the "
        "teacher of least NLL).", choices=TEACHER_RELIANCE_MODES)
    teacher_reliance_level: str = option(
        "sample", "What NLL softmax and best compare: sample (each teacher's mean NLL of the "
        "sample, teacher_nll) or token (-target_logprob of each token).",
        choices=TEACHER_RELIANCE_LEVELS)
    teacher_reliance_temperature: float = option(
        1.0, "T of --teacher-reliance softmax (nats): lower leans harder on the most "
        "confident teacher.", gt=0)
    teacher_reliance_control: str = option(
        "none", "Control: none; shuffled (the same teacher weights given to random samples or "
        "tokens); matched (each step's mean teacher weights for all its samples or tokens).",
        choices=TEACHER_RELIANCE_CONTROLS)

    @property
    def active(self) -> bool:
        """Whether samples are ordered by difficulty at all."""
        return self.file is not None or self.source == "snapshot"

    def pacing_for(self, buckets: int) -> Pacing:
        return Pacing(self.pacing, self.pacing_start, self.pacing_full, self.pacing_increase,
                      self.pacing_step_length,
                      buckets if self.pacing_buckets is None else self.pacing_buckets)

    def problems(self, mode: str, snapshots: bool, teachers: int = 1) -> list[str]:
        """Checks across options (TrainConfig.validate reports them with the rest);
        `teachers`: the number of --cache given."""
        found = []
        if self.file is not None and not file_exists(self.file, "--curriculum"):
            found.append(f"--curriculum {self.file}: no such file (make one with `kdpipe "
                         "build-curriculum`)")
        default = CurriculumConfig()
        if not self.active:
            changed = [flag for flag, mine, theirs in (
                ("--pacing", self.pacing, default.pacing), ("--order", self.order, default.order),
                ("--curriculum-metric", self.metric, default.metric))
                if mine != theirs]
            if changed:
                found.append(f"{', '.join(changed)} {'need' if len(changed) > 1 else 'needs'} "
                             "--curriculum FILE or "
                             "--curriculum-source snapshot")
        if self.source == "snapshot" and not snapshots:
            found.append("--curriculum-source snapshot re-ranks from the per-sample snapshots; "
                         "do not pass --no-snapshots")
        return found + self._reliance_problems(mode) + self._teacher_problems(mode, teachers)

    def _reliance_problems(self, mode: str) -> list[str]:
        found = []
        selective = self.reliance in ("threshold", "linear", "token")
        if self.reliance in ("threshold", "linear") and not self.active:
            found.append(f"--reliance {self.reliance} maps the difficulty percentile to λ; give "
                         "--curriculum FILE or --curriculum-source snapshot")
        if self.reliance_control == "shuffled" and not selective:
            found.append("--reliance-control shuffled needs --reliance threshold, linear or "
                         "token")
        if self.kd_weight_schedule == "linear" and self.reliance != "constant":
            found.append("--kd-weight-schedule linear gives all samples the same λ; use it with "
                         "--reliance constant")
        if self.kd_weight_schedule == "matched" and not selective:
            found.append("--kd-weight-schedule matched averages selective λ values; use it with "
                         "--reliance threshold, linear or token")
        if self.kd_weight_schedule != "none" and self.reliance_control != "none":
            found.append("give at most one control: --reliance-control or --kd-weight-schedule")
        if mode == "ce" and (self.reliance != "constant" or self.kd_weight_schedule != "none"):
            found.append("--reliance and --kd-weight-schedule need --mode kd (λ weighs the KD "
                         "term)")
        return found

    def _teacher_problems(self, mode: str, teachers: int) -> list[str]:
        found = []
        default = CurriculumConfig()
        chosen = f"--teacher-reliance {self.teacher_reliance}"
        if self.teacher_reliance == "fixed":
            changed = [flag for flag, mine, theirs in (
                ("--teacher-reliance-level", self.teacher_reliance_level,
                 default.teacher_reliance_level),
                ("--teacher-reliance-control", self.teacher_reliance_control,
                 default.teacher_reliance_control)) if mine != theirs]
            if changed:
                found.append(f"{', '.join(changed)} {'need' if len(changed) > 1 else 'needs'} "
                             "--teacher-reliance softmax or best")
        elif teachers < 2:
            found.append(f"{chosen} chooses between teachers: give one --cache per teacher, "
                         "two or more")
        if (self.teacher_reliance != "softmax"
                and self.teacher_reliance_temperature != default.teacher_reliance_temperature):
            found.append("--teacher-reliance-temperature is the T of --teacher-reliance softmax")
        if mode == "ce" and self.teacher_reliance != "fixed":
            found.append(f"{chosen} weighs the teachers' KD terms; it needs --mode kd")
        return found


def check_curriculum_file(cl: CurriculumConfig, cache_dir: str | Path,
                          verify_reads: bool = True, local_cache: str | None = None) -> None:
    """Refuse a --curriculum made for another cache before the run folder is created."""
    if cl.file is None:
        return
    cache = open_cache(cache_dir, verify_reads=verify_reads, local_cache=local_cache)
    cache_ids = cache.read_column(SAMPLE_ID).to_numpy().astype(np.int64)
    check_matches_cache(read_curriculum(cl.file), f"--curriculum {cl.file}", cache_dir,
                        cache.manifest.settings_fingerprint, cache_ids, cache_ids[:0])


@dataclass
class CurriculumPlugins:
    """What `setup_curriculum` hands the trainer; None leaves the trainer's default."""

    sampler: CurriculumSampler | None
    per_sample: LambdaFn | None  # λ by sample: a schedule, or selective reliance
    per_token: TokenReliance | None  # λ by token: token-level reliance


def setup_curriculum(cl: CurriculumConfig, cache: Cache, cache_ids: np.ndarray,
                     train_ids: np.ndarray, *, seed: int, per_step: int, total_steps: int,
                     kd_weight: float, run_dir: str | Path, loader_groups: int | None = None,
                     read_ahead: int | None = None,
                     sum_across: Callable[[list[float]], list[float]] | None = None
                     ) -> CurriculumPlugins:
    """Load and check the curriculum, build the sampler and the λ functions.

    cache_ids: (n,) every sample id of the cache; train_ids: the training split; total_steps:
    the run's (the pacing functions need it before training starts). loader_groups and
    read_ahead: the loader's row-group cache (--shuffle-window) and read-ahead (--read-ahead),
    to warn when a curriculum's scattered order will still cost many decodes per sample.
    """
    initial, buckets = None, DEFAULT_BUCKETS
    fingerprint = cache.manifest.settings_fingerprint
    if cl.file is not None:
        curriculum = read_curriculum(cl.file)
        check_matches_cache(curriculum, f"--curriculum {cl.file}", cache.location, fingerprint,
                            cache_ids, train_ids)
        where = np.searchsorted(curriculum.sample_ids, np.asarray(train_ids, dtype=np.int64))
        initial = Ranking.from_scores(train_ids, curriculum.score[where])
        buckets = curriculum.info.num_buckets
        log.info("curriculum %s (%s/%s): %d training samples ranked", cl.file,
                 curriculum.info.source, curriculum.info.metric, len(initial))
    sampler = None
    if cl.active:
        _warn_about_random_access(cache, loader_groups, read_ahead)
        sampler = CurriculumSampler(
            train_ids, cl.pacing_for(buckets), per_step, total_steps, seed, initial, cl.order,
            snapshot_run=run_dir if cl.source == "snapshot" else None,
            snapshot_metric=cl.metric, cache_fingerprint=fingerprint)
    from kdpipe.trainer.reliance import (
        RelianceMapping,
        SampleReliance,
        ScheduledLambda,
        TokenReliance,
    )

    mapping = RelianceMapping(cl.reliance, cl.kd_weight_low, cl.kd_weight_high,
                              cl.reliance_quantile, kd_weight)
    per_sample: LambdaFn | None = None
    per_token = None
    if cl.kd_weight_schedule == "linear":
        per_sample = ScheduledLambda(cl.kd_weight_low, cl.kd_weight_high, total_steps)
    elif cl.reliance in ("threshold", "linear"):
        assert sampler is not None  # validated: these modes need a curriculum
        per_sample = SampleReliance(mapping, sampler, train_ids, seed, cl.reliance_control,
                                    cl.kd_weight_schedule)
    elif cl.reliance == "token":
        per_token = TokenReliance(mapping, seed, cl.reliance_control, cl.kd_weight_schedule,
                                  sum_across)
    return CurriculumPlugins(sampler, per_sample, per_token)


def setup_teacher_reliance(cl: CurriculumConfig, caches: Sequence[Cache], train_ids: np.ndarray,
                           prior: Sequence[float], *, seed: int,
                           sum_across: Callable[[list[float]], list[float]] | None = None
                           ) -> TeacherReliance:
    """The per-sample or per-token teacher weights of the --teacher-reliance options.

    caches: one per teacher, --cache order; prior: (J,) the --teacher-weight values (empty:
    equal); sum_across: sums floats over processes (the token level's step means). Reads each
    cache's teacher_nll column when the level is `sample` and the mode is not fixed.
    """
    from kdpipe.trainer.teacher_reliance import TeacherReliance, read_sample_nll

    selective = cl.teacher_reliance != "fixed"
    sample_nll = (read_sample_nll(caches)
                  if selective and cl.teacher_reliance_level == "sample" else None)
    return TeacherReliance(
        cl.teacher_reliance, cl.teacher_reliance_level, cl.teacher_reliance_temperature,
        tuple(prior) or (1.0,) * len(caches), control=cl.teacher_reliance_control,
        train_ids=train_ids, seed=seed, sample_nll=sample_nll, sum_across=sum_across,
        names=[str(c.location) for c in caches])


def _warn_about_random_access(cache: Cache, loader_groups: int | None,
                              read_ahead: int | None) -> None:
    """A difficulty order visits row groups at random. The loader decodes each row group a
    horizon of `read_ahead` target tokens touches once, so of the 64 rows it decodes it uses
    about (rows per horizon) / (row groups); warn when that is under `USED_ROWS`
    (docs/curriculum.md, "Cost: random access to the cache")."""
    manifest = cache.manifest
    groups = manifest.num_row_groups
    if loader_groups is None or read_ahead is None or loader_groups >= groups:
        return
    per_row = manifest.num_targets / max(manifest.num_sequences, 1)  # target tokens
    used = read_ahead / per_row / groups
    if used >= USED_ROWS:
        return
    wanted = math.ceil(USED_ROWS * groups * per_row)
    log.warning("a curriculum reads the cache's %d row groups in difficulty order: with "
                "--read-ahead %d the loader uses only ~%.1f rows of each %d-row group it "
                "decodes, and may load slower than training. --read-ahead %d (~%.2f GiB) "
                "would use %d.", groups, read_ahead, used, ROW_GROUP_SIZE, wanted,
                wanted * manifest.decoded_bytes / max(manifest.num_targets, 1) / 2**30,
                USED_ROWS)
