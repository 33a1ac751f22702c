"""Packed sequences without cross-talk: the forward inputs that keep documents apart.

A packed sequence joins several documents; run as one plain causal sequence, every token
would attend to the documents before it in the row, and the teacher's targets (or the
student's predictions) would depend on what happened to be packed alongside. Both stages
therefore run a packed batch with `forward_inputs`, and check once at load time
(`check_packing`) that the model honours them. The teacher and the student both import
this module, so they see exactly the same layout. docs/packing.md has the mechanism per
attention implementation and what was tested.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from kdpipe.schemas.errors import ConfigError

log = logging.getLogger(__name__)

# Lengths of the documents of one row, or None for one document over the row's real tokens.
RowSegments = Sequence[int] | None

# The load-time check: two short documents packed into one row, each also run alone.
CHECK_LENGTHS = (5, 3)
CHECK_PADDING = 2
# A model honouring the inputs reproduces a document alone up to rounding; one ignoring them
# shows the full cross-talk (the plain concatenation's difference). Comparing the two keeps
# 16-bit rounding, which grows with depth, from reading as cross-talk.
LEAK_SHARE = 0.1
# Below this, relative to the logits' scale, a difference is float32 rounding whatever the
# cross-talk: a model that barely reads its context is not refused for it.
NOISE_FLOOR = 1e-4
REMEDIES = {"teacher": "cache without --pack",
            "student": "train from a cache made without --pack"}


def _starts(lengths: list[int], segments: Sequence[RowSegments], width: int) -> list[list[int]]:
    """Per row, the offsets where a document (or the padding tail) begins. Raises ValueError
    when a row's segments are not positive lengths summing to its real tokens."""
    if len(segments) != len(lengths):
        raise ValueError(f"{len(segments)} rows of segments for a batch of {len(lengths)}")
    starts = []
    for row, (length, row_segments) in enumerate(zip(lengths, segments, strict=True)):
        if row_segments is None:
            sizes = [length] if length else []
        else:
            sizes = [int(n) for n in row_segments]
        if any(n <= 0 for n in sizes) or sum(sizes) != length:
            raise ValueError(f"row {row}: segments {sizes} must be positive lengths summing to "
                             f"its {length} real tokens")
        offsets = [0]
        for n in sizes:  # the padding tail, if any, begins where the last document ends
            offsets.append(offsets[-1] + n)
        starts.append(offsets if length < width else offsets[:-1])
    return starts


def forward_inputs(attention_mask: torch.Tensor, segments: Sequence[RowSegments] | None,
                   config: Any) -> dict[str, Any]:
    """Keyword arguments for a causal LM's forward (or its body's) over a right-padded batch.

    `attention_mask` (B, T): 1 on real tokens, 0 on the padding after them. `segments`: per
    row, the lengths of the documents packed into it (summing to its real tokens), or None
    for one document; `segments=None` (an unpacked batch) gives today's plain inputs.
    `config`: the model's config (`model.config`), whose attention implementation decides
    whether flash-attention's varlen arguments are added.

    For a packed batch: `position_ids` (B, T) restarting at 0 at every document and at the
    padding tail, `attention_mask=None` and `use_cache=False`. transformers (masking_utils)
    then finds the documents from the position ids and builds a block-diagonal causal mask
    for sdpa, eager and flex, composed with any sliding window. flash-attention reads the
    position ids only for a batch of one row, so for it the documents' cumulative offsets in
    the flattened (B·T) batch are passed too (`cu_seq_lens_q/k`, `max_length_q/k`). The
    padding tail is a document of its own: no real token attends to it.

    Raises ValueError when the mask is not right-padded 0/1 or a row's segments do not sum
    to its real tokens.
    """
    if segments is None:
        return {"attention_mask": attention_mask, "use_cache": False}
    batch, width = attention_mask.shape
    lengths = attention_mask.sum(-1)  # (B,)
    arange = torch.arange(width, device=attention_mask.device)  # (T,)
    if not torch.equal(attention_mask.long(), (arange < lengths[:, None]).long()):
        raise ValueError("attention_mask must be 1 on each row's real tokens, then 0 "
                         "(right padding)")
    starts = _starts(lengths.tolist(), segments, width)
    begins = torch.zeros((batch, width), dtype=torch.bool)  # (B, T): a document begins here
    for row, offsets in enumerate(starts):
        begins[row, offsets] = True
    begins = begins.to(attention_mask.device)
    # Each token's position is its distance from the latest document start at or before it.
    latest = torch.where(begins, arange, 0).cummax(dim=-1).values  # (B, T)
    inputs: dict[str, Any] = {"attention_mask": None, "position_ids": arange - latest,
                              "use_cache": False}
    if "flash" in str(getattr(config, "_attn_implementation", None) or ""):
        # Offsets of every document in the flattened (B·T) batch, then its end.
        flat = [row * width + offset for row, offsets in enumerate(starts) for offset in offsets]
        flat.append(batch * width)
        longest = max(end - start for start, end in itertools.pairwise(flat))
        bounds = torch.tensor(flat, dtype=torch.int32, device=attention_mask.device)
        inputs |= {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                   "max_length_q": longest, "max_length_k": longest}
    return inputs


