"""Several teachers in one run: their caches, checked to align, and the weight of each.

    L = (1 - λ) · CE + λ · τ² · Σ_j w_j · KD_j

with KD_j the --loss divergence on teacher j's own top-k + tail partition (or its sampled
ids), one cache per teacher (`--cache A --cache B ...`, teacher 1 the first). Per target
token the mixture weights form a (J, N) tensor whose columns sum to 1; a `TeacherWeightsFn`
gives it for each micro-batch. `FixedTeacherWeights` broadcasts --teacher-weight;
selective reliance across teachers (per sample or per token, from each teacher's cached
confidence) plugs in as another `TeacherWeightsFn`.

The first cache supplies the inputs (token ids, masks, the student's tokenizer and every
default that follows from a cache); the others only their teacher targets, read in lockstep
(`data.BatchLoader`). `open_teachers` refuses caches that do not cover the same sequences
(`schemas.cache_alignment`) before the run writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.cache_alignment import alignment_difference
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.shard_reader import CacheIndex, build_index
from kdpipe.schemas.vocab import compare_vocab, real_vocab_size
from kdpipe.tokenizer_identity import cache_tokenizer

if TYPE_CHECKING:
    from kdpipe.trainer.data import Batch, GlobalBatch


class TeacherWeightsFn(Protocol):
    """The (J, N) weights of the teachers' KD terms for one micro-batch.

    `start_step` is called once per optimizer step on every process, before its
    micro-batches, with this process's share of the global batch (a hook for weights that
    depend on the whole step, e.g. a control matching a step's mean weight per teacher; it
    may use collectives, as every rank calls it alike). Then the function is called once per
    micro-batch with the batch on its device: `batch.sample_ids` (B,), `batch.target_row`
    (N,) the batch row of each target, and `batch.teachers[j]` with teacher j's targets,
    whose `target_logprob` (N,) (log p_T(y_t)) is read when `target_logprob` is True. It
    returns float32 (J, N) on the batch's device, each column summing to 1 (`per_token`
    expands per-sample (J, B) weights). Both must be deterministic in (batch, step) for
    --resume to be exact.
    """

    target_logprob: bool  # whether the loader must read each teacher's target_logprob

    def start_step(self, batch: GlobalBatch, step: int) -> None:
        ...

    def __call__(self, batch: Batch, step: int) -> torch.Tensor:
        ...


class FixedTeacherWeights:
    """The same weights for every token: --teacher-weight, normalised (`LossConfig.teacher_mix`)."""

    target_logprob = False

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = torch.tensor(list(weights), dtype=torch.float32)  # (J,)

    def start_step(self, batch: GlobalBatch, step: int) -> None:
        """Nothing to prepare: the weights never change."""

    def __call__(self, batch: Batch, step: int) -> torch.Tensor:
        weights = self.weights.to(batch.labels.device)
        return weights[:, None].expand(-1, batch.num_targets)  # (J, N)


def per_token(weights: torch.Tensor, target_row: torch.Tensor) -> torch.Tensor:
    """Per-sample weights (J, B) as per-token weights (J, N): each target takes its row's."""
    return weights[:, target_row]


def open_teachers(caches: Sequence[str], first: CacheIndex, flag: str = "--cache", *,
                  verify_reads: bool = True, local_cache: str | None = None
                  ) -> tuple[CacheIndex, ...]:
    """Indexes of `caches[1:]`, each checked to cover the same sequences as `first` (the
    index of `caches[0]`). Raises ConfigError naming both caches and the first difference."""
    found = []
    for path in caches[1:]:
        cache = open_cache(path, verify_reads=verify_reads, local_cache=local_cache, flag=flag)
        index = build_index(cache)
        check_aligned(first, index, (f"{flag} {caches[0]}", f"{flag} {path}"))
        found.append(index)
    return tuple(found)


def check_aligned(first: CacheIndex, other: CacheIndex, names: tuple[str, str]) -> None:
    """Raise ConfigError unless `other` covers the same sequences as `first` (same tokenizer
    mapping, sample ids and input_ids per sample id; `schemas.cache_alignment`). `names`:
    how to call the two caches ("--cache A", "--cache B")."""
    difference = alignment_difference(first, other)
    if difference is None:
        return
    if difference.startswith("their tokenizers"):
        difference += mapping_detail(first.cache, other.cache, names)
    raise ConfigError(f"{names[1]} does not cover the same sequences as {names[0]}: "
                      f"{difference}; cache every teacher over the same data with the same "
                      "tokenizer and --max-length (docs/training.md, \"Several teachers\")")


def mapping_detail(cache: Cache, other: Cache, names: tuple[str, str]) -> str:
    """' (id 17 is 'a' in A's tokenizer but 'b' in B's)', when both caches still have their
    tokenizers to compare id by id; else ''."""
    ours, theirs = cache_tokenizer(cache), cache_tokenizer(other)
    if ours is None or theirs is None:
        return ""
    found = compare_vocab(ours, theirs, real_vocab_size(ours),
                          (f"{names[0]}'s tokenizer", f"{names[1]}'s")).mismatch
    return f" ({found})" if found else ""
