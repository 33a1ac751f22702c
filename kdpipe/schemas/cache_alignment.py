"""Whether two caches cover the same sequences, so that one run can train on both at once
(several teachers, one per cache: docs/training.md, "Several teachers").

Two caches align when their tokenizers map ids alike (`manifest.same_mapping`), they select
the same target positions (`train_on`) and both record packed documents' `segments` or
neither, they hold the same sample ids, every sample id has the same `input_ids` in both, and
the same number of target positions. The teacher, top-k, encoding, tempered tails and shard
layout may differ. The positions of each sample's targets and its document boundaries
(the `segments` lengths) are not read here: the loader compares them row by row as it
decodes them (`trainer.data.collate`).

The token comparison is exact at one of two costs:

* **Same shard layout** (the same shard files, rows and sample id ranges, as two teachers
  cached over one corpus with the same --shard-size give): the manifests' per-shard
  `tokens_sha256` (sample ids and token ids, independent of encoding) are compared. Nothing is
  read beyond the manifests and the caches' indexes.
* **Any other layout**: the `sample_id` and `input_ids` columns of every row group of both
  caches are read once (the tokens only, not the teacher columns: about 2-4 bytes per token,
  a few percent of a cache) and each sequence is hashed (blake2b, 16 bytes, kept per sample).
"""

from __future__ import annotations

import hashlib

import numpy as np

from kdpipe.schemas import shard as cols
from kdpipe.schemas.manifest import CacheManifest, same_mapping
from kdpipe.schemas.shard_reader import CacheIndex


def alignment_difference(a: CacheIndex, b: CacheIndex) -> str | None:
    """The first way in which `b` does not cover the same sequences as `a`, as a phrase
    ("sample id 17 has other input_ids"), or None when they align.

    Reads the manifests and the indexes, and, only when the shard layouts differ, the token
    column of both caches (module docstring). Raises CacheFormatError for a shard that cannot
    be read.
    """
    ma, mb = a.cache.manifest, b.cache.manifest
    found = _settings_difference(ma, mb)
    if found is not None:
        return found
    ids_a, ids_b = np.sort(a.sample_ids), np.sort(b.sample_ids)
    if not np.array_equal(ids_a, ids_b):
        only_a = np.setdiff1d(ids_a, ids_b)
        if only_a.size:
            return f"sample id {int(only_a[0])} is in the first cache only"
        return f"sample id {int(np.setdiff1d(ids_b, ids_a)[0])} is in the second cache only"
    targets_a = a.num_targets[a.positions(ids_a)]
    targets_b = b.num_targets[b.positions(ids_a)]
    if not np.array_equal(targets_a, targets_b):
        first = int(ids_a[np.flatnonzero(targets_a != targets_b)[0]])
        return f"sample id {first} has other target positions"
    if _shard_layout(ma.shards) == _shard_layout(mb.shards):
        return _tokens_difference(ma, mb)
    digests_a, digests_b = _sequence_digests(a), _sequence_digests(b)
    differ = digests_a[a.positions(ids_a)] != digests_b[b.positions(ids_a)]
    if differ.any():
        return f"sample id {int(ids_a[np.flatnonzero(differ)[0]])} has other input_ids"
    return None


def manifest_difference(ma: CacheManifest, mb: CacheManifest) -> str | None:
    """The first difference between two caches that their manifests alone show (tokenizer
    mapping, target selection, segments recorded, numbers of sequences, tokens and targets,
    and with the same shard layout each shard's `tokens_sha256`), as a phrase; None when
    the manifests agree. `--dry-run` checks this much; the rest needs the shards. Whatever
    this finds, `alignment_difference` finds too (there per sample where it can)."""
    found = _settings_difference(ma, mb)
    if found is not None:
        return found
    for what, na, nb in (("sequences", ma.num_sequences, mb.num_sequences),
                         ("tokens", ma.num_tokens, mb.num_tokens),
                         ("target positions", ma.num_targets, mb.num_targets)):
        if na != nb:
            return f"the first holds {na:,} {what} and the second {nb:,} (their manifests)"
    if _shard_layout(ma.shards) == _shard_layout(mb.shards):
        return _tokens_difference(ma, mb)
    return None


def _settings_difference(ma: CacheManifest, mb: CacheManifest) -> str | None:
    if not same_mapping(ma, mb):
        return "their tokenizers map ids differently"
    if ma.train_on != mb.train_on:
        return f"targets at {ma.train_on} positions against {mb.train_on}"
    if ma.segments != mb.segments:
        return "one packs documents with recorded boundaries (segments), the other not"
    return None


def _tokens_difference(ma: CacheManifest, mb: CacheManifest) -> str | None:
    """Caches of one shard layout: the first shard whose `tokens_sha256` differs."""
    for sa, sb in zip(ma.shards, mb.shards, strict=True):
        if sa.tokens_sha256 != sb.tokens_sha256:
            return f"{sa.file} holds other input_ids (its tokens_sha256 differs)"
    return None


def _shard_layout(shards: tuple) -> list[tuple[str, int, int, int]]:
    return [(s.file, s.rows, s.first_sample_id, s.last_sample_id) for s in shards]


def _sequence_digests(index: CacheIndex) -> np.ndarray:
    """(n,) 16-byte blake2b of each sample's input_ids (as int64), in storage order."""
    digests = np.empty(len(index), dtype="S16")
    done = 0
    for shard in index.cache.manifest.shards:
        parquet = index.cache.open_shard(shard)
        try:
            for rg in range(parquet.num_row_groups):
                column = parquet.read_row_group(rg, columns=[cols.INPUT_IDS]).column(
                    cols.INPUT_IDS).combine_chunks()
                offsets = column.offsets.to_numpy().astype(np.int64)
                tokens = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                tokens_start = offsets[0]
                for r in range(offsets.size - 1):
                    seq = tokens[offsets[r] - tokens_start:offsets[r + 1] - tokens_start]
                    digests[done] = hashlib.blake2b(seq.tobytes(), digest_size=16).digest()
                    done += 1
        finally:
            parquet.close()
    assert done == len(index), "the index and the shards disagree on the number of rows"
    return digests
