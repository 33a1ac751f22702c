"""The curriculum index: one Parquet file ranking a cache's samples from easy to hard.

Written by `kdpipe build-curriculum`, read by `kdpipe train-student --curriculum` and
`kdpipe inspect`. One row per sample: its difficulty `score` (higher = harder, whatever the
source), its `rank` (0 = easiest; ties broken by sample id), its `percentile`
u = rank / (n - 1) in [0, 1] and its `bucket` floor(rank * B / n) of B equal-size buckets.
`mean_confidence` and `variability` hold data-map statistics when the curriculum was built
from several epochs of snapshots, null otherwise.

The file-level metadata (`CurriculumInfo`, JSON under one Parquet metadata key) ties the index
to its cache: the cache's settings fingerprint and a hash of the cache's sample ids. A trainer
refuses a curriculum whose fingerprints do not match the cache it trains on.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import __version__
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.io import atomic_path
from kdpipe.schemas.records import from_dict, to_dict
from kdpipe.schemas.storage import file_location, is_url, local_copy, upload

CURRICULUM_SCHEMA_VERSION = 1
INFO_KEY = b"kdpipe.curriculum"  # Parquet metadata key holding CurriculumInfo as JSON

SOURCES = ("teacher", "student", "snapshot", "length")
METRICS = {  # metrics each source can rank by; the first is the default
    "teacher": ("nll", "entropy", "confidence"),
    "student": ("nll", "confidence", "entropy"),
    "snapshot": ("nll", "confidence", "variability"),
    "length": ("tokens",),
}

# Column names.
SAMPLE_ID = "sample_id"
SCORE = "score"
RANK = "rank"
PERCENTILE = "percentile"
BUCKET = "bucket"
MEAN_CONFIDENCE = "mean_confidence"
VARIABILITY = "variability"

CURRICULUM_SCHEMA = pa.schema([
    pa.field(SAMPLE_ID, pa.int64(), nullable=False),
    pa.field(SCORE, pa.float64(), nullable=False),
    pa.field(RANK, pa.int64(), nullable=False),
    pa.field(PERCENTILE, pa.float64(), nullable=False),
    pa.field(BUCKET, pa.int32(), nullable=False),
    pa.field(MEAN_CONFIDENCE, pa.float32(), nullable=True),
    pa.field(VARIABILITY, pa.float32(), nullable=True),
])


@dataclass(frozen=True)
class CurriculumInfo:
    """Where a curriculum came from and which cache it ranks."""

    source: str  # one of SOURCES
    metric: str  # one of METRICS[source]
    cache_fingerprint: str  # the cache manifest's settings_fingerprint
    cache_sample_ids_sha256: str  # sample_ids_digest of every sample of the cache
    sample_ids_sha256: str  # sample_ids_digest of this file's rows
    num_samples: int
    num_buckets: int
    settings: dict[str, str] = field(default_factory=dict)  # provenance (student, epochs...)
    schema_version: int = CURRICULUM_SCHEMA_VERSION
    kdpipe_version: str = __version__


@dataclass(frozen=True, eq=False)
class Curriculum:
    """A curriculum in memory: per-sample arrays in file order (sorted by sample id)."""

    info: CurriculumInfo
    sample_ids: np.ndarray  # (n,) int64
    score: np.ndarray  # (n,) float64, higher = harder
    rank: np.ndarray  # (n,) int64, 0 = easiest
    percentile: np.ndarray  # (n,) float64 in [0, 1]
    bucket: np.ndarray  # (n,) int32
    mean_confidence: np.ndarray | None = None  # (n,) float32, data maps only
    variability: np.ndarray | None = None  # (n,) float32, data maps only

    def ordered_ids(self) -> np.ndarray:
        """(n,) sample ids from easiest to hardest."""
        out = np.empty_like(self.sample_ids)
        out[self.rank] = self.sample_ids
        return out

    def to_table(self) -> pa.Table:
        n = self.sample_ids.size
        extra = [pa.array(a, pa.float32()) if a is not None else pa.nulls(n, pa.float32())
                 for a in (self.mean_confidence, self.variability)]
        return pa.Table.from_arrays([
            pa.array(self.sample_ids, pa.int64()), pa.array(self.score, pa.float64()),
            pa.array(self.rank, pa.int64()), pa.array(self.percentile, pa.float64()),
            pa.array(self.bucket, pa.int32()), *extra], schema=CURRICULUM_SCHEMA)


def sample_ids_digest(sample_ids: np.ndarray) -> str:
    """sha256 of a set of sample ids (sorted, int64 little-endian): order-independent."""
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(ids.tobytes()).hexdigest()


def rank_scores(sample_ids: np.ndarray, scores: np.ndarray, num_buckets: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank, percentile, bucket) of each sample: ascending score, ties by sample id.

    rank r in 0..n-1 (0 = easiest), percentile u = r / (n - 1) (0 when n == 1), bucket
    floor(r * B / n): B buckets of equal size (±1), bucket 0 the easiest.
    """
    ids = np.asarray(sample_ids, dtype=np.int64)
    values = np.asarray(scores, dtype=np.float64)
    if ids.shape != values.shape or ids.ndim != 1:
        raise ValueError(f"sample_ids {ids.shape} and scores {values.shape} must be equal 1-D")
    if not np.all(np.isfinite(values)):
        bad = ids[~np.isfinite(values)][:5].tolist()
        raise ValueError(f"difficulty scores must be finite; samples {bad} are not")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    n = ids.size
    order = np.lexsort((ids, values))  # primary key: score, then sample id
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    percentile = rank / max(n - 1, 1)
    bucket = (rank * num_buckets // max(n, 1)).astype(np.int32)
    return rank, percentile.astype(np.float64), bucket


def make_curriculum(sample_ids: np.ndarray, scores: np.ndarray, *, source: str, metric: str,
                    cache_fingerprint: str, cache_sample_ids: np.ndarray, num_buckets: int,
                    settings: dict[str, str] | None = None,
                    mean_confidence: np.ndarray | None = None,
                    variability: np.ndarray | None = None) -> Curriculum:
    """Rank `scores` (higher = harder) and wrap them with their metadata, sorted by id."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    if np.unique(ids).size != ids.size:
        raise ValueError("sample ids of a curriculum must be unique")
    by_id = np.argsort(ids, kind="stable")
    ids, values = ids[by_id], np.asarray(scores, dtype=np.float64)[by_id]
    rank, percentile, bucket = rank_scores(ids, values, num_buckets)
    info = CurriculumInfo(
        source=source, metric=metric, cache_fingerprint=cache_fingerprint,
        cache_sample_ids_sha256=sample_ids_digest(cache_sample_ids),
        sample_ids_sha256=sample_ids_digest(ids), num_samples=int(ids.size),
        num_buckets=num_buckets, settings=dict(settings or {}))

    def pick(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.asarray(values, dtype=np.float32)[by_id]

    return Curriculum(info, ids, values, rank, percentile, bucket,
                      pick(mean_confidence), pick(variability))


def write_curriculum(path: str | Path, curriculum: Curriculum) -> None:
    """Write the index atomically (a crash never leaves a half-written curriculum); a URL
    gets the finished file, written once and read back (`storage.upload`)."""
    info = json.dumps(to_dict(curriculum.info), sort_keys=True, allow_nan=False)
    metadata = {INFO_KEY: info.encode()}
    table = curriculum.to_table().replace_schema_metadata(metadata)
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="kdpipe-curriculum-") as folder:
            local = Path(folder) / "curriculum.parquet"
            pq.write_table(table, local, compression="zstd")
            upload(local, str(path), "--out")
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def is_curriculum_file(path: str | Path, flag: str = "--curriculum") -> bool:
    """True for a Parquet file carrying curriculum metadata (whatever its version); a URL is
    read from a temporary copy."""
    if is_url(path):
        where = file_location(path, flag)
        if isinstance(where, Path) or not where[0].is_file(where[1]):
            return False
        path = local_copy(path, flag)
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return INFO_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowInvalid):
        return False


def read_curriculum(path: str | Path) -> Curriculum:
    """Read and validate a curriculum: version first, then schema, then the rows' invariants.
    A URL is read from a temporary copy (`storage.local_copy`)."""
    path = local_copy(path, "--curriculum")
    if not path.is_file():
        raise FileNotFoundError(f"curriculum {path} not found; make one with "
                                "`kdpipe build-curriculum --cache CACHE --out FILE`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CacheFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    raw = (table.schema.metadata or {}).get(INFO_KEY)
    if raw is None:
        raise CacheFormatError(f"{path}: no curriculum metadata; not a kdpipe curriculum "
                               "(make one with `kdpipe build-curriculum`)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CacheFormatError(f"{path}: curriculum metadata is not valid JSON") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != CURRICULUM_SCHEMA_VERSION:
        raise CacheFormatError(
            f"{path}: curriculum schema version {version!r} (kdpipe "
            f"{data.get('kdpipe_version', '?') if isinstance(data, dict) else '?'}); this kdpipe "
            f"reads version {CURRICULUM_SCHEMA_VERSION}: rebuild it with `kdpipe "
            "build-curriculum` or use a matching kdpipe")
    info = from_dict(CurriculumInfo, data, f"{path} metadata")
    if not table.schema.remove_metadata().equals(CURRICULUM_SCHEMA):
        raise CacheFormatError(f"{path}: columns {table.schema.remove_metadata()} do not match "
                               f"the curriculum schema {CURRICULUM_SCHEMA}")
    if info.source not in SOURCES or info.metric not in METRICS[info.source]:
        raise CacheFormatError(f"{path}: unknown source/metric {info.source}/{info.metric}")

    def column(name: str, dtype: type) -> np.ndarray:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=dtype)

    def optional(name: str) -> np.ndarray | None:
        col = table.column(name)
        return None if col.null_count == len(col) else column(name, np.float32)

    curriculum = Curriculum(info, column(SAMPLE_ID, np.int64), column(SCORE, np.float64),
                            column(RANK, np.int64), column(PERCENTILE, np.float64),
                            column(BUCKET, np.int32), optional(MEAN_CONFIDENCE),
                            optional(VARIABILITY))
    _check_rows(path, curriculum)
    return curriculum


def _check_rows(path: Path, c: Curriculum) -> None:
    n = c.sample_ids.size
    if n != c.info.num_samples or sample_ids_digest(c.sample_ids) != c.info.sample_ids_sha256:
        raise CacheFormatError(f"{path}: rows do not match the metadata's sample ids (edited "
                               "or truncated?); rebuild it with `kdpipe build-curriculum`")
    rank, percentile, bucket = rank_scores(c.sample_ids, c.score, c.info.num_buckets)
    if not (np.array_equal(rank, c.rank) and np.allclose(percentile, c.percentile)
            and np.array_equal(bucket, c.bucket)):
        raise CacheFormatError(f"{path}: rank/percentile/bucket columns do not follow the "
                               "scores; rebuild it with `kdpipe build-curriculum`")


def check_matches_cache(curriculum: Curriculum, flag: str, cache_dir: str | Path,
                        cache_fingerprint: str, cache_sample_ids: np.ndarray,
                        needed_ids: np.ndarray) -> None:
    """Refuse a curriculum made for another cache, or one that does not rank `needed_ids`."""
    info = curriculum.info
    if info.cache_fingerprint != cache_fingerprint:
        raise ConfigError(
            f"{flag}: made for a cache with settings fingerprint {info.cache_fingerprint[:12]}, "
            f"but {cache_dir} has {cache_fingerprint[:12]}; rebuild it with `kdpipe "
            f"build-curriculum --cache {cache_dir}`")
    if info.cache_sample_ids_sha256 != sample_ids_digest(cache_sample_ids):
        raise ConfigError(f"{flag}: made for a cache with other sample ids than {cache_dir}; "
                          f"rebuild it with `kdpipe build-curriculum --cache {cache_dir}`")
    missing = np.setdiff1d(np.asarray(needed_ids, dtype=np.int64), curriculum.sample_ids)
    if missing.size:
        raise ConfigError(
            f"{flag}: ranks {curriculum.sample_ids.size} samples but {missing.size} training "
            f"samples of {cache_dir} are not among them (e.g. {missing[:5].tolist()}); build "
            "it over the whole cache or the same training split")
