"""The cache manifest (`manifest.json`): what a cache holds, how it was made, and its checksums.

Written by `kdpipe cache-teacher` after every finished shard (atomically, with
`complete=false` until the last one), read and validated by every other stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdpipe import __version__
from kdpipe.schemas.encoding import CACHE_MODES, ENCODINGS, MAX_SAMPLES
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.fingerprint import json_fingerprint
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.records import from_dict, read_json, to_dict
from kdpipe.schemas.shard import ROW_GROUP_SIZE, ShardLayout

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"  # the cache's tokenizer, saved with save_pretrained (schema 2)
DATASET_CARD_NAME = "README.md"  # the Hub's dataset card (`kdpipe.pipeline.dataset_card`)
# 2: vocab_size is the tokenizer's real vocabulary (the support of every cached distribution),
#    the teacher's head width is recorded apart, and documents may start with BOS. Version 1
#    manifests are upgraded on read (`_upgrade_v1`).
# 3: conversational data: `train_on` (targets at some positions only: shards carry a
#    target_mask), `segments` (packed documents' lengths), the corpus format and chat template.
#    Version 2 manifests read as they are: every new field's default is what they hold.
# 4: `tokenizer.files`: size and sha256 of every file of CACHE/tokenizer/, checked like shards.
#    Version 2 and 3 manifests read as they are (no file recorded: the folder is not checked).
MANIFEST_SCHEMA_VERSION = 4
LAYOUTS = ("packed", "document")
# Which positions hold teacher targets: every one, or those of the chat data's selection.
TRAIN_ON = ("all", "assistant", "last-assistant", "completion")
TAIL_MODES = ("exact", "uniform")  # uniform: tempered tails approximated at train time
# How teacher_entropy was computed: exactly over the full vocabulary (hf backend), or as a lower
# bound from the top-k and the tail mass (vLLM backend: no full logits).
ENTROPY_MODES = ("exact", "topk_lower_bound")


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name relative to the cache folder, e.g. "shard-00000.parquet"
    rows: int  # sequences
    tokens: int  # input tokens (sum of sequence lengths)
    targets: int  # positions with a teacher distribution (tokens - rows, or the masked ones)
    first_sample_id: int
    last_sample_id: int
    bytes: int
    sha256: str  # of the Parquet file
    tokens_sha256: str  # of the sample ids and token ids, independent of encoding


@dataclass(frozen=True)
class FileInfo:
    """A file of the cache other than a shard, checked by size and sha256 as shards are."""

    file: str  # name relative to its folder, e.g. "tokenizer.json" in tokenizer/
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TeacherInfo:
    name_or_path: str
    revision: str | None  # hub commit when loaded from the hub
    fingerprint: str  # sha256 over config and sampled weight bytes
    backend: str  # "hf" or "vllm"
    dtype: str  # compute dtype of the teacher pass


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    fingerprint: str  # schemas.fingerprint.tokenizer_fingerprint: the whole tokenizer.json
    # schemas.vocab.vocab_fingerprint: the id <-> token mapping, what compatibility means;
    # "" in caches of schema version 1, which did not record it
    vocab_fingerprint: str
    size: int  # len(tokenizer), including added tokens
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    # The files of CACHE/tokenizer/, sorted by name; () in caches of schema version 3 and
    # older, whose saved tokenizer (if any) is loaded unchecked. Not a setting: the same
    # tokenizer saved by another transformers version has other bytes.
    files: tuple[FileInfo, ...] = ()


@dataclass(frozen=True)
class CorpusInfo:
    sources: tuple[str, ...]  # files as given, or "hf:NAME" for a hub dataset
    text_field: str
    split: str | None
    fingerprint: str
    documents_read: int
    documents_skipped: int  # empty or undecodable, counted and skipped
    format: str = "text"  # text, messages or prompt-completion
    chat_template: str = ""  # sha256 of the chat template that rendered conversations
    # Chat data: the fields read and the --overlong rule, by option name (docs/chat-data.md)
    options: dict[str, str] = field(default_factory=dict)
    conversations_truncated: int = 0  # cut to max_length and kept
    conversations_too_long: int = 0  # skipped (--overlong skip)
    conversations_without_targets: int = 0  # skipped: no target token (left)


@dataclass(frozen=True)
class CacheManifest:
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    corpus: CorpusInfo
    # Ids of every cached distribution: the tokenizer's real vocabulary. Rows of the teacher's
    # head beyond it are padding and excluded from its softmax (docs/cache-format.md).
    vocab_size: int
    teacher_head_width: int  # rows of the teacher's output head (config.vocab_size)
    top_k: int
    max_length: int
    layout: str  # "packed" or "document"
    # Documents encoded with the tokenizer's own special tokens (a BOS where it adds one)
    add_special_tokens: bool
    shard_size: int  # sequences per shard
    id_dtype: str
    logprob_dtype: str
    capture_temperature: float
    tail_temperatures: tuple[float, ...]
    tail_mode: str
    settings_fingerprint: str  # everything that determines the cache's content
    complete: bool
    shards: tuple[ShardInfo, ...] = ()
    topk_layout: str = "flat"  # top-k columns are flat lists with stride top_k
    entropy_mode: str = "exact"  # one of ENTROPY_MODES; follows from the backend
    encoding: str = "plain"  # top-k columns: one of encoding.ENCODINGS
    cache_mode: str = "topk"  # "sampled": N teacher samples per position instead of top-k
    samples: int = 0  # sampled: draws per position (N)
    sample_seed: int = 0  # sampled: position draws use a generator seeded by (seed, sample_id)
    train_on: str = "all"  # one of TRAIN_ON; not "all": shards have a target_mask column
    # Shards have a segments column (packed documents' lengths) and a target_mask: a document's
    # last position would predict the next document's first token, so it is never a target.
    segments: bool = False
    schema_version: int = MANIFEST_SCHEMA_VERSION
    kdpipe_version: str = __version__
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def shard_layout(self) -> ShardLayout:
        return ShardLayout(self.id_dtype, self.logprob_dtype, bool(self.tail_temperatures),
                           self.encoding, self.cache_mode,
                           has_target_mask=self.train_on != "all" or self.segments,
                           has_segments=self.segments)

    @property
    def num_sequences(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_targets(self) -> int:
        return sum(s.targets for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def num_row_groups(self) -> int:
        return sum(-(-s.rows // ROW_GROUP_SIZE) for s in self.shards)

    @property
    def decoded_bytes(self) -> int:
        """Memory of the whole cache decoded for training (ids, top-k log-probs and tail in
        their stored dtypes): what a reader keeping every row group decoded holds."""
        id_bytes = 2 if self.id_dtype == "uint16" else 4
        logprob_bytes = 2 if self.logprob_dtype == "float16" else 4
        return (self.num_targets * (self.top_k * (id_bytes + logprob_bytes) + 4)
                + self.num_tokens * id_bytes)

    def with_fingerprint(self) -> CacheManifest:
        """This manifest with `settings_fingerprint` computed from its settings."""
        return replace(self, settings_fingerprint=json_fingerprint(self.settings()))

    def with_shard(self, shard: ShardInfo) -> CacheManifest:
        kept = tuple(s for s in self.shards if s.file != shard.file)
        return replace(self, shards=tuple(sorted(kept + (shard,), key=lambda s: s.file)))

    def settings(self) -> dict[str, object]:
        """The fields that determine the cache's content (fingerprinted, compared on resume)."""
        settings: dict[str, object] = {
            "teacher": self.teacher.fingerprint,
            "teacher_dtype": self.teacher.dtype,
            "backend": self.teacher.backend,
            "tokenizer": self.tokenizer.fingerprint,
            "corpus": self.corpus.fingerprint,
            "text_field": self.corpus.text_field,
            "split": self.corpus.split,
            "vocab_size": self.vocab_size,
            "top_k": self.top_k,
            "max_length": self.max_length,
            "layout": self.layout,
            "shard_size": self.shard_size,
            "id_dtype": self.id_dtype,
            "logprob_dtype": self.logprob_dtype,
            "capture_temperature": self.capture_temperature,
            "tail_temperatures": list(self.tail_temperatures),
            "tail_mode": self.tail_mode,
            "topk_layout": self.topk_layout,
        }
        # Only non-default values, so caches made before a setting existed keep their
        # fingerprint (and resume).
        if self.teacher_head_width != self.vocab_size:
            settings["teacher_head_width"] = self.teacher_head_width
        if self.add_special_tokens:
            settings["add_special_tokens"] = True
        if self.encoding != "plain":
            settings["encoding"] = self.encoding
        if self.cache_mode != "topk":
            settings |= {"cache_mode": self.cache_mode, "samples": self.samples,
                         "sample_seed": self.sample_seed}
        if self.corpus.format != "text":
            settings |= {"format": self.corpus.format, "chat_template": self.corpus.chat_template,
                         "corpus_options": dict(sorted(self.corpus.options.items()))}
        if self.train_on != "all":
            settings["train_on"] = self.train_on
        if self.segments:
            settings["segments"] = True
        return settings

    def validate(self, where: str) -> None:
        problems = []
        if json_fingerprint(self.settings()) != self.settings_fingerprint:
            problems.append("settings do not match settings_fingerprint (was the manifest "
                            "edited by hand?); re-create the cache")
        if self.layout not in LAYOUTS:
            problems.append(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.tail_mode not in TAIL_MODES:
            problems.append(f"tail_mode {self.tail_mode!r} is not one of {TAIL_MODES}")
        if not 1 <= self.top_k <= self.vocab_size:
            problems.append(f"top_k {self.top_k} outside 1..vocab_size ({self.vocab_size})")
        if self.teacher_head_width < self.vocab_size:
            problems.append(f"teacher_head_width {self.teacher_head_width} is smaller than "
                            f"vocab_size {self.vocab_size}")
        if self.entropy_mode not in ENTROPY_MODES:
            problems.append(f"entropy_mode {self.entropy_mode!r} is not one of {ENTROPY_MODES}")
        if self.encoding not in ENCODINGS:
            problems.append(f"encoding {self.encoding!r} is not one of {ENCODINGS}")
        if self.cache_mode not in CACHE_MODES:
            problems.append(f"cache_mode {self.cache_mode!r} is not one of {CACHE_MODES}")
        if self.cache_mode == "sampled" and not 1 <= self.samples <= MAX_SAMPLES:
            problems.append(f"samples {self.samples} outside 1..{MAX_SAMPLES}")
        if self.train_on not in TRAIN_ON:
            problems.append(f"train_on {self.train_on!r} is not one of {TRAIN_ON}")
        if self.segments and self.layout != "packed":
            problems.append("segments are recorded for the packed layout only")
        if self.topk_layout != "flat":
            problems.append(f"topk_layout {self.topk_layout!r} is not 'flat'")
        try:
            if self.encoding in ENCODINGS and self.cache_mode in CACHE_MODES:
                self.shard_layout.schema()
        except KeyError as exc:
            problems.append(f"unknown column type {exc}")
        for kind, name in [*(("shard", s.file) for s in self.shards),
                           *(("tokenizer", f.file) for f in self.tokenizer.files)]:
            if "/" in name or "\\" in name or name.startswith("."):
                problems.append(f"{kind} file name {name!r} must be a plain name")
        if problems:
            raise CacheFormatError(f"{where}: " + "; ".join(problems))


def same_mapping(a: CacheManifest, b: CacheManifest) -> bool:
    """Whether two caches' token ids mean the same tokens (`schemas.vocab`); caches of schema
    version 1, which lack the mapping fingerprint, need the same tokenizer file."""
    if a.tokenizer.vocab_fingerprint and b.tokenizer.vocab_fingerprint:
        return (a.vocab_size, a.tokenizer.vocab_fingerprint) == (
            b.vocab_size, b.tokenizer.vocab_fingerprint)
    return a.tokenizer.fingerprint == b.tokenizer.fingerprint


def manifest_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def write_manifest(cache_dir: str | Path, manifest: CacheManifest) -> None:
    """Replace the manifest atomically (a crash leaves the previous one intact)."""
    atomic_write_json(manifest_path(cache_dir), to_dict(manifest))


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    """Read and validate a manifest; the schema version is checked before anything else."""
    path = manifest_path(cache_dir)
    if not Path(cache_dir).is_dir():
        raise FileNotFoundError(
            f"cache folder {cache_dir} does not exist; run `kdpipe cache-teacher --out {cache_dir}`"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {cache_dir} is not a kdpipe cache; "
            f"run `kdpipe cache-teacher --out {cache_dir}` first"
        )
    return read_manifest_file(path)


def read_manifest_file(path: Path) -> CacheManifest:
    """Read and validate a manifest-shaped file (`manifest.json` or a worker's part)."""
    data = read_json(path)
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise CacheFormatError(f"{path}: no integer 'schema_version'; not a kdpipe manifest")
    if version > MANIFEST_SCHEMA_VERSION:
        raise CacheFormatError(
            f"{path}: written with cache schema version {version} by kdpipe "
            f"{data.get('kdpipe_version', '?')}; this kdpipe ({__version__}) reads up to version "
            f"{MANIFEST_SCHEMA_VERSION}: upgrade kdpipe"
        )
    if version < 1:
        raise CacheFormatError(f"{path}: cache schema version {version} does not exist; "
                               "re-create the cache with `kdpipe cache-teacher --overwrite`")
    if version == 1:
        data = _upgrade_v1(data)
    manifest = from_dict(CacheManifest, data, str(path))
    manifest.validate(str(path))
    return manifest


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 manifest in version 2 form, describing the same bytes.

    Version 1 caches computed their softmax over the teacher's whole head, so its width is
    their support; they encoded documents without special tokens and did not record the
    tokenizer's mapping. The settings fingerprint is unchanged (`settings` leaves out values
    that equal version 1's).
    """
    upgraded = dict(data)
    if isinstance(data.get("vocab_size"), int):
        upgraded.setdefault("teacher_head_width", data["vocab_size"])
    upgraded.setdefault("add_special_tokens", False)
    if isinstance(data.get("tokenizer"), dict):
        upgraded["tokenizer"] = {"vocab_fingerprint": "", **data["tokenizer"]}
    upgraded["schema_version"] = MANIFEST_SCHEMA_VERSION
    return upgraded
