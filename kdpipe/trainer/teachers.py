"""Several teachers in one run: their caches, checked to align, and the weight of each.

    L = (1 - λ) · CE + λ · τ² · Σ_j w_j · KD_j

with KD_j the --loss divergence on teacher j's own top-k + tail partition (or its sampled
ids), one cache per teacher (`--cache A --cache B ...`, teacher 1 the first). Per target
token the mixture weights form a (J, N) tensor whose columns sum to 1; a `TeacherWeightsFn`
gives it for each step's micro-batches. `FixedTeacherWeights` broadcasts --teacher-weight;
`RelianceTeacherWeights` is --teacher-reliance softmax|best (`teacher_reliance.py`: per
sample or per token, from each teacher's cached confidence, with its controls).

The first cache supplies the inputs (token ids, masks, the student's tokenizer and every
default that follows from a cache); the others only their teacher targets, read in lockstep
(`data.BatchLoader`). `open_teachers` refuses caches that do not cover the same sequences
(`schemas.cache_alignment`) before the run writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.cache_alignment import alignment_difference, manifest_difference
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.shard_reader import CacheIndex, build_index
from kdpipe.schemas.vocab import compare_vocab, real_vocab_size
from kdpipe.tokenizer_identity import cache_tokenizer

if TYPE_CHECKING:
    from kdpipe.trainer.data import GlobalBatch
    from kdpipe.trainer.distributed import RankSlice
    from kdpipe.trainer.teacher_reliance import TeacherReliance


class StepWeights(Protocol):
    """The teachers' weights of one optimizer step, for this process's micro-batches."""

    def tokens(self, micro: int, first_row: int, target_row: torch.Tensor) -> torch.Tensor:
        """(J, N) float32 weights of each target token of micro-batch `micro`, whose rows
        start at sample `first_row` of this process's share; `target_row` (N,) is each
        token's batch row. Each column sums to 1."""
        ...


class TeacherWeightsFn(Protocol):
    """Where the (J, N) weights of the teachers' KD terms come from, step by step.

    Called like `reliance.Reliance` for λ: once per optimizer step on every process (a
    padding rank too, so a control may use collectives), with the global batch's sample ids
    (S,), the step, this process's batch and its `share` (None: one process). The batch's
    micro-batches hold each teacher's targets (`Batch.teachers`), with their cached
    `target_logprob` (N,) when `target_logprob` is True, so per-sample and per-token
    reliance across teachers fit (`per_token` expands per-sample (J, B) weights). It must be
    deterministic in (sample ids, step, batch) for --resume to be exact.
    """

    target_logprob: bool  # whether the loader must read each teacher's target_logprob

    def for_step(self, global_ids: np.ndarray, step: int, batch: GlobalBatch,
                 share: RankSlice | None = None) -> StepWeights:
        ...


class FixedTeacherWeights:
    """The same weights for every token: --teacher-weight, normalised (`LossConfig.teacher_mix`)."""

    target_logprob = False

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = torch.tensor(list(weights), dtype=torch.float32)  # (J,)

    def for_step(self, global_ids: np.ndarray, step: int, batch: GlobalBatch,
                 share: RankSlice | None = None) -> FixedTeacherWeights:
        return self

    def tokens(self, micro: int, first_row: int, target_row: torch.Tensor) -> torch.Tensor:
        weights = self.weights.to(target_row.device)
        return weights[:, None].expand(-1, target_row.numel())  # (J, N)


class RelianceTeacherWeights:
    """--teacher-reliance softmax|best (`teacher_reliance.TeacherReliance`) as a
    TeacherWeightsFn: at the token level it hands over each micro-batch's (J, N) cached
    target log-probs."""

    def __init__(self, reliance: TeacherReliance) -> None:
        self.reliance = reliance
        self.target_logprob = reliance.level == "token" and reliance.mode != "fixed"

    def for_step(self, global_ids: np.ndarray, step: int, batch: GlobalBatch,
                 share: RankSlice | None = None) -> StepWeights:
        micro, samples = [], []
        if self.target_logprob:
            for mb in batch.micro:
                samples.append(mb.sample_ids.cpu()[mb.target_row.cpu()].numpy())  # (N_m,)
                logprobs = [t.target_logprob for t in mb.teachers]
                if any(lp is None for lp in logprobs):
                    raise ValueError("token-level teacher reliance needs every teacher's "
                                     "target_logprob; build the loader's Columns with "
                                     "target_logprob=True")
                micro.append(torch.stack(logprobs))  # type: ignore[arg-type]  # (J, N_m)
        return self.reliance.for_step(global_ids, step, micro, share, samples)


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
    refuse_unaligned(alignment_difference(first, other), first.cache, other.cache, names)


def check_manifests_aligned(first: Cache, other: Cache, names: tuple[str, str]) -> None:
    """Raise ConfigError, as `check_aligned` does, for what the two caches' manifests alone
    show (`cache_alignment.manifest_difference`; `--dry-run` opens no shard)."""
    refuse_unaligned(manifest_difference(first.manifest, other.manifest), first, other, names)


def refuse_unaligned(difference: str | None, first: Cache, other: Cache,
                     names: tuple[str, str]) -> None:
    """Raise the one-line ConfigError for `difference` (None: nothing to refuse)."""
    if difference is None:
        return
    if difference.startswith("their tokenizers"):
        difference += mapping_detail(first, other, names)
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
