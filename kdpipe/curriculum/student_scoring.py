"""One no-grad pass of a student checkpoint over a cache: its confidence on every sample.

Used by `kdpipe build-curriculum --source student`. Per sample, over its target tokens y_t:
mean NLL = mean_t -log p_S(y_t), confidence = mean_t p_S(y_t), entropy = mean_t H(p_S(·|t))
(nats, full vocabulary). Reuses the trainer's loader and head split (pipeline may import
trainer, never the reverse), so the student sees exactly the token sequences training would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.model_parts import ModelParts
from kdpipe.progress import Progress, bars_shown, library_bars
from kdpipe.schemas.cache import Cache
from kdpipe.schemas.errors import NonFiniteError
from kdpipe.schemas.shard_reader import Columns, build_index
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.model import autocast, autocast_dtype, open_student

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentScores:
    sample_ids: np.ndarray  # (n,) int64, storage order
    nll: np.ndarray  # (n,) float64 mean -log p_S(y_t)
    confidence: np.ndarray  # (n,) float64 mean p_S(y_t)
    entropy: np.ndarray  # (n,) float64 mean entropy of p_S


@torch.no_grad()
def score_student(cache: Cache, student: str, tokenizer: str | None = None,
                  batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                  chunk_size: int = 1024, progress: bool = True,
                  trust_remote_code: bool = False) -> StudentScores:
    """Mean NLL, confidence and entropy of `student` on every sample of `cache`."""
    manifest = cache.manifest
    torch_device = resolve_device(device)
    with library_bars(bars_shown(progress)):  # transformers' "Loading weights"
        parts = open_student(cache, torch_device, student=student, tokenizer=tokenizer,
                             trust_remote_code=trust_remote_code).parts
    parts.model.eval()
    amp = autocast_dtype(dtype, torch_device)
    index = build_index(cache)
    columns = Columns(teacher=False, top_k=manifest.top_k)
    pad_id = manifest.tokenizer.pad_token_id or 0
    sums = np.zeros((len(index), 3), dtype=np.float64)  # Σ nll, Σ p, Σ entropy per sample
    tokens = np.zeros(len(index), dtype=np.int64)
    position = {int(s): i for i, s in enumerate(index.sample_ids)}
    # Storage order: the LRU alone decodes each row group once; nothing to read ahead.
    loader = BatchLoader(index, index.sample_ids, columns, batch_size, 1, pad_id,
                         cached_groups=2, read_ahead=1)
    with loader, Progress("score-student", len(loader), unit="batch", progress=progress) as bar:
        for global_batch in loader:
            for cpu_batch in global_batch.micro:
                mb = cpu_batch.to(torch_device)
                with autocast(torch_device, amp):
                    hidden = parts.hidden_states(mb.input_ids, mb.attention_mask,
                                                 mb.segments)  # (B, T, H)
                hidden = hidden[mb.target_mask]  # (N, H)
                per_token = _token_stats(parts, hidden, mb.labels, chunk_size,
                                         torch_device, amp, manifest.vocab_size)  # (N, 3)
                rows = cpu_batch.sample_ids.numel()
                by_row = torch.zeros(rows, 3, dtype=torch.float64, device=per_token.device)
                by_row.index_add_(0, mb.target_row, per_token.double())
                counts = torch.bincount(mb.target_row, minlength=rows)
                for sid, stats, n in zip(cpu_batch.sample_ids.tolist(), by_row.cpu().numpy(),
                                         counts.tolist(), strict=True):
                    sums[position[sid]] = stats
                    tokens[position[sid]] = n
            bar.update(1)
    means = sums / np.maximum(tokens, 1)[:, None]
    if not np.isfinite(means).all():
        bad = int(index.sample_ids[np.flatnonzero(~np.isfinite(means).all(axis=1))[0]])
        raise NonFiniteError(f"--student {student}: its scores are not finite (sample {bad}); "
                             "score it in float32 (--dtype float32) or check its weights")
    if np.any(tokens == 0):
        log.warning("%d samples have no target token; their scores are 0",
                    int((tokens == 0).sum()))
    return StudentScores(index.sample_ids.copy(), means[:, 0], means[:, 1], means[:, 2])


def _token_stats(parts: ModelParts, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                 device: torch.device, amp: torch.dtype | None, vocab_size: int) -> torch.Tensor:
    """(N, H) hidden, (N,) labels → (N, 3) float32 [-log p(y), p(y), entropy], in chunks,
    over the tokenizer's `vocab_size` real ids (as in training: padding rows left out)."""
    out = torch.empty(labels.shape[0], 3, dtype=torch.float32, device=hidden.device)
    for start in range(0, labels.shape[0], chunk_size):
        with autocast(device, amp):
            z = parts.logits(hidden[start:start + chunk_size])[:, :vocab_size]  # (n, V)
        logp = torch.log_softmax(z.float(), dim=-1)  # (n, V)
        y = labels[start:start + chunk_size]
        nll = -logp.gather(1, y[:, None])[:, 0]
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
        out[start:start + chunk_size] = torch.stack([nll, torch.exp(-nll), entropy], dim=1)
    return out
