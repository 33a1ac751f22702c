"""The teacher reduction equals an independent dense computation from the full logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.model_parts import ModelParts
from kdpipe.pipeline import teacher_hf
from kdpipe.pipeline.teacher_hf import teacher_targets

from ..families import FAMILIES, VOCAB, Family


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


def dense_reference(model: torch.nn.Module, seq: list[int], k: int, tau: float) -> dict:
    """Everything from full float64 log-softmax rows of one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].double()  # (T-1, V)
    lp = torch.log_softmax(logits, -1)
    labels = torch.tensor(seq[1:])
    order = torch.argsort(lp, dim=-1, descending=True)
    top = order[:, :k]
    rest = order[:, k:]
    p = lp.exp()
    lp_tau = torch.log_softmax(logits / tau, -1)
    target = lp.gather(1, labels[:, None])[:, 0]
    return {
        "topk_ids": top.numpy(),
        "topk_logprobs": lp.gather(1, top).numpy(),
        "tail": torch.log(p.gather(1, rest).sum(-1)).numpy() if rest.numel() else None,
        "tail_tau": torch.log(lp_tau.exp().gather(1, rest).sum(-1)).numpy(),
        "target": target.numpy(),
        "nll": float(-target.mean()),
        "entropy": float(-(p * lp).sum(-1).mean()),
        "confidence": float(target.exp().mean()),
        "top1": float((lp.argmax(-1) == labels).double().mean()),
    }


def test_targets_equal_dense_computation(teacher: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 320, size=n).tolist() for n in (17, 9, 2, 30)]  # padded batch
    k = 8
    outs = teacher_targets(teacher, seqs, k, temperatures=[2.0], pad_id=1)
    for seq, out in zip(seqs, outs, strict=True):
        ref = dense_reference(teacher, seq, k, tau=2.0)
        assert out.topk_ids.shape == (len(seq) - 1, k)
        np.testing.assert_array_equal(out.topk_ids, ref["topk_ids"])
        np.testing.assert_allclose(out.topk_logprobs, ref["topk_logprobs"], atol=2e-5)
        np.testing.assert_allclose(out.tail_logmass, ref["tail"], atol=2e-5)
        np.testing.assert_allclose(out.tail_logmass_tempered[:, 0], ref["tail_tau"], atol=2e-5)
        np.testing.assert_allclose(out.target_logprob, ref["target"], atol=2e-5)
        assert out.nll == pytest.approx(ref["nll"], abs=1e-4)
        assert out.entropy == pytest.approx(ref["entropy"], abs=1e-4)
        assert out.confidence == pytest.approx(ref["confidence"], abs=1e-5)
        assert out.top1 == pytest.approx(ref["top1"])


def test_target_outside_topk_is_still_exact(teacher: torch.nn.Module) -> None:
    seq = list(range(40, 80))
    out = teacher_targets(teacher, [seq], 1, temperatures=[], pad_id=1)[0]
    ref = dense_reference(teacher, seq, 1, tau=1.0)
    outside = out.topk_ids[:, 0] != np.array(seq[1:])
    assert outside.any()
    np.testing.assert_allclose(out.target_logprob, ref["target"], atol=2e-5)


def test_tail_is_stable_where_subtraction_underflows(teacher: torch.nn.Module) -> None:
    """A tail far below float32 epsilon is still exact (log(1 - sum) would give -inf or 0)."""
    seq = list(range(5, 25))
    vocab = 320
    out = teacher_targets(teacher, [seq], vocab - 3, temperatures=[], pad_id=1)[0]
    ref = dense_reference(teacher, seq, vocab - 3, tau=1.0)
    assert np.all(np.isfinite(out.tail_logmass))
    assert out.tail_logmass.max() < np.log(np.finfo(np.float32).eps)  # 1 - sum would be 0
    np.testing.assert_allclose(out.tail_logmass, ref["tail"], rtol=1e-4)


def test_k_equal_vocab_gives_an_empty_tail(teacher: torch.nn.Module) -> None:
    seq = list(range(10, 30))
    out = teacher_targets(teacher, [seq], 320, temperatures=[2.0], pad_id=1)[0]
    assert np.all(np.isneginf(out.tail_logmass))
    assert np.all(np.isneginf(out.tail_logmass_tempered))
    assert np.allclose(np.exp(out.topk_logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(out.nll) and np.isfinite(out.entropy)


def _columns(outs: list) -> dict[str, list[np.ndarray]]:
    return {name: [getattr(out, name) for out in outs]
            for name in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob",
                         "tail_logmass_tempered", "sampled_ids", "sampled_counts")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_elements", [2**26, 3 * 448])  # one chunk per row; 3 positions
def test_the_chunked_head_gives_the_bits_of_the_whole_forward(
        model_family: Callable[[str], Family], monkeypatch: pytest.MonkeyPatch, family: str,
        chunk_elements: int) -> None:
    # A padded head (qwen2), soft-capping (gemma2), tied and untied heads; a padded batch,
    # chosen target positions, a packed row, sampled draws and a tempered tail.
    monkeypatch.setattr(teacher_hf, "CHUNK_ELEMENTS", chunk_elements)
    model = AutoModelForCausalLM.from_pretrained(model_family(family).teacher).eval()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB, size=n).tolist() for n in (23, 9, 16)]
    masks = [None, np.arange(8) % 3 == 0, None]
    segments = [None, None, [10, 6]]
    options = dict(temperatures=[2.0], pad_id=0, samples=4, sample_ids=[5, 6, 7],
                   vocab_size=VOCAB, target_masks=masks, segments=segments)
    parts = teacher_hf.teacher_parts(model, family)
    assert isinstance(parts, ModelParts)
    whole = _columns(teacher_targets(model, seqs, 8, **options))
    chunked = _columns(teacher_targets(parts, seqs, 8, **options))
    for name, values in whole.items():
        for row, (expected, found) in enumerate(zip(values, chunked[name], strict=True)):
            assert expected.dtype == found.dtype, name
            np.testing.assert_array_equal(found, expected, err_msg=f"{name}, row {row}")


def test_a_head_that_cannot_be_split_off_runs_whole(
        teacher: torch.nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    class Doubled(torch.nn.Module):  # logits the body and head alone do not give
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.inner = model
            self.config = model.config
            self.base_model = model.base_model

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.inner.get_output_embeddings()

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.inner.get_input_embeddings()

        def forward(self, **inputs: object) -> object:
            out = self.inner(**inputs)
            out.logits = out.logits * 2
            return out

    doubled = Doubled(teacher).eval()
    with caplog.at_level("WARNING"):
        assert teacher_hf.teacher_parts(doubled, "doubled") is doubled
    assert "computes its logits differently" in caplog.text
    seq = list(range(2, 14))
    out = teacher_targets(doubled, [seq], 4, temperatures=[], pad_id=1)[0]
    with torch.no_grad():
        logits = 2 * teacher(torch.tensor([seq])).logits[0, :-1].double()
    np.testing.assert_array_equal(out.topk_ids, logits.topk(4).indices.numpy())
