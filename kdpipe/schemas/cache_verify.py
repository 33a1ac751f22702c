"""What `kdpipe verify` checks: every field of a cache's manifest against the shards.

`verify_cache` reports every fault it finds, one line each naming the shard and the manifest
field that disagrees, instead of raising. Three passes:

* `manifest_problems`: fields that must agree with one another (the backend and its tail and
  entropy modes, shard names against sample ids and `shard_size`, tokenizer ids against
  `vocab_size`), without reading a shard;
* each shard file: present, `bytes` and `sha256` as recorded, the Parquet schema that
  `id_dtype`, `logprob_dtype`, `encoding`, `cache_mode` and `tail_temperatures` imply;
* `_ShardScan`: one pass over each shard's row groups: `rows`, `tokens`, `targets`,
  `first_sample_id`, `last_sample_id`, `tokens_sha256`, row groups of `ROW_GROUP_SIZE`,
  ids below `vocab_size`, list lengths against `top_k`, `tail_temperatures` and `samples`,
  sequence lengths against `max_length` and `layout`, and no value a cache never holds;
* `tokenizer_file_problems`: the files of the saved `tokenizer/` against `tokenizer.files`
  (whether they load and map ids as recorded needs transformers: `kdpipe.reports`).

Fields that describe provenance (teacher, corpus, versions) cannot be checked against the
shards; `settings_fingerprint` protects the settings among them (`CacheManifest.validate`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.schemas import shard as cols
from kdpipe.schemas.encoding import decode_sampled
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import (
    MANIFEST_NAME,
    TOKENIZER_DIR,
    CacheManifest,
    FileInfo,
    ShardInfo,
)
from kdpipe.schemas.shard import ROW_GROUP_SIZE, ShardLayout, check_shard_schema, shard_name

_SHARD_FAULT = re.compile(r"^(shard-\d+\.parquet): (.*)$", re.DOTALL)
BACKEND_MODES = {"hf": ("exact", "exact"), "vllm": ("uniform", "topk_lower_bound")}


def tokens_digest(sample_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> str:
    """sha256 of sample ids and token ids: identifies a shard's input independent of encoding.

    Per sequence, as int64: its sample id, its length, its token ids.
    """
    digest = hashlib.sha256()
    for sample_id, ids in zip(sample_ids, sequences, strict=True):
        digest.update(np.int64(sample_id).tobytes())
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _tokens_record(sample_ids: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> bytes:
    """The bytes `tokens_digest` hashes for one row group, built without a Python loop."""
    rows = sample_ids.size
    lengths = np.diff(offsets)
    record = np.empty(int(offsets[-1]) + 2 * rows, dtype=np.int64)
    heads = offsets[:-1] + 2 * np.arange(rows)  # where each sequence's (id, length) goes
    body = np.ones(record.size, dtype=bool)
    body[heads] = body[heads + 1] = False
    record[heads], record[heads + 1], record[body] = sample_ids, lengths, ids
    return record.tobytes()


def describe_files(folder: Path) -> tuple[FileInfo, ...]:
    """Name, size and sha256 of every file directly in `folder`, sorted by name (what
    `tokenizer.files` records of CACHE/tokenizer/)."""
    return tuple(FileInfo(path.name, path.stat().st_size, sha256_file(path))
                 for path in sorted(folder.iterdir()) if path.is_file())


def tokenizer_file_problems(root: Path, m: CacheManifest) -> list[str]:
    """Faults of CACHE/tokenizer/'s files against `tokenizer.files`: missing, another size or
    sha256, unlisted. Nothing to check when the manifest records no file (schema 3 and older).
    """
    if not m.tokenizer.files:
        return []
    folder = root / TOKENIZER_DIR
    where = f"{TOKENIZER_DIR}/"
    if not folder.is_dir():
        return [f"{where}: missing; it holds the tokenizer the token ids come from (restore "
                "the folder or re-create the cache)"]
    found = []
    for record in m.tokenizer.files:
        path = folder / record.file
        if not path.is_file():
            found.append(f"{where}{record.file}: missing")
        elif path.stat().st_size != record.bytes:
            found.append(f"{where}{record.file}: bytes: the file has {path.stat().st_size}, "
                         f"the manifest says {record.bytes}")
        elif sha256_file(path) != record.sha256:
            found.append(f"{where}{record.file}: sha256 differs from the manifest (corrupted "
                         "or modified)")
    listed = {record.file for record in m.tokenizer.files}
    found += [f"{where}{path.name}: file not listed in the manifest (tokenizer.files)"
              for path in sorted(folder.iterdir()) if path.name not in listed]
    return found


def manifest_problems(m: CacheManifest) -> list[str]:
    """Faults among the manifest's own fields (no shard is read)."""
    found = []
    if m.capture_temperature != 1.0:
        found.append(f"capture_temperature {m.capture_temperature}: cached log-probs are raw "
                     "(temperature 1.0)")
    if m.teacher.backend not in BACKEND_MODES:
        found.append(f"teacher.backend {m.teacher.backend!r} is not one of "
                     f"{', '.join(BACKEND_MODES)}")
    else:
        tail_mode, entropy_mode = BACKEND_MODES[m.teacher.backend]
        if m.tail_mode != tail_mode:
            found.append(f"tail_mode {m.tail_mode!r}: the {m.teacher.backend} backend (teacher."
                         f"backend) caches {tail_mode!r} tails")
        if m.entropy_mode != entropy_mode:
            found.append(f"entropy_mode {m.entropy_mode!r}: the {m.teacher.backend} backend "
                         f"(teacher.backend) computes {entropy_mode!r} entropies")
    if m.tail_mode == "uniform" and m.tail_temperatures:
        found.append("tail_temperatures: a cache with uniform tails stores none")
    if m.cache_mode == "topk" and (m.samples or m.sample_seed):
        found.append(f"samples {m.samples}, sample_seed {m.sample_seed}: a top-k cache draws "
                     "no samples (both are 0)")
    if m.cache_mode == "sampled" and m.encoding != "plain":
        found.append(f"encoding {m.encoding!r}: a sampled cache has no top-k columns to encode")
    if m.max_length < 2:
        found.append(f"max_length {m.max_length}: a sequence has at least 2 tokens")
    if m.id_dtype == "uint16" and m.vocab_size > 1 << 16:
        found.append(f"vocab_size {m.vocab_size} does not fit id_dtype uint16")
    if m.tokenizer.size > m.vocab_size:
        found.append(f"tokenizer.size {m.tokenizer.size} exceeds vocab_size {m.vocab_size}")
    for role in ("bos", "eos", "pad"):
        token_id = getattr(m.tokenizer, f"{role}_token_id")
        if token_id is not None and not 0 <= token_id < m.vocab_size:
            found.append(f"tokenizer.{role}_token_id {token_id} is outside the vocabulary "
                         f"(vocab_size {m.vocab_size})")
    return found + _shard_list_problems(m)


