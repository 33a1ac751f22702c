"""`kdpipe build-curriculum`: rank a cache's samples by difficulty and write a curriculum index.

Difficulty scores (per sample, higher = harder; docs/curriculum.md):

* teacher: from the cache's per-sequence columns, no model loaded: `nll` = mean -log p_T(y_t)
  (teacher_nll), `entropy` = mean teacher entropy, `confidence` = 1 - mean p_T(y_t);
* student: one scoring pass of a student checkpoint (`student_scoring.py`): `nll`,
  `confidence` (1 - mean p_S(y_t)), `entropy`;
* snapshot: the per-sample losses a training run recorded (RUN/snapshots/): `nll` (mean
  loss), `confidence` (1 - mean confidence) over the chosen epochs; with two or more epochs
  also the data-map statistics of Swayamdipta et al. (2020): mean confidence and variability
  (standard deviation of the confidence across epochs), and `variability` as a metric;
* length: number of target tokens (a baseline every curriculum should beat).

Scores become rank / percentile / bucket by `schemas.curriculum.rank_scores`. Re-running the
same command finds the finished file and does nothing; other settings need --overwrite.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.schemas import shard as cols
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.curriculum import (
    Curriculum,
    is_curriculum_file,
    make_curriculum,
    read_curriculum,
    write_curriculum,
)
from kdpipe.schemas.errors import CacheFormatError, ConfigError, KdpipeError
from kdpipe.schemas.fingerprint import files_fingerprint
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.storage import file_exists

log = logging.getLogger(__name__)

MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin")


def teacher_scores(cache: Cache, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) from the cached per-sequence teacher statistics; no model is loaded."""
    column = {"nll": cols.TEACHER_NLL, "entropy": cols.TEACHER_ENTROPY,
              "confidence": cols.TEACHER_CONFIDENCE}[metric]
    ids = cache.read_column(cols.SAMPLE_ID).to_numpy().astype(np.int64)
    values = cache.read_column(column).to_numpy().astype(np.float64)
    if not np.isfinite(values).all():
        bad = int(ids[np.flatnonzero(~np.isfinite(values))[0]])
        raise CacheFormatError(f"{cache.location}: {column} of sample {bad} is not finite; the "
                               "cache is faulty (`kdpipe verify` lists it): re-create it")
    return ids, (1.0 - values if metric == "confidence" else values)


def length_scores(cache: Cache) -> tuple[np.ndarray, np.ndarray]:
    """(ids, target tokens): longer = harder, the baseline a curriculum has to beat."""
    ids = cache.read_column(cols.SAMPLE_ID).to_numpy().astype(np.int64)
    lengths = cache.read_column(cols.NUM_TARGETS).to_numpy().astype(np.float64)
    if lengths.size and np.all(lengths == lengths[0]):
        log.warning("every sample of %s has %d targets (packed cache?); the length curriculum "
                    "is the sample-id order", cache.location, int(lengths[0]))
    return ids, lengths


@dataclass(frozen=True)
class SnapshotScores:
    sample_ids: np.ndarray  # (n,) samples recorded in every chosen epoch
    scores: np.ndarray  # (n,)
    mean_confidence: np.ndarray | None  # (n,) with >= 2 epochs
    variability: np.ndarray | None  # (n,) with >= 2 epochs
    epochs: tuple[int, ...]
    files: tuple[Path, ...]


def snapshot_scores(cache: Cache, run: str | Path, epochs: tuple[int, ...], metric: str
                    ) -> SnapshotScores:
    """Scores from the end-of-epoch snapshots of a run (its per-sample training losses)."""
    finished = {e: p for e, step, p in snap.list_snapshots(run) if step is None}
    if not finished:
        raise FileNotFoundError(f"--run {run}: no end-of-epoch snapshots in "
                                f"{RunLayout(Path(run)).snapshots}; train with snapshots on "
                                "for at least one epoch")
    chosen = epochs or (max(finished),)
    missing = [e for e in chosen if e not in finished]
    if missing:
        raise ConfigError(f"--epoch {missing}: no end-of-epoch snapshot in {run} (finished "
                          f"epochs: {sorted(finished)})")
    loss, conf, ids = [], [], None
    for epoch in chosen:
        table, info = snap.read_snapshot(finished[epoch])
        if info.cache_fingerprint != cache.manifest.settings_fingerprint:
            raise ConfigError(f"--run {run}: snapshot {finished[epoch].name} was made on "
                              f"another cache than --cache {cache.location}")
        found = np.asarray(table.column(snap.SAMPLE_ID), dtype=np.int64)
        ids = found if ids is None else np.intersect1d(ids, found)
        loss.append(dict(zip(found.tolist(), np.asarray(table.column(snap.LOSS)).tolist(),
                             strict=True)))
        conf.append(dict(zip(found.tolist(),
                             np.asarray(table.column(snap.CONFIDENCE)).tolist(), strict=True)))
    assert ids is not None
    if len(chosen) > 1:
        union = set().union(*(d.keys() for d in loss))
        if len(union) > ids.size:
            log.warning("%d samples are not in every chosen epoch and are left out",
                        len(union) - ids.size)
    losses = np.array([[d[i] for i in ids.tolist()] for d in loss], dtype=np.float64)  # (E, n)
    confidence = np.array([[d[i] for i in ids.tolist()] for d in conf], dtype=np.float64)
    mean_conf = confidence.mean(axis=0)
    variability = confidence.std(axis=0)  # population std over epochs, as in data maps
    scores = {"nll": losses.mean(axis=0), "confidence": 1.0 - mean_conf,
              "variability": variability}[metric]
    several = len(chosen) > 1
    return SnapshotScores(ids, scores, mean_conf if several else None,
                          variability if several else None, tuple(chosen),
                          tuple(finished[e] for e in chosen))


