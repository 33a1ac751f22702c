"""The compact top-k encoding (`--encoding compact`): sorted, delta-coded ids and quantised
log-probs with a bounded error. Numpy only, so both the writer and the trainer use it.

Per target position the k (id, log-prob) pairs are stored in ascending id order:

* `topk_id_deltas`: the first id, then id_j - id_{j-1} (>= 1, ids are distinct). Sorted ids
  of one position are close together, so the deltas are small. Parquet's own delta encoding
  (DELTA_BINARY_PACKED on the sorted ids) cannot replace this step: its blocks span
  positions, and each position's restart at a small id widens every block's bit width
  (measured 0.6-1.1 bytes per entry larger; docs/benchmarks.md).
* `topk_logprob_q`: Q_j = round(-l_j / LOGPROB_STEP) as uint16 (saturating at 65535, i.e.
  l < -4096 nats, mass below e^-4096, which the model cannot tell from zero).

Decoding gives l_j = -Q_j * LOGPROB_STEP, so every log-prob is off by at most STEP / 2 =
1/32 nats. The trainer renormalises the (k + 1)-point partition, and by Hoeffding's lemma
KL(exact || decoded) = log E_p[e^ε] - E_p[ε] <= (max ε - min ε)² / 8 <= STEP² / 8 ≈ 4.9e-4
nats per position whatever the distribution (measured means ~1e-4; sizes in
docs/cache-format.md, "Which encoding to choose"). The decoder returns the
pairs in descending log-prob order (ties: ascending id), the order of the plain encoding.
docs/cache-format.md ("Compact encoding") specifies the bytes.
"""

from __future__ import annotations

import numpy as np

from kdpipe.schemas.errors import CacheFormatError

ENCODINGS = ("plain", "compact")
LOGPROB_STEP = 1.0 / 16.0  # nats per quantisation level: error <= 1/32, KL <= 4.9e-4
Q_MAX = np.iinfo(np.uint16).max  # saturating level: l < -Q_MAX * STEP decodes as -4095.9


def encode_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id deltas (n, k) int64, quantised log-probs (n, k) uint16) in ascending id order.

    topk_ids (n, k): distinct ids per row, any order. topk_logprobs (n, k): log-probs <= 0
    (NaN is refused; -inf saturates).
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if ids.shape != lp.shape or ids.ndim != 2:
        raise ValueError(f"expected matching (n, k) ids and log-probs, got {ids.shape} and "
                         f"{lp.shape}")
    if np.isnan(lp).any():
        raise ValueError("top-k log-probs contain NaN; the teacher's output is broken")
    order = np.argsort(ids, axis=1, kind="stable")  # (n, k)
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    deltas = np.diff(sorted_ids, axis=1, prepend=0)  # (n, k); column 0 is the smallest id
    if ids.shape[1] > 1 and (deltas[:, 1:] < 1).any():
        raise ValueError("top-k ids repeat within a position; they must be distinct")
    levels = np.clip(np.rint(-np.take_along_axis(lp, order, axis=1) / LOGPROB_STEP), 0, Q_MAX)
    return deltas, levels.astype(np.uint16)


def decode_topk(id_deltas: np.ndarray, logprob_q: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flat stored columns (n * k,) -> (ids (n * k,) int64, log-probs (n * k,) float32).

    The result has the plain encoding's layout: flat with stride k, each position's pairs in
    descending log-prob order.
    """
    if id_deltas.size != logprob_q.size or id_deltas.size % max(k, 1):
        raise CacheFormatError(f"compact top-k columns hold {id_deltas.size} ids and "
                               f"{logprob_q.size} log-probs, not a multiple of k = {k}; run "
                               "`kdpipe verify` on the cache")
    ids = np.cumsum(id_deltas.reshape(-1, k).astype(np.int64), axis=1)  # (n, k) ascending
    levels = logprob_q.reshape(-1, k)  # (n, k)
    order = np.argsort(levels, axis=1, kind="stable")  # smallest level = largest log-prob
    ids = np.take_along_axis(ids, order, axis=1)
    lp = np.take_along_axis(levels, order, axis=1).astype(np.float32) * np.float32(-LOGPROB_STEP)
    return ids.reshape(-1), lp.reshape(-1)


# --- Sampled caches (`--cache-mode sampled`) -------------------------------------------------
# Per target position: the unique ids among N teacher samples, ascending and delta-coded like
# the compact top-k ids, their counts, and how many unique ids the position has.

CACHE_MODES = ("topk", "sampled")
MAX_SAMPLES = int(np.iinfo(np.uint8).max)  # counts and lengths are stored as uint8


def delta_encode_segments(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Ascending ids (flat, one segment per position) -> deltas; each segment restarts at 0."""
    ids = np.asarray(ids, dtype=np.int64)
    deltas = np.diff(ids, prepend=0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    starts = starts[np.asarray(lengths) > 0]
    deltas[starts] = ids[starts]
    return deltas


def decode_sampled(id_deltas: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids (entries,) int64, offsets (positions + 1,) int64) from the stored delta column."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if int(offsets[-1]) != id_deltas.size:
        raise CacheFormatError(f"sampled columns: lengths sum to {int(offsets[-1])} but "
                               f"{id_deltas.size} ids are stored; run `kdpipe verify`")
    running = np.cumsum(id_deltas.astype(np.int64))
    before = np.concatenate([[0], running])[offsets[:-1]]  # running sum before each position
    return running - np.repeat(before, lengths), offsets