def _shard_list_problems(m: CacheManifest) -> list[str]:
    """Shard i holds sample ids [i * shard_size, (i + 1) * shard_size), named shard_name(i);
    a complete cache has them all, every one full but the last."""
    found = []
    for s in m.shards:
        masked = m.shard_layout.has_target_mask
        if s.targets != s.tokens - s.rows and (not masked
                                               or not 0 < s.targets <= s.tokens - s.rows):
            found.append(f"{s.file}: targets {s.targets} is not tokens - rows "
                         f"({s.tokens} - {s.rows})" + (" or fewer (target_mask)" if masked
                                                       else ""))
        index, offset = divmod(s.first_sample_id, m.shard_size)
        if offset:
            found.append(f"{s.file}: first_sample_id {s.first_sample_id} is not a multiple of "
                         f"shard_size {m.shard_size}")
        elif s.file != shard_name(index):
            found.append(f"{s.file}: file: the shard starting at first_sample_id "
                         f"{s.first_sample_id} is {shard_name(index)}")
        if s.rows > m.shard_size:
            found.append(f"{s.file}: rows {s.rows} exceed shard_size {m.shard_size}")
    if m.complete:
        names = [s.file for s in m.shards]
        if names != [shard_name(i) for i in range(len(names))]:
            found.append(f"shards: a complete cache lists {shard_name(0)} onwards without a gap; "
                         f"found {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        short = [s for s in m.shards[:-1] if s.rows < m.shard_size]
        if short:
            found.append(f"{short[0].file}: rows {short[0].rows} are fewer than shard_size "
                         f"{m.shard_size}; only the last shard may hold fewer")
    return found


def _layout_diagnosis(path: Path, layout: ShardLayout, m: CacheManifest) -> str | None:
    """Which manifest field explains a shard's columns, when changing one would."""
    found = pq.read_schema(path).remove_metadata()
    candidates: list[tuple[str, Any, ShardLayout]] = [
        ("id_dtype", v, replace(layout, id_dtype=v)) for v in cols.ID_DTYPES]
    candidates += [("logprob_dtype", v, replace(layout, logprob_dtype=v))
                   for v in cols.LOGPROB_DTYPES]
    candidates += [("encoding", v, replace(layout, encoding=v)) for v in ("plain", "compact")]
    candidates += [("cache_mode", v, replace(layout, cache_mode=v)) for v in ("topk", "sampled")]
    for name, value, other in candidates:
        if other != layout and other.schema().remove_metadata().equals(found):
            return (f"{path.name}: its columns are those of {name} {value!r}, the manifest "
                    f"says {getattr(m, name)!r}")
    tails = replace(layout, has_tempered_tails=not layout.has_tempered_tails)
    if tails.schema().remove_metadata().equals(found):
        return (f"{path.name}: {'no' if tails.has_tempered_tails else 'a'} "
                f"{cols.TAIL_LOGMASS_TEMPERED} column, but the manifest lists "
                f"tail_temperatures {list(m.tail_temperatures)}")
    return None


def _file_problems(root: Path, m: CacheManifest, shard: ShardInfo) -> tuple[list[str], bool]:
    """(faults of the file as a whole, whether its rows can be scanned)."""
    path = root / shard.file
    if not path.is_file():
        return [f"{shard.file}: missing"], False
    found = []
    size = path.stat().st_size
    if size != shard.bytes:
        found.append(f"{shard.file}: bytes: the file has {size}, the manifest says "
                     f"{shard.bytes}")
    if sha256_file(path) != shard.sha256:
        return found + [f"{shard.file}: sha256 differs from the manifest (corrupted or "
                        "modified)"], False
    try:
        check_shard_schema(path, m.shard_layout)
    except CacheFormatError as exc:
        return found + [_layout_diagnosis(path, m.shard_layout, m) or str(exc)], False
    return found, True


def _lengths(table: pa.Table, name: str) -> np.ndarray:
    """(rows,) int64 length of every list in column `name`."""
    return np.diff(table.column(name).combine_chunks().offsets.to_numpy()).astype(np.int64)


def _flat(table: pa.Table, name: str) -> np.ndarray:
    """The values of list column `name`, flat."""
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)


