"""Corpus input for `kdpipe cache-teacher`: turn `--data` values into a stream of documents.

A `--data` value is a file, a folder (searched recursively), a glob, or a Hugging Face dataset
name. Local formats: `.txt` (one file = one document), `.jsonl`, `.jsonl.zst` (decompressed as
a stream) and `.parquet` (read a batch at a time). Order is deterministic — sorted paths within
a folder or glob, then the order of the `--data` values — because the teacher stage numbers
samples in the order it reads them.

A name that is neither on disk nor in the local Hugging Face cache, while the hub is offline
or does not answer, is refused at once: it is most likely a path typo, and `datasets` would
spend half a minute retrying the hub before saying so.

A large corpus always holds a few bad documents; they are skipped, counted and summarised in
one warning rather than stopping a long run (`strict=True` stops at the first instead).
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.fingerprint import files_fingerprint, json_fingerprint

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
SUFFIXES = (".jsonl.zst", ".jsonl", ".parquet", ".txt")
# Endings that mark a value as a file the user meant, never a dataset name.
_PATHLIKE = (*SUFFIXES, ".zst", ".json", ".gz", ".csv", ".tsv", ".arrow", ".bz2", ".xz")
_GLOB_CHARS = re.compile(r"[*?[]")
_FIELD_PROBE = 1000  # records without the text field before a file is called wrong, not dirty
_BATCH_ROWS = 1024  # parquet rows per batch
_SEEK_CHUNK = 1 << 20  # bytes read at a time while counting the lines before a slice
HUB_PROBE_TIMEOUT_S = 3.0  # one request, no retries: enough to tell "no network" from "slow"


@dataclass
class CorpusStats:
    """Counters filled while the corpus is read (the manifest records them).

    A document is a text, or a conversation (one row of chat data). `documents_read` +
    `documents_skipped` is every row seen; the conversation counters say why some were skipped
    or cut (docs/chat-data.md).
    """

    documents_read: int = 0  # documents yielded
    documents_skipped: int = 0  # empty / undecodable / malformed, and the two skips below
    conversations_truncated: int = 0  # cut to --max-length (--overlong truncate), kept
    conversations_too_long: int = 0  # longer than --max-length, skipped (--overlong skip)
    conversations_without_targets: int = 0  # no target token (left after a cut), skipped


@dataclass(frozen=True)
class SourceSlice:
    """Part of one local source, for a worker reading only its share of the corpus
    (`corpus_split`): of a .jsonl file the lines that start in bytes [start, stop), of a
    .parquet file rows [start, stop). Reading the slices of a file in order reads each of its
    documents once, as reading the whole file does."""

    source: str
    start: int
    stop: int


Source = str | SourceSlice  # a resolved source (`resolve_sources`) or a slice of one


def _unslice(source: Source) -> tuple[str, SourceSlice | None]:
    if isinstance(source, SourceSlice):
        return source.source, source
    return source, None


def source_name(source: Source) -> str:
    """The file or `hf:NAME` a source or slice reads."""
    return _unslice(source)[0]


def _suffix(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _looks_like_path(value: str) -> bool:
    """A dataset name is `name` or `owner/name`; anything else that does not exist is a typo."""
    return (value.startswith(("/", "./", "../", "~")) or "\\" in value or value.count("/") > 1
            or value.lower().endswith(_PATHLIKE))


def _supported(paths: Sequence[Path], value: str, what: str) -> list[Path]:
    files = [p for p in paths if p.is_file()]
    keep = [p for p in files if _suffix(p) is not None]
    if not keep:
        raise ConfigError(f"--data {value}: {what} holds no supported files "
                          f"({', '.join(SUFFIXES)}); point --data at the corpus files")
    if len(keep) < len(files):
        logger.warning("--data %s: ignoring %d files of other formats (supported: %s)",
                       value, len(files) - len(keep), ", ".join(SUFFIXES))
    return keep


def _folder_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .cache, .git, ...
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found)


def resolve_sources(data: Sequence[str]) -> list[str]:
    """Expand `--data` values into the ordered list of files and `hf:NAME` datasets to read.

    Existing paths win over dataset names; a glob that matches nothing, or a missing path that
    looks like a path (`./x`, `a/b/c`, `x.jsonl`), is an error rather than a dataset lookup,
    and so is a name in no local cache while the hub is offline or unreachable
    (`check_dataset_reachable`). Raises ConfigError.
    """
    if not data:
        raise ConfigError("--data: no corpus given; pass a file, folder, glob or dataset name")
    sources: list[str] = []
    seen: set[Path] = set()
    for value in data:
        path = Path(os.path.expanduser(value))
        if path.is_file():
            if _suffix(path) is None:
                raise ConfigError(f"--data {value}: unsupported file format; convert it to one "
                                  f"of {', '.join(SUFFIXES)}")
            files = [path]
        elif path.is_dir():
            files = _supported(_folder_files(path), value, "folder")
        elif _GLOB_CHARS.search(value):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(value), recursive=True))
            if not matches:
                raise ConfigError(f"--data {value}: the pattern matches no files; check the path")
            files = _supported(matches, value, "pattern")
        elif _looks_like_path(value):
            raise ConfigError(f"--data {value}: file not found; check the path")
        else:
            check_dataset_reachable(value)
            sources.append(HF_PREFIX + value)
            continue
        for file in files:
            key = file.resolve()
            if key in seen:
                logger.warning("--data %s: %s is already in the corpus; reading it once", value,
                               file)
                continue
            seen.add(key)
            sources.append(str(file))
    return sources


# ---- Hugging Face datasets -----------------------------------------------------------------

def _in_local_hf_cache(name: str) -> bool:
    """Whether `datasets` could load `name` without the hub: its files are in the hub cache,
    or a prepared copy is in the datasets cache (the folders `datasets` itself looks in)."""
    import datasets.config
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    hub_copy = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset")
    prepared = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    return hub_copy.is_dir() or prepared.is_dir()


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub did not answer one HTTP request within `timeout` seconds, or
    None when it answered (any status; the environment's proxy settings apply, as for
    `datasets`). The request runs in a thread abandoned at the deadline, because a name
    lookup can block longer than a socket timeout."""
    from huggingface_hub import constants

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                   timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # an error status is still an answer
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            outcome.append(f"{constants.ENDPOINT} is unreachable: {reason}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{constants.ENDPOINT} did not answer within {timeout:g} s"
    return outcome[0]


def check_dataset_reachable(name: str) -> None:
    """Refuse a `--data` value that can be neither a local path nor a loadable dataset.

    Raises ConfigError (both readings in one line) when `name` is not in the local Hugging
    Face cache and the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or unreachable.
    """
    import datasets.config

    if _in_local_hf_cache(name):
        return
    if datasets.config.HF_HUB_OFFLINE:
        why: str | None = "the hub is offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"
    else:
        why = hub_unreachable()
    if why is None:
        return
    raise ConfigError(f"--data {name}: no file or folder named {name!r} here "
                      f"({Path.cwd()}), and no dataset {name!r} in the local Hugging Face "
                      f"cache ({why}); check the path, or go online to load the dataset")


def _hf_error(name: str, split: str | None, exc: Exception) -> ConfigError:
    detail = " ".join(str(exc).split())[:300]
    return ConfigError(f"--data {name}: not a file or folder, and loading it as a dataset "
                       f"(split {split!r}) failed: {type(exc).__name__}: {detail}; "
                       f"check the path, the dataset name or --split")


def _load_hf(name: str, split: str | None) -> tuple[Any, list[str] | None]:
    import datasets  # heavy import, only needed for hub corpora

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, bad split
        raise _hf_error(name, split, exc) from exc
    if isinstance(ds, datasets.IterableDatasetDict):  # split=None
        if len(ds) != 1:
            raise ConfigError(f"--split: dataset {name} has splits {sorted(ds)}; pick one")
        ds = next(iter(ds.values()))
    features = getattr(ds, "features", None)
    return ds, (list(features) if features is not None else None)


def _hf_fingerprint(name: str, split: str | None) -> dict[str, Any]:
    """What identifies a hub dataset without downloading it.

    Limitation: we cannot hash the content of a remote dataset without reading it. For hub
    repos the builder hash and data-file URLs carry the repo's commit sha, so a new revision
    changes the fingerprint; a local dataset folder gets the sampled content hash of its files.
    Datasets whose files are not versioned (plain URLs) are identified by name and config only.
    """
    import datasets

    try:
        builder = datasets.load_dataset_builder(name)
    except (OSError, ValueError) as exc:
        raise _hf_error(name, split, exc) from exc
    data_files = builder.config.data_files or {}
    splits = [split] if split is not None else sorted(str(s) for s in data_files)
    files = [str(f) for s in splits for f in data_files.get(s, [])]
    entry: dict[str, Any] = {"dataset": name, "split": split, "config": builder.config.name,
                             "version": str(builder.info.version)}
    if files and all(Path(f).is_file() for f in files):
        entry["files"] = files_fingerprint(files, root=name)
    else:
        entry["files"] = files
        entry["builder_hash"] = builder.hash
    return entry


def corpus_fingerprint(sources: Sequence[str], text_field: str, split: str | None) -> str:
    """sha256 over the sources in reading order and the text field (see `_hf_fingerprint`).

    Local files contribute their sampled content hash (`files_fingerprint`) under their base
    name, so a moved corpus keeps its fingerprint; `split` only matters for `hf:` sources.
    """
    entries: list[Any] = []
    for source in sources:
        if source.startswith(HF_PREFIX):
            entries.append(_hf_fingerprint(source[len(HF_PREFIX):], split))
        else:
            entries.append(files_fingerprint([source]))
    return json_fingerprint({"sources": entries, "text_field": text_field})


# ---- reading -------------------------------------------------------------------------------

class Skips:
    """Counts bad documents, or raises on the first malformed one under `strict`."""

    def __init__(self, stats: CorpusStats, strict: bool) -> None:
        self.stats, self.strict = stats, strict
        self.reasons: Counter[str] = Counter()
        self.first: str | None = None

    def __call__(self, where: str, reason: str, hint: str = "", malformed: bool = True) -> None:
        """Skip the document at `where` (file and line or row) for `reason`.

        `malformed=False` marks a well-formed document that is left out by a rule (a
        conversation too long or with nothing to train): counted, never fatal. Raises
        ConfigError for a malformed one under `strict`.
        """
        if self.strict and malformed:
            raise ConfigError(f"--strict: {where}: {reason}; fix or remove that document{hint}, "
                              f"or drop --strict to skip bad documents")
        self.stats.documents_skipped += 1
        self.reasons[reason] += 1
        self.first = self.first or where

    def check_nonempty(self, read: int, sources: Sequence[str], fields: str) -> None:
        """Raise ConfigError when no document at all was read; `fields` names the flags to
        check."""
        if read == 0:
            skipped = sum(self.reasons.values())
            raise ConfigError(f"--data: empty corpus (0 documents, {skipped} skipped) in "
                              f"{_describe(sources)}; check --data and {fields}")

    def summarise(self, read: int) -> None:
        """One warning counting the skipped documents by reason (none when nothing was)."""
        if self.reasons:
            counts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
            logger.warning("skipped %d of %d documents (%s); first at %s; pass --strict to stop "
                           "at the first bad document", sum(self.reasons.values()),
                           read + sum(self.reasons.values()), counts, self.first)


@dataclass(frozen=True)
class Field:
    """A column the reader needs: its name, the flag that names it, what it holds."""

    name: str
    flag: str = "--text-field"
    holds: str = "the text"


class _FieldProbe:
    """Tells a file that never has a field (a wrong `--text-field`) from a dirty one."""

    def __init__(self, source: str, field: Field) -> None:
        self.source, self.field = source, field
        self.records = self.with_field = 0
        self.keys: list[str] = []

    def see(self, record: dict[str, Any]) -> None:
        self.records += 1
        if self.field.name in record:
            self.with_field += 1
            return
        self.keys = self.keys or list(record)
        if self.records >= _FIELD_PROBE:
            self.check()

    def check(self) -> None:
        if self.records and not self.with_field:
            raise _missing_field(self.field, self.source, self.keys)


def _missing_field(field: Field, source: str, keys: Sequence[str]) -> ConfigError:
    return ConfigError(f"{field.flag} {field.name}: {source} has no field {field.name!r} "
                       f"(fields: {', '.join(map(str, keys)) or 'none'}); pass {field.flag} "
                       f"naming the column that holds {field.holds}")


def _record_text(text: Any, where: str, field: str, skip: Skips) -> str | None:
    if not isinstance(text, str):
        skip(where, f"field {field!r} is not a string")
        return None
    try:
        text.encode("utf-8")  # lone surrogates from "\ud800" escapes would crash the tokenizer
    except UnicodeEncodeError:
        skip(where, "not valid UTF-8")
        return None
    return _nonempty(text, where, skip)


def _nonempty(text: str, where: str, skip: Skips) -> str | None:
    if text.strip():
        return text
    skip(where, "empty")
    return None


def _open_lines(path: Path, raw: BinaryIO) -> BinaryIO:
    if _suffix(path) != ".jsonl.zst":
        return raw
    import zstandard

    # read_across_frames: files written by concatenating frames (e.g. `zstd` on split output).
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(reader, buffer_size=1 << 20)


def _skip_to_line(raw: BinaryIO, start: int) -> tuple[int, int]:
    """Move `raw` to the first line starting at or after byte `start`; returns (the lines
    before it, its byte offset). The lines before are counted so that messages name lines as
    reading the whole file would."""
    newlines = position = 0
    last = b"\n"
    while position < start:
        chunk = raw.read(min(_SEEK_CHUNK, start - position))
        if not chunk:
            return newlines, position
        newlines += chunk.count(b"\n")
        position += len(chunk)
        last = chunk[-1:]
    if last != b"\n":  # inside a line: it belongs to the slice where it starts
        position += len(raw.readline())
        newlines += 1
    return newlines, position


def _numbered_lines(lines: BinaryIO, window: SourceSlice | None) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) of every line, or of the lines starting in the window."""
    if window is None:
        yield from enumerate(lines, start=1)
        return
    lineno, position = _skip_to_line(lines, window.start)
    while position < window.stop:
        line = lines.readline()
        if not line:
            return
        lineno += 1
        position += len(line)
        yield lineno, line


def _jsonl_values(path: Path, skip: Skips, window: SourceSlice | None = None
                  ) -> Iterator[tuple[str, Any]]:
    """(where, value) of each non-blank line (of the window's lines when given); lines that are
    not JSON are skipped."""
    import zstandard

    with open(path, "rb") as raw:
        lines = _open_lines(path, raw)
        lineno = 0
        try:
            for lineno, line in _numbered_lines(lines, window):
                if not line.strip():
                    continue  # blank lines separate nothing in JSON lines
                where = f"{path} line {lineno}"
                try:
                    yield where, json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except UnicodeDecodeError:
                    skip(where, "not valid UTF-8")
                except json.JSONDecodeError:
                    skip(where, "not valid JSON")
        except zstandard.ZstdError as exc:
            raise ConfigError(f"--data {path}: corrupt zstd stream after line {lineno} ({exc}); "
                              f"re-create or remove the file") from exc


def _with_fields(values: Iterable[tuple[str, Any]], source: str, fields: Sequence[Field],
                 skip: Skips, window: SourceSlice | None = None
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The values that are objects holding every field; the others are skipped. Raises
    ConfigError when the source's first records never hold a field (a wrong flag). Of a
    `window`, only the one at the file's start can tell, and only once it has seen
    _FIELD_PROBE records (a short one may end before the first record with the field): the
    others only skip, as reading the whole file would."""
    probes = ([_FieldProbe(source, field) for field in fields]
              if window is None or window.start == 0 else [])
    for where, record in values:
        if not isinstance(record, dict):
            skip(where, "not a JSON object")
            continue
        for field_probe in probes:
            field_probe.see(record)
        missing = [field for field in fields if field.name not in record]
        if missing:
            skip(where, f"no field {missing[0].name!r}", hint=f" or pass {missing[0].flag}")
            continue
        yield where, record
    for field_probe in probes if window is None else []:
        field_probe.check()


def _read_txt(path: Path, skip: Skips) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        skip(f"{path} byte {exc.start}", "not valid UTF-8")
        return
    if _nonempty(text, str(path), skip) is not None:
        yield text


def _parquet_batches(pf: Any, columns: list[str], window: SourceSlice | None
                     ) -> Iterator[tuple[int, Any]]:
    """(rows before it, batch) of every row of the ParquetFile `pf`, or of the window's rows;
    only the row groups the window overlaps are read."""
    groups: list[int] = []
    row = first = 0  # row: the first row of the first group read
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if window is None or (first + rows > window.start and first < window.stop):
            row = row if groups else first
            groups.append(group)
        first += rows
    if not groups:
        return
    # iter_batches reads one row group at a time: memory stays at a row group's columns.
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns, row_groups=groups):
        lo = 0 if window is None else max(window.start - row, 0)
        hi = batch.num_rows if window is None else min(window.stop - row, batch.num_rows)
        if hi > lo:
            yield row + lo, batch.slice(lo, hi - lo)
        row += batch.num_rows


