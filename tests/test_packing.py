"""Packed documents read exactly as if alone, in the teacher's pass and the student's.

For every model family of `families.py` and every attention implementation that runs on a
CPU, the logits of each document inside a packed, right-padded batch must equal the logits of
that document run alone: through the whole model (the teacher's pass) and through body then
head (the student's pass). The plain concatenation must not (cross-talk is real), and the
load-time check must tell the two apart. flash-attention's dispatch in transformers runs here
with a pure-torch stand-in for its kernels; the real kernels run in the GPU test at the end.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import transformers.integrations.flash_attention as flash_integration
import transformers.modeling_flash_attention_utils as fa_utils
from transformers import AttentionInterface, AutoModelForCausalLM

from kdpipe.packing import check_packing, forward_inputs
from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.model import split_student

from .families import FAMILIES, VOCAB, Family

# float32, relative to the logits' scale (the Qwen heads' padding rows reach the hundreds):
# the same document, the same arithmetic up to summation order
RTOL = 1e-6
# Gemma 2 has no sdpa attention in transformers (softcapping); flex_attention is left out: on
# a CPU it needs torch.compile, and uncompiled it gave NaN even on unpacked batches.
IMPLEMENTATIONS = [(family, impl) for family in FAMILIES for impl in ("sdpa", "eager")
                   if (family, impl) != ("gemma2", "sdpa")]
# Rows of the packed batch: document lengths (None: one document over the row's real tokens)
# and real tokens. 21 tokens outrun Gemma 2's sliding window of 16, documents of 1 token and
# rows of 1, 3 and 4 documents, padded and not, share the batch.
ROWS: list[tuple[list[int] | None, int]] = [([21, 6, 1], 28), ([6, 1, 21, 4], 32), (None, 9)]
WIDTH = 32

Span = tuple[int, int, torch.Tensor]  # (row, first position, the document's ids)


def packed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[Any], list[Span]]:
    """(input_ids (B, T), attention_mask (B, T), segments, every document's place)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros((len(ROWS), WIDTH), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    spans: list[Span] = []
    for row, (lengths, real) in enumerate(ROWS):
        start = 0
        for length in lengths or [real]:
            doc = torch.randint(VOCAB, (length,), generator=generator)
            input_ids[row, start:start + length] = doc
            spans.append((row, start, doc))
            start += length
        mask[row, :real] = 1
    return input_ids, mask, [lengths for lengths, _ in ROWS], spans


def alone(model: Any, doc: torch.Tensor) -> torch.Tensor:
    """(L, V) logits of one document run by itself."""
    return model(input_ids=doc[None], use_cache=False).logits[0]


def worst_gap(model: Any, logits: torch.Tensor, spans: list[Span], skip_first: bool = False
              ) -> float:
    """Largest difference between a document's logits in the batch and alone, relative to
    the largest logit alone (`skip_first`: only documents with another before them)."""
    gaps = []
    for row, start, doc in spans:
        if not (skip_first and start == 0):
            reference = alone(model, doc).float()
            gap = (logits[row, start:start + len(doc)].float() - reference).abs().max()
            gaps.append(float(gap / reference.abs().max()))
    return max(gaps)


@pytest.fixture(scope="module")
def load(model_family: Callable[[str], Family]) -> Callable[[str, str], Any]:
    """`load(family, implementation)`: the family's 2-layer teacher, float32, eval mode."""
    loaded: dict[tuple[str, str], Any] = {}

    def get(family: str, implementation: str) -> Any:
        if (family, implementation) not in loaded:
            model = AutoModelForCausalLM.from_pretrained(
                model_family(family).teacher, dtype=torch.float32,
                attn_implementation=implementation)
            loaded[family, implementation] = model.eval()
        return loaded[family, implementation]

    return get


@pytest.mark.parametrize(("family", "implementation"), IMPLEMENTATIONS)
@torch.no_grad()
def test_every_packed_document_reads_as_if_alone(load: Callable[[str, str], Any], family: str,
                                                 implementation: str) -> None:
    model = load(family, implementation)
    input_ids, mask, segments, spans = packed_batch()
    logits = model(input_ids=input_ids, **forward_inputs(mask, segments, model.config)).logits
    assert worst_gap(model, logits, spans) < RTOL


@pytest.mark.parametrize(("family", "implementation"), IMPLEMENTATIONS)
@torch.no_grad()
def test_body_then_head_reads_as_if_alone(load: Callable[[str, str], Any], family: str,
                                          implementation: str) -> None:
    """The student's pass: the trainer runs the body, then the head (and any soft-cap)."""
    model = load(family, implementation)
    parts = split_student(model, family)
    input_ids, mask, segments, spans = packed_batch(seed=1)
    hidden = parts.body(input_ids=input_ids,
                        **forward_inputs(mask, segments, parts.body.config)).last_hidden_state
    assert worst_gap(model, parts.logits(hidden), spans) < RTOL


@pytest.mark.parametrize(("family", "implementation"), IMPLEMENTATIONS)
@torch.no_grad()
def test_without_the_inputs_documents_attend_to_each_other(
        load: Callable[[str, str], Any], family: str, implementation: str) -> None:
    """Cross-talk is real: the plain concatenation, and reset positions with the padding mask
    (transformers reads documents off the position ids only when no mask is given)."""
    model = load(family, implementation)
    input_ids, mask, segments, spans = packed_batch()
    positions = forward_inputs(mask, segments, model.config)["position_ids"]
    for inputs in ({"attention_mask": mask},
                   {"attention_mask": mask, "position_ids": positions}):
        logits = model(input_ids=input_ids, use_cache=False, **inputs).logits
        assert worst_gap(model, logits, spans, skip_first=True) > 1e-2


def test_inputs_restart_positions_and_keep_the_plain_batch_unpacked() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    segments = [[2, 3], [1, 4, 1], None]
    inputs = forward_inputs(mask, segments, None)
    assert inputs["attention_mask"] is None and inputs["use_cache"] is False
    assert inputs["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 0],
                                               [0, 1, 2, 3, 4, 5]]
    assert "cu_seq_lens_q" not in inputs
    assert forward_inputs(mask, None, None) == {"attention_mask": mask, "use_cache": False}


def test_flash_attention_gets_offsets_in_the_flattened_batch() -> None:
    class Config:
        _attn_implementation = "flash_attention_2"

    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    inputs = forward_inputs(mask, [[2, 3], [1, 4, 1]], Config())
    # row 0: documents at 0 and 2, padding at 5; row 1 (offset 6): at 6, 7 and 11; end 12
    assert inputs["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 7, 11, 12]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 4


@pytest.mark.parametrize(("mask", "segments", "message"), [
    ([[1, 1, 1, 0]], [[2, 2]], "summing to its 3 real tokens"),
    ([[1, 1, 1, 0]], [[3, 0]], "positive lengths"),
    ([[1, 1, 1, 0]], [[3], [1]], "2 rows of segments for a batch of 1"),
    ([[0, 1, 1, 1]], [[3]], "right padding"),
])
def test_inputs_refuse_a_layout_they_cannot_keep_apart(mask: list[list[int]], segments: Any,
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        forward_inputs(torch.tensor(mask), segments, None)


# flash-attention's kernels, in plain torch: (tokens, heads, dim) with cumulative offsets, as
# flash_attn_varlen_func; (B, T, heads, dim) as flash_attn_func. transformers' own dispatch
# (`_flash_attention_forward`: varlen offsets, unpadding, window and softcap arguments) runs
# unchanged on top of them.
def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0
                     ) -> torch.Tensor:
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(cu_seqlens_q.tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end])
        scores = scores * (softmax_scale or q.shape[-1] ** -0.5)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(end - start)
        allowed = i[:, None] >= i[None, :]
        if window_size[0] >= 0:
            allowed &= i[:, None] - i[None, :] <= window_size[0]
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", weights, v[start:end])
    return out


def flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    **kwargs: Any) -> torch.Tensor:
    batch, width = q.shape[:2]
    bounds = torch.arange(0, batch * width + 1, width, dtype=torch.int32)
    flat = (x.reshape(batch * width, *x.shape[2:]) for x in (q, k, v))
    return varlen_reference(*flat, bounds, bounds, width, width, **kwargs).view(q.shape)