@dataclass
class _ShardScan:
    """One shard's row groups, read in order; `faults` keeps the first fault of each kind."""

    m: CacheManifest
    file: str
    rows: int = 0
    tokens: int = 0
    targets: int = 0
    next_id: int | None = None
    first_id: int | None = None
    short: list[int] = field(default_factory=list)  # packed: ids shorter than max_length
    digest: Any = field(default_factory=hashlib.sha256)
    faults: dict[str, str] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)  # of the first row group holding any

    def fault(self, kind: str, text: str) -> None:
        self.faults.setdefault(kind, f"{self.file}: {text}")

    def add(self, table: pa.Table) -> None:
        """Check one row group and add it to the shard's totals."""
        m = self.m
        if table.num_rows == 0:
            self.fault("row groups", "an empty row group")
            return
        sample_ids = table.column(cols.SAMPLE_ID).to_numpy().astype(np.int64)
        offsets = table.column(cols.INPUT_IDS).combine_chunks().offsets.to_numpy()
        input_ids = _flat(table, cols.INPUT_IDS)
        lengths = np.diff(offsets).astype(np.int64)  # (rows,) T
        targets = self.masked_targets(table, lengths)  # (rows,)
        self.check_segments(table, lengths)
        start = self.next_id if self.next_id is not None else int(sample_ids[0])
        if not np.array_equal(sample_ids, start + np.arange(sample_ids.size)):
            self.fault("sample_id", "sample ids are not consecutive")
        self.first_id = start if self.first_id is None else self.first_id
        self.next_id = int(sample_ids[-1]) + 1
        self.rows += sample_ids.size
        self.tokens += int(lengths.sum())
        self.targets += int(targets.sum())
        self.digest.update(_tokens_record(sample_ids, offsets - offsets[0], input_ids))
        if not np.array_equal(table.column(cols.NUM_TARGETS).to_numpy(), targets):
            self.fault("num_targets", "num_targets differs from len(input_ids) - 1" + (
                " masked by target_mask" if m.shard_layout.has_target_mask else ""))
        if (lengths < 2).any():
            self.fault("input_ids", "a sequence of fewer than 2 tokens")
        if lengths.max() > m.max_length:
            self.fault("max_length", f"a sequence of {lengths.max()} tokens; max_length is "
                                     f"{m.max_length}")
        if m.layout == "packed" and m.corpus.format == "text":  # conversations are never split
            self.short += sample_ids[lengths != m.max_length].tolist()
        self.check_ids("input_ids", input_ids)
        self.check_targets(table, targets)
        self.invalid = self.invalid or cols.invalid_values(table)

    def masked_targets(self, table: pa.Table, lengths: np.ndarray) -> np.ndarray:
        """(rows,) target positions per sequence: len - 1, or those its target_mask keeps (at
        least one; the mask has one flag per position but the last)."""
        if not self.m.shard_layout.has_target_mask:
            return lengths - 1
        mask = table.column(cols.TARGET_MASK).combine_chunks()
        flags = mask.flatten().to_numpy(zero_copy_only=False).astype(bool)
        starts = mask.offsets.to_numpy()
        if not np.array_equal(np.diff(starts), lengths - 1):
            self.fault("train_on", "target_mask does not hold one flag per position but the "
                                   "last of each sequence")
            return lengths - 1
        per_row = np.add.reduceat(flags, starts[:-1] - starts[0]).astype(np.int64)
        if (per_row < 1).any():
            self.fault("train_on", "a sequence whose target_mask selects no position")
        return per_row

    def check_segments(self, table: pa.Table, lengths: np.ndarray) -> None:
        """Packed documents' lengths: positive, summing to each sequence's length."""
        if not self.m.segments:
            return
        column = table.column(cols.SEGMENTS).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        starts = column.offsets.to_numpy() - column.offsets.to_numpy()[0]
        if (np.diff(starts) < 1).any() or (values < 1).any() or not np.array_equal(
                np.add.reduceat(values, starts[:-1]), lengths):
            self.fault("segments", "segments are not positive lengths summing to each "
                                   "sequence's length")
            return
        # A segment's last position would predict the next document's first token.
        mask = table.column(cols.TARGET_MASK).combine_chunks()
        flags = mask.flatten().to_numpy(zero_copy_only=False).astype(bool)
        mask_starts = mask.offsets.to_numpy() - mask.offsets.to_numpy()[0]
        row_of = np.repeat(np.arange(lengths.size), np.diff(starts))
        ends = np.cumsum(values)
        end_in_row = ends - np.concatenate([[0], ends])[starts[:-1]][row_of]
        inner = np.ones(values.size, dtype=bool)
        inner[starts[1:] - 1] = False  # a row's last segment ends the sequence
        boundary = mask_starts[:-1][row_of[inner]] + end_in_row[inner] - 1
        if boundary.size and flags[boundary].any():
            self.fault("segments", "target_mask marks the last position of a packed document "
                                   "as a target (it would predict the next document)")

    def check_ids(self, column: str, ids: np.ndarray) -> None:
        if ids.size and int(ids.max()) >= self.m.vocab_size:
            self.fault(f"{column} ids", f"{column} holds id {int(ids.max())}, outside "
                                        f"vocab_size {self.m.vocab_size}")

    def check_length(self, table: pa.Table, column: str, targets: np.ndarray,
                     field_name: str | None = None, per_target: int = 1) -> None:
        """Every row of `column` holds `per_target` entries per target position; a mismatch
        blames manifest field `field_name` when it sets `per_target`."""
        if np.array_equal(_lengths(table, column), targets * per_target):
            return
        if field_name is None:
            self.fault(column, f"{column} does not hold one entry per target position")
        else:
            self.fault(field_name, f"{column} does not hold {field_name} "
                                   f"({getattr(self.m, field_name)!r}) entries per target "
                                   "position")

    def check_targets(self, table: pa.Table, targets: np.ndarray) -> None:
        """The per-position columns: lengths against top_k, tail_temperatures and samples;
        ids below vocab_size."""
        m = self.m
        self.check_length(table, cols.TARGET_LOGPROB, targets)
        if m.cache_mode == "sampled":
            self.check_sampled(table, targets)
            return
        self.check_length(table, cols.TAIL_LOGMASS, targets)
        if m.tail_temperatures:
            self.check_length(table, cols.TAIL_LOGMASS_TEMPERED, targets, "tail_temperatures",
                              len(m.tail_temperatures))
        names = ((cols.TOPK_ID_DELTAS, cols.TOPK_LOGPROB_Q) if m.encoding == "compact" else
                 (cols.TOPK_IDS, cols.TOPK_LOGPROBS))
        for name in names:
            self.check_length(table, name, targets, "top_k", m.top_k)
        if "top_k" in self.faults:
            return
        ids = _flat(table, names[0]).astype(np.int64)
        if m.encoding == "compact":  # ids are per-position running sums of the deltas
            ids = np.cumsum(ids.reshape(-1, m.top_k), axis=1).reshape(-1)
        self.check_ids(names[0], ids)

    def check_sampled(self, table: pa.Table, targets: np.ndarray) -> None:
        """Per position 1 .. samples unique ids whose counts sum to samples."""
        m = self.m
        self.check_length(table, cols.SAMPLED_LENGTHS, targets)
        unique = _flat(table, cols.SAMPLED_LENGTHS).astype(np.int64)  # (positions,)
        counts = _flat(table, cols.SAMPLED_COUNTS).astype(np.int64)  # (entries,)
        deltas = _flat(table, cols.SAMPLED_ID_DELTAS)
        if (unique < 1).any() or (unique > m.samples).any() or \
                unique.sum() != counts.size or counts.size != deltas.size:
            self.fault("samples", f"sampled_lengths are not 1 .. samples ({m.samples}) unique "
                                  "ids per position matching the id and count columns")
            return
        if not (np.add.reduceat(counts, np.cumsum(unique) - unique) == m.samples).all():
            self.fault("samples", f"sampled_counts do not sum to samples ({m.samples}) at "
                                  "every position")
        self.check_ids(cols.SAMPLED_ID_DELTAS, decode_sampled(deltas, unique)[0])

    def problems(self, shard: ShardInfo) -> list[str]:
        """Every fault, and the shard's totals against the manifest's record of it."""
        found = {"rows": self.rows, "tokens": self.tokens, "targets": self.targets,
                 "first_sample_id": self.first_id,
                 "last_sample_id": None if self.next_id is None else self.next_id - 1,
                 "tokens_sha256": self.digest.hexdigest()}
        faults = list(self.faults.values())
        faults += [f"{self.file}: {line}; the teacher's output was not finite: re-create the "
                   "cache (see `kdpipe cache-teacher --dtype`)" for line in self.invalid]
        for name, value in found.items():
            recorded = getattr(shard, name)
            if value != recorded:
                shown = "differs" if name == "tokens_sha256" else f"is {value}"
                faults.append(f"{shard.file}: {name} {shown} in the shard, {MANIFEST_NAME} "
                              f"says {recorded}")
        return faults