def _logits(model: Any, input_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
    return model(input_ids=input_ids, **inputs).logits.float()


@torch.no_grad()
def check_packing(model: Any, role: str, name: str) -> None:
    """Refuse a causal LM that lets packed documents attend to each other.

    Runs two short random documents packed into a row (both orders, then padding) with
    `forward_inputs`, and each document alone, on the model's device, in eval mode; compares
    the logits of the second document of each row with its logits alone. A model that
    ignores position ids or masks (remote code, an exotic attention, an older transformers)
    shows the cross-talk. `role`: "teacher" or "student"; `name`: the model as the user
    named it. Call once at load time, only for a packed cache: it costs three tiny forwards.

    Raises ConfigError (one line: the model, the remedy) when the packed logits differ.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(vocab, (n,), generator=generator) for n in CHECK_LENGTHS]
    orders = [(docs[0], docs[1]), (docs[1], docs[0])]  # each document second in one row
    width = sum(CHECK_LENGTHS) + CHECK_PADDING
    input_ids = torch.zeros((len(orders), width), dtype=torch.long)  # (2, T) right-padded
    input_ids[:, : width - CHECK_PADDING] = torch.stack([torch.cat(pair) for pair in orders])
    mask = torch.zeros_like(input_ids)  # (2, T)
    mask[:, : width - CHECK_PADDING] = 1
    segments = [[len(doc) for doc in pair] for pair in orders]
    input_ids, mask = input_ids.to(device), mask.to(device)

    was_training = model.training
    model.eval()
    try:
        alone = [_logits(model, second[None].to(device), use_cache=False)[0]
                 for _, second in orders]
        packed = _logits(model, input_ids, **forward_inputs(mask, segments, model.config))
        joined = _logits(model, input_ids, attention_mask=mask, use_cache=False)
    finally:
        model.train(was_training)

    def gap(logits: torch.Tensor) -> float:
        """Largest difference between each row's second document and that document alone."""
        return max(float((logits[row, len(first):len(first) + len(ref)] - ref).abs().max())
                   for row, ((first, _), ref) in enumerate(zip(orders, alone, strict=True)))

    leak, crosstalk = gap(packed), gap(joined)
    scale = max(float(ref.abs().max()) for ref in alone)
    log.info("packing check, %s %s: packed documents differ from alone by %.3g, plain "
             "concatenation by %.3g", role, name, leak, crosstalk)
    if leak > max(LEAK_SHARE * crosstalk, NOISE_FLOOR * scale):
        implementation = getattr(model.config, "_attn_implementation", None) or "custom"
        raise ConfigError(
            f"the {role} {name} lets packed documents attend to each other (its "
            f"{implementation} attention ignores position_ids and masks: logits differ by "
            f"{leak:.3g}); {REMEDIES[role]}")