@pytest.fixture()
def reference_flash(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """transformers' flash_attention_2 path, its kernels replaced by the references above.

    float32 queries stay float32: the real kernels need a 16-bit dtype, which transformers
    looks up on the module's first nn.Linear (GPT-2 has none: Conv1D), the references do not.
    """
    monkeypatch.setattr(flash_integration, "get_target_dtype", lambda query, module: None)
    patches = {"_loaded_implementation": "flash_attention_2", "_flash_fn": flash_reference,
               "_flash_varlen_fn": varlen_reference, "_pad_fn": fa_utils._pad_input,
               "_unpad_fn": fa_utils._unpad_input,
               "_process_flash_kwargs_fn": fa_utils._lazy_define_process_function(
                   varlen_reference)}
    for name, value in patches.items():
        monkeypatch.setattr(fa_utils, name, value)
    yield


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_flash_attention_varlen_keeps_documents_apart(
        reference_flash: None, model_family: Callable[[str], Family], family: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_family(family).teacher,
                                                 dtype=torch.float32).eval()
    # set directly: set_attn_implementation would look for the flash-attn package
    model.config._attn_implementation = "flash_attention_2"
    input_ids, mask, segments, spans = packed_batch(seed=2)
    inputs = forward_inputs(mask, segments, model.config)
    assert worst_gap(model, model(input_ids=input_ids, **inputs).logits, spans) < RTOL
    # Position ids alone reach flash-attention's varlen path only for a batch of one row.
    position_only = {k: v for k, v in inputs.items() if not k.startswith(("cu_", "max_"))}
    logits = model(input_ids=input_ids, **position_only).logits
    assert worst_gap(model, logits, spans, skip_first=True) > 1e-2
    check_packing(model, "teacher", family)


@pytest.mark.parametrize(("family", "implementation"), IMPLEMENTATIONS)
def test_check_accepts_models_that_keep_documents_apart(
        load: Callable[[str, str], Any], family: str, implementation: str) -> None:
    check_packing(load(family, implementation), "student", family)


def test_check_accepts_a_bfloat16_model(model_family: Callable[[str], Family]) -> None:
    """16-bit rounding differs between the packed and the lone run; it is not cross-talk."""
    model = AutoModelForCausalLM.from_pretrained(model_family("llama").teacher,
                                                 dtype=torch.bfloat16)
    check_packing(model, "teacher", "llama")


def ignores_masks(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, scaling: float | None = None, **kwargs: Any
                  ) -> tuple[torch.Tensor, None]:
    """An attention that is causal over the whole row whatever it is given."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize(("role", "remedy"), [("teacher", "; cache without --pack"),
                                              ("student", "; train from a cache made without")])
def test_check_refuses_an_attention_that_ignores_masks(
        model_family: Callable[[str], Family], role: str, remedy: str) -> None:
    AttentionInterface.register("whole_row_causal", ignores_masks)
    model = AutoModelForCausalLM.from_pretrained(model_family("qwen2").teacher,
                                                 dtype=torch.float32,
                                                 attn_implementation="whole_row_causal")
    model.train()
    with pytest.raises(ConfigError) as caught:
        check_packing(model, role, "qwen2-tiny")
    message = str(caught.value)
    assert message.startswith(f"the {role} qwen2-tiny lets packed documents attend to each "
                              "other (its whole_row_causal attention ignores position_ids "
                              "and masks")
    assert remedy in message and "\n" not in message
    assert model.training  # the check leaves the model as it found it


@pytest.mark.gpu
@torch.no_grad()
def test_real_flash_attention_keeps_documents_apart(
        model_family: Callable[[str], Family]) -> None:
    """The real flash-attn kernels, bfloat16 on a GPU (KDPIPE_REQUIRE_GPU=1: fail, not skip)."""
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU"
    elif importlib.util.find_spec("flash_attn") is None:
        reason = "flash-attn is not installed"
    if reason is not None:
        if os.environ.get("KDPIPE_REQUIRE_GPU") == "1":
            pytest.fail(f"KDPIPE_REQUIRE_GPU=1 but {reason}")
        pytest.skip(reason)
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(
            model_family(family).teacher, dtype=torch.bfloat16,
            attn_implementation="flash_attention_2").cuda().eval()
        input_ids, mask, segments, spans = packed_batch(seed=3)
        input_ids, mask = input_ids.cuda(), mask.cuda()
        spans = [(row, start, doc.cuda()) for row, start, doc in spans]
        inputs = forward_inputs(mask, segments, model.config)
        leak = worst_gap(model, model(input_ids=input_ids, **inputs).logits.float(), spans)
        crosstalk = worst_gap(model, model(input_ids=input_ids, attention_mask=mask).logits,
                              spans, skip_first=True)
        assert leak < 0.1 * crosstalk, family
        check_packing(model, "teacher", family)
