"""The compact top-k encoding: round trip, error bounds, order, saturation, schema, fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from kdpipe.schemas.encoding import LOGPROB_STEP, decode_topk, encode_topk
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.shard import TOPK_ID_DELTAS, TOPK_IDS, TOPK_LOGPROB_Q, ShardLayout


def _teacher_rows(n: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(ids, log-probs, tail log-mass) of n random peaked distributions, top-k descending."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, vocab)) * rng.uniform(0.5, 6.0, (n, 1))  # (n, V)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1)[:, :k]  # (n, k)
    top = np.take_along_axis(logp, ids, axis=1)
    tail = np.log1p(-np.exp(top).sum(1))
    return ids, top, tail


def _partition_kl(top: np.ndarray, tail: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """KL(exact top-k + tail || decoded top-k + exact tail, renormalised), per row."""
    p = np.concatenate([top, tail[:, None]], axis=1)
    q = np.concatenate([decoded, tail[:, None]], axis=1)
    q = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    return (np.exp(p) * (p - q)).sum(1)


def test_round_trip_is_within_half_a_step_in_plain_order() -> None:
    ids, top, tail = _teacher_rows(500, 64, 4096)
    deltas, levels = encode_topk(ids, top)
    assert levels.dtype == np.uint16 and (deltas[:, 1:] >= 1).all()
    out_ids, out_lp = decode_topk(deltas.reshape(-1), levels.reshape(-1), 64)
    out_ids, out_lp = out_ids.reshape(-1, 64), out_lp.reshape(-1, 64)
    assert out_lp.dtype == np.float32
    assert (np.diff(out_lp, axis=1) <= 0).all()  # descending, like the plain encoding
    # Same (id, log-prob) pairs: look each decoded id up among the exact ones.
    rows = np.arange(ids.shape[0])[:, None]
    exact = np.full((ids.shape[0], 4096), np.nan)
    exact[rows, ids] = top
    assert not np.isnan(exact[rows, out_ids]).any()
    error = np.abs(exact[rows, out_ids] - out_lp)
    assert error.max() <= LOGPROB_STEP / 2 + 1e-6
    decoded = np.full_like(exact, np.nan)
    decoded[rows, out_ids] = out_lp
    kl = _partition_kl(top, tail, decoded[rows, ids])  # aligned with the exact top-k
    assert kl.max() <= LOGPROB_STEP**2 / 8 + 1e-9  # Hoeffding bound, any distribution
    assert kl.mean() < 2e-4


def test_ties_and_saturation() -> None:
    ids = np.array([[7, 3, 9, 1]])
    lp = np.array([[-0.01, -0.01, -50.0, -np.inf]])
    deltas, levels = encode_topk(ids, lp)
    assert deltas.tolist() == [[1, 2, 4, 2]]  # ascending ids 1, 3, 7, 9
    out_ids, out_lp = decode_topk(deltas.reshape(-1), levels.reshape(-1), 4)
    assert out_ids.tolist() == [3, 7, 9, 1]  # ties in ascending id order
    assert out_lp[2] == pytest.approx(-50.0)
    assert out_lp[3] == pytest.approx(-65535 * LOGPROB_STEP)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        encode_topk(np.array([[2, 2]]), np.array([[-1.0, -2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        encode_topk(np.array([[1, 2]]), np.array([[np.nan, -2.0]]))
    with pytest.raises(CacheFormatError, match="kdpipe verify"):
        decode_topk(np.ones(5, np.uint16), np.ones(5, np.uint16), 4)


def test_layout_schema_names_the_compact_columns() -> None:
    plain = ShardLayout("uint16", "float16", False).schema()
    compact = ShardLayout("uint32", "float16", True, "compact").schema()
    assert TOPK_IDS in plain.names and TOPK_ID_DELTAS not in plain.names
    assert TOPK_IDS not in compact.names
    assert str(compact.field(TOPK_ID_DELTAS).type.value_type) == "uint32"
    assert str(compact.field(TOPK_LOGPROB_Q).type.value_type) == "uint16"
    with pytest.raises(KeyError):
        ShardLayout("uint16", "float16", False, "zip").schema()