def _read_parquet(path: Path, text_field: str, skip: Skips, window: SourceSlice | None = None
                  ) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise _missing_field(Field(text_field), str(path), schema.names)
    kind = schema.field(text_field).type
    as_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (as_bytes or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or str(kind) == "string_view"):
        raise ConfigError(f"--text-field {text_field}: column {text_field!r} of {path} is {kind}, "
                          f"not text; pass --text-field naming the text column")
    for row, batch in _parquet_batches(pf, [text_field], window):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path} row {row}"
            if value is None:
                skip(where, f"field {text_field!r} is null")
                continue
            if as_bytes:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    skip(where, "not valid UTF-8")
                    continue
            if _nonempty(value, where, skip) is not None:
                yield value


def _parquet_rows(path: Path, fields: Sequence[Field], optional: Sequence[str],
                  window: SourceSlice | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) with the fields' columns and those of `optional` the file has (of the
    window's rows when given)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for field in fields:
        if field.name not in names:
            raise _missing_field(field, str(path), names)
    columns = [f.name for f in fields] + [name for name in optional if name in names]
    for row, batch in _parquet_batches(pf, columns, window):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


def _hf_records(name: str, fields: Sequence[Field], split: str | None
                ) -> tuple[str, Iterator[tuple[str, Any]]]:
    """(the source's name in messages, its (where, record) pairs); a missing column raises."""
    ds, columns = _load_hf(name, split)
    source = f"dataset {name}"
    for field in fields:
        if columns is not None and field.name not in columns:
            raise _missing_field(field, source, columns)
    return source, ((f"{source} record {i}", r) for i, r in enumerate(ds, start=1))