def _scan_shard(root: Path, m: CacheManifest, shard: ShardInfo) -> tuple[list[str], list[int]]:
    """(faults of one shard's rows, sample ids of its sequences shorter than max_length)."""
    parquet = pq.ParquetFile(root / shard.file)
    scan = _ShardScan(m, shard.file)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    if any(n != ROW_GROUP_SIZE for n in sizes[:-1]) or (sizes and sizes[-1] > ROW_GROUP_SIZE):
        scan.fault("row groups", f"row groups of {sizes} rows; every one but the last holds "
                                 f"{ROW_GROUP_SIZE}")
    for index in range(parquet.num_row_groups):
        scan.add(parquet.read_row_group(index))
    return scan.problems(shard), scan.short


def verify_cache(root: Path, m: CacheManifest) -> list[str]:
    """Every fault of the cache at `root` described by manifest `m`: missing or altered
    shards and tokenizer files, fields the shards contradict, values a cache never holds,
    stray files."""
    problems = manifest_problems(m)
    short: list[int] = []
    for shard in m.shards:
        found, readable = _file_problems(root, m, shard)
        problems += found
        if readable:
            faults, shard_short = _scan_shard(root, m, shard)
            problems += faults
            short += shard_short
    early = [i for i in short if i != m.shards[-1].last_sample_id] if short else []
    if early:  # packed blocks are all max_length tokens, but for the corpus's very last
        problems.append(f"layout 'packed': sample {early[0]} is shorter than max_length "
                        f"({m.max_length}); only the last sequence of a packed cache may be")
    problems += tokenizer_file_problems(root, m)
    listed = {s.file for s in m.shards}
    for stray in sorted(root.glob("shard-*.parquet")):
        if stray.name not in listed:
            problems.append(f"{stray.name}: shard file not listed in the manifest")
    if not m.complete:
        problems.append("manifest is marked incomplete: re-run the same `kdpipe "
                        "cache-teacher` command to finish it")
    return _merge_repeats(problems)


def _merge_repeats(problems: list[str]) -> list[str]:
    """One line for a fault many shards share (a wrong `top_k` shows in every shard)."""
    files: dict[str, list[str]] = {}
    for problem in problems:
        found = _SHARD_FAULT.match(problem)
        file, text = found.groups() if found else ("", problem)
        files.setdefault(text, []).append(file)
    return [text if not names[0] else f"{names[0]}: {text}" if len(names) == 1 else
            f"{names[0]} and {len(names) - 1} more shards: {text}"
            for text, names in files.items()]