def _settings(cfg: BuildCurriculumConfig) -> dict[str, str]:
    """Provenance recorded in the file; equal settings mean the file need not be rebuilt."""
    settings = {"source": cfg.source, "metric": cfg.resolved_metric, "buckets": str(cfg.buckets)}
    if cfg.source == "student":
        assert cfg.student is not None
        settings["student"] = cfg.student
        folder = Path(cfg.student)
        files = [p for pattern in MODEL_FILE_PATTERNS for p in folder.glob(pattern)]
        settings["student_fingerprint"] = files_fingerprint(files, folder) if files else ""
    if cfg.source == "snapshot":
        assert cfg.run is not None
        settings["run"] = str(cfg.run)
    return settings


def _previous(cfg: BuildCurriculumConfig, settings: dict[str, str], fingerprint: str
              ) -> Curriculum | None:
    """The finished identical curriculum at --out, or None; refuses to replace another."""
    out = cfg.out
    if cfg.overwrite or not file_exists(out, "--out"):
        return None
    if not is_curriculum_file(out, "--out"):
        raise ConfigError(f"--out {out} exists and is not a curriculum; choose another name "
                          "or pass --overwrite")
    try:
        existing = read_curriculum(out)
    except KdpipeError as exc:
        raise ConfigError(f"--out {out}: unreadable curriculum ({exc}); pass --overwrite"
                          ) from exc
    info = existing.info
    if info.settings == settings and info.cache_fingerprint == fingerprint:
        return existing
    raise ConfigError(f"--out {out} holds a curriculum built with other settings "
                      f"({info.source}/{info.metric}); pass --overwrite to replace it")


def build_curriculum(cfg: BuildCurriculumConfig) -> Curriculum:
    """Score, rank and write the curriculum; returns it (also when it already existed)."""
    cfg.validate()
    cache = open_cache(cfg.cache, verify_reads=cfg.verify_reads, local_cache=cfg.local_cache)
    fingerprint = cache.manifest.settings_fingerprint
    settings = _settings(cfg)
    metric = cfg.resolved_metric
    mean_conf = variability = None
    if cfg.source == "snapshot":
        assert cfg.run is not None
        found = snapshot_scores(cache, cfg.run, cfg.epochs, metric)
        digest = hashlib.sha256("".join(sha256_file(p) for p in found.files).encode())
        settings["epochs"] = ",".join(str(e) for e in found.epochs)
        settings["snapshots_sha256"] = digest.hexdigest()
    previous = _previous(cfg, settings, fingerprint)
    if previous is not None:
        log.info("%s already holds this curriculum; nothing to do", cfg.out)
        return previous
    if cfg.source == "teacher":
        ids, scores = teacher_scores(cache, metric)
    elif cfg.source == "length":
        ids, scores = length_scores(cache)
    elif cfg.source == "student":
        from kdpipe.curriculum.student_scoring import score_student

        assert cfg.student is not None
        result = score_student(cache, cfg.student, cfg.tokenizer, cfg.batch_size, cfg.device,
                               cfg.dtype, cfg.chunk_size, cfg.progress, cfg.trust_remote_code)
        ids = result.sample_ids
        scores = {"nll": result.nll, "confidence": 1.0 - result.confidence,
                  "entropy": result.entropy}[metric]
    else:
        ids, scores = found.sample_ids, found.scores
        mean_conf, variability = found.mean_confidence, found.variability
    cache_ids = cache.read_column(cols.SAMPLE_ID).to_numpy().astype(np.int64)
    curriculum = make_curriculum(ids, scores, source=cfg.source, metric=metric,
                                 cache_fingerprint=fingerprint, cache_sample_ids=cache_ids,
                                 num_buckets=cfg.buckets, settings=settings,
                                 mean_confidence=mean_conf, variability=variability)
    write_curriculum(cfg.out, curriculum)
    log.info("wrote %s: %d samples ranked by %s/%s", cfg.out, curriculum.sample_ids.size,
             cfg.source, metric)
    return curriculum