def _local_file(source: str) -> tuple[Path, str | None]:
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--data {source}: file not found; check the path")
    return path, _suffix(path)


def _unsupported(source: str) -> ConfigError:
    return ConfigError(f"--data {source}: unsupported file format; convert it to one of "
                       f"{', '.join(SUFFIXES)}")


def _read_source(piece: Source, text_field: str, split: str | None, skip: Skips
                 ) -> Iterator[str]:
    source, window = _unslice(piece)
    field = Field(text_field)
    if source.startswith(HF_PREFIX):
        name, values = _hf_records(source[len(HF_PREFIX):], [field], split)
    else:
        path, suffix = _local_file(source)
        if suffix == ".txt":
            yield from _read_txt(path, skip)
            return
        if suffix == ".parquet":
            yield from _read_parquet(path, text_field, skip, window)
            return
        if suffix not in (".jsonl", ".jsonl.zst"):
            raise _unsupported(source)
        name, values = str(path), _jsonl_values(path, skip, window)
    for where, record in _with_fields(values, name, [field], skip, window):
        text = _record_text(record[text_field], where, text_field, skip)
        if text is not None:
            yield text


def iter_records(piece: Source, fields: Sequence[Field], split: str | None, skip: Skips,
                 optional: Sequence[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of one source (or slice of one) that holds every field
    of `fields`.

    `where` names the file and line (JSON lines), row (Parquet) or record (dataset), for
    messages. Parquet files are read only in the columns of `fields` and of `optional` they
    have; JSON records and dataset records come whole. Records without a field, and lines that
    are not JSON objects, are skipped through `skip`. Raises ConfigError for a missing file, a
    .txt file (plain text has no fields), or a source whose records never hold a field.
    """
    source, window = _unslice(piece)
    if source.startswith(HF_PREFIX):
        name, values = _hf_records(source[len(HF_PREFIX):], fields, split)
        yield from _with_fields(values, name, fields, skip)
        return
    path, suffix = _local_file(source)
    if suffix == ".parquet":
        yield from _parquet_rows(path, fields, optional, window)
    elif suffix in (".jsonl", ".jsonl.zst"):
        yield from _with_fields(_jsonl_values(path, skip, window), str(path), fields, skip,
                                window)
    elif suffix == ".txt":
        raise ConfigError(f"--data {source}: a .txt file holds plain text, without a "
                          f"{fields[0].name!r} field; convert it to .jsonl or .parquet, or "
                          "pass --format text")
    else:
        raise _unsupported(source)


def first_fields(source: str, split: str | None, limit: int = 100) -> list[set[str]]:
    """The field names of the first `limit` records of one source, in order: one set of column
    names for Parquet files and datasets with known columns, none for .txt files."""
    if source.startswith(HF_PREFIX):
        ds, columns = _load_hf(source[len(HF_PREFIX):], split)
        if columns is not None:
            return [set(columns)]
        return [set(r) for r in itertools.islice(ds, limit) if isinstance(r, dict)]
    path, suffix = _local_file(source)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [set(pq.ParquetFile(path).schema_arrow.names)]
    if suffix in (".jsonl", ".jsonl.zst"):
        values = _jsonl_values(path, Skips(CorpusStats(), strict=False))
        return [set(r) for _, r in itertools.islice(values, limit) if isinstance(r, dict)]
    return []


def _describe(sources: Sequence[str], shown: int = 3) -> str:
    if not sources:
        return "no sources"
    more = f" and {len(sources) - shown} more" if len(sources) > shown else ""
    return ", ".join(sources[:shown]) + more


def count_documents(sources: Sequence[str]) -> int | None:
    """How many documents `iter_documents` will read or skip in `sources`, counted cheaply:
    a .txt file is one, a .jsonl file its non-blank lines, a .parquet file the rows its footer
    records. None when a source cannot be counted without decompressing or downloading it
    (.jsonl.zst, Hugging Face datasets), or cannot be read (reading it reports why)."""
    import pyarrow.parquet as pq

    total = 0
    for source in sources:
        suffix = None if source.startswith(HF_PREFIX) else _suffix(source)
        try:
            if suffix == ".txt":
                total += 1
            elif suffix == ".parquet":
                total += pq.ParquetFile(source).metadata.num_rows
            elif suffix == ".jsonl":
                with open(source, "rb") as lines:
                    total += sum(1 for line in lines if line.strip())
            else:
                return None
        except (OSError, ValueError):  # pyarrow's errors are one of the two
            return None
    return total


def iter_documents(sources: Sequence[Source], text_field: str = "text",
                   split: str | None = "train", strict: bool = False,
                   stats: CorpusStats | None = None, allow_empty: bool = False
                   ) -> Iterator[str]:
    """Yield the non-empty text of every document of `sources` (from `resolve_sources`, or
    slices of them), in order.

    Streams: at most one document (or one Parquet batch) is held at a time, so corpus size does
    not matter. Empty, undecodable and non-string documents are skipped and counted in `stats`;
    a corpus with no document at all is a ConfigError raised once the sources are exhausted,
    unless `allow_empty` (one worker's share of a corpus may hold none).
    """
    stats = stats if stats is not None else CorpusStats()
    skip = Skips(stats, strict)
    read = 0
    try:
        for source in sources:
            for text in _read_source(source, text_field, split, skip):
                read += 1
                stats.documents_read += 1
                yield text
        if not allow_empty:
            skip.check_nonempty(read, [source_name(s) for s in sources], "--text-field")
    finally:
        skip.summarise(read)
