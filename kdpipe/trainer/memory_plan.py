"""`train-student --dry-run`: the memory one training process will need, from configs alone.

The student is built on the `meta` device from its transformers config (`AutoConfig`: no
weight file is read), with the run's real LoRA/DoRA wiring (peft on the meta model, the same
target modules as `adapters.py`), so the parameter counts are exact. The cache is read for
its manifest only (sequence length, vocabulary, sequence count). Nothing is trained and
nothing is written.

The estimate is a sum of parts, in bytes per process (docs/training.md, "A memory plan before
the run", works an example):

* **Weights**: frozen parameters 4 B each (a frozen base stays float32); trainable ones
  4 B (`fp32`, `bf16-mixed`) or 2 B (`bf16-master`); buffers as they are.
* **Gradients**: one per trainable parameter, in its dtype (4 or 2 B); under DDP (several
  processes, no FSDP) the gradient buckets hold a second copy (`gradient_as_bucket_view`
  is off).
* **Float32 masters** (`bf16-master`): 4 B per trainable parameter.
* **Optimizer state** per trainable tensor of n values (docs/training.md, "--optimizer"):
  `adamw` 8n B + a 4 B step; `adamw-8bit` 2n + 8⌈n/256⌉ + 2048 B (n ≥ 4096, else 8n);
  `adafactor` 4(r + c) B for an r × c matrix (4n for a vector) + a 4 B step; `sgd` 0, or
  4n B with --momentum.
* Under `--fsdp` with W processes every parameter, gradient and state tensor is split along
  its first dimension (⌈d₀ / W⌉ rows per process, as FSDP2's `fully_shard` pads them), and a
  process gathers, for the time it computes them, the whole root unit (embeddings, final norm,
  head) and two transformer blocks (the one computing and the one prefetched).
* **Activations** of one micro-batch of B sequences of T tokens (T: the manifest's
  max_length, which a packed cache fills), counted as the tensors autograd keeps for backward,
  in the style of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (Section 4.1, per layer and token: `sbh(34 + 5as/h)` bytes for a GPT
  block in 16 bits). For the Llama-style block that transformers runs (RMSNorm, rotary
  embeddings, gated MLP, SDPA/flash attention, no dropout), with hidden h, query width
  q = heads × head_dim, key/value width k = kv_heads × head_dim, intermediate i and a heads,
  the values kept per token and layer are

      6h + 2q + 2k + a + 4i + 2

  (layer input, two RMSNorms keeping input, normalised value and output, the residual sum;
  q, k, v after rotary, the attention output; the attention's log-sum-exp per head; gate,
  up, SiLU and product of the MLP; two RMS scalars), counted exactly on transformers' Llama
  (tests/trainer/test_memory_plan.py). A non-gated MLP (GPT-2, GPT-NeoX, Phi) keeps 2i
  instead of 4i. Eager attention also keeps the (T, T) probabilities of every head, in float32
  and in the compute dtype. Model-wide per token: the final norm (2h) and the rotary tables
  (2 × head_dim), and the hidden states of the target positions that the chunked head reads
  (h). Norms, residuals and rotary values are float32; matmul outputs are float32, or
  bfloat16 under autocast (`bf16-*`: an estimate not checked against a measurement).
  With `--gradient-checkpointing` a layer keeps only its input (h per token), and backward
  recomputes one layer at a time.
* **The chunked KD head** (`chunked_loss.py`), chunk = min(--chunk-size, B·T), on the path
  the run will take (`fused_head.fused_unsupported`). Checkpointed: it keeps only its chunks'
  input hidden states for backward; while it recomputes a chunk it holds about
  HEAD_CHUNK_COPIES float32 (chunk, head rows) tensors (logits, their exp and gradients:
  measured). Fused: FUSED_CHUNK_COPIES float32 (chunk, V) tensors (one more at τ ≠ 1 for
  forward KL, and a bfloat16 copy under autocast: estimated), and the head weight's float32
  gradient (when it trains), formed in the forward and held through backward.
* The **peak**: what is held across steps (weights, buffers, masters, optimizer state) plus
  the largest of three phases. Forward/backward, gradients aside: the activations kept, the
  target positions' hidden-state gradient (h per token), the larger of the head's chunk
  buffers and one layer's backward (with checkpointing: its recomputed activations), the
  gradients of earlier micro-batches with --grad-accum > 1, and under `bf16-mixed` the
  bfloat16 weight copies (2 B per value: autocast caches its casts of trainable weights until
  the forward ends, checkpointed or not; a frozen weight's cast lives only where a matmul
  saves it for backward: all of them, or one layer's with checkpointing, where the copies
  are gone before backward recomputes a layer). The end of backward: every gradient, with
  the first layer's activations and backward. The optimizer step: every gradient (under
  `bf16-master` their float32 copies on the masters, which replace the bfloat16 ones one by
  one) and the optimizer's temporaries: CPU_STEP_COPIES float32 copies of the largest tensor
  on a CPU, where torch's optimizers loop over the tensors (measured); a float32 copy of
  every trainable value on a GPU, where they use foreach kernels (not measured). A layer's
  backward adds about one gradient of the MLP's width per token over what it frees
  (measured).

The parts measured on CPU (head copies, optimizer temporaries, a layer's backward) and the
whole are checked against the peak of live tensor bytes in benchmarks/memory_plan.py
(docs/benchmarks.md): within 1% for full, LoRA, SGD, Adafactor, checkpointed, bf16-mixed and
bf16-master runs on CPU.
Parameters transformers keeps in float32 under `bf16-master` (MoE routers) are counted at
2 B; they are a few thousand values.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.hf_errors import refusal_reason, refusals
from kdpipe.model_parts import known_transform
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.manifest import CacheManifest
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer import adapters
from kdpipe.trainer.adapter_config import is_adapter_folder
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.fused_head import fused_unsupported
from kdpipe.trainer.model import check_vocab, student_model_config
from kdpipe.trainer.optimizers import BNB_MIN_8BIT_SIZE  # smaller tensors: float32 moments
from kdpipe.trainer.precision import resolve_precision
from kdpipe.trainer.run_dir import plan_run_dir
from kdpipe.trainer.teachers import check_manifests_aligned

log = logging.getLogger(__name__)

FLOAT32 = 4  # bytes
BFLOAT16 = 2
ADAM_STEP_BYTES = 4  # torch keeps each tensor's step count as a 0-dim float32 tensor
BNB_BLOCK = 256  # bitsandbytes' blockwise quantization: one float32 scale per 256 values
BNB_CODEBOOKS = 2 * 256 * FLOAT32  # two 256-entry float32 code books per tensor
# Float32 temporaries of the largest tensor during a CPU optimizer step (torch loops over the
# tensors there): AdamW's denominator and update, Adafactor's, SGD's weight-decayed gradient.
CPU_STEP_COPIES = {"adamw": 3, "adamw-8bit": 1, "adafactor": 2, "sgd": 1}
HEAD_CHUNK_COPIES = 6  # float32 (chunk, V) tensors while a head chunk is recomputed: measured
FUSED_CHUNK_COPIES = 1  # float32 (chunk, V) tensors of a fused head chunk at τ = 1: measured
PREFETCHED_BLOCKS = 2  # FSDP: the block computing and the next one, gathered
# Architectures whose MLP is fc → activation → fc (2i kept per token) rather than gated (4i).
PLAIN_MLP = ("gpt2", "gpt_neox", "phi", "starcoder2", "gpt_bigcode", "opt", "bloom", "falcon")
GIB = 1024**3


# --- the student, built without weights ------------------------------------------------------

def student_config(cfg: TrainConfig, manifest: CacheManifest) -> Any:
    """The transformers config of --student (its config.json, or the base of an adapter
    folder) or --student-config, without weights. Raises ConfigError naming the flag."""
    from transformers import AutoConfig

    if cfg.student_config is not None:
        tokenizer = manifest.tokenizer
        return student_model_config(cfg.student_config, manifest, {
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id})
    assert cfg.student is not None
    name, what = cfg.student, f"--student {cfg.student}"
    if is_adapter_folder(name):  # evaluated merged: its base's shape
        base = adapters.base_of(name)
        if base is None:
            raise ConfigError(f"{what}: its adapter_config.json names no base model")
        name, what = base, f"{what}: its base {base}"
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except refusals() as exc:
        raise ConfigError(f"{what}: cannot read a model config ({refusal_reason(exc)})"
                          ) from exc


def meta_student(cfg: TrainConfig, manifest: CacheManifest) -> nn.Module:
    """The student as training builds it (float32, the --attn-implementation, LoRA/DoRA
    adapters of the --lora-* flags or --peft-config) on the `meta` device: shapes, no data.

    Raises ConfigError as a real run does: a config transformers refuses, a head narrower
    than the cache's vocabulary, LoRA targets the model lacks (listing those it has).
    """
    from transformers import AutoModelForCausalLM

    config = student_config(cfg, manifest)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    name = cfg.student or cfg.student_config or "student"
    try:
        with torch.device("meta"):
            model: nn.Module = AutoModelForCausalLM.from_config(config, **kwargs)
    except refusals() as exc:  # e.g. an attention it does not implement
        flag = "--student" if cfg.student is not None else "--student-config"
        raise ConfigError(f"{flag} {name}: {refusal_reason(exc)}") from exc
    check_vocab(model, manifest, name)
    if cfg.adapter.enabled:
        model = adapters.new_adapters(model, cfg.adapter, adapters.lora_config(cfg.adapter,
                                                                               model))
    return model


# --- the parts of the estimate ---------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """The shape of one transformer block, from the model's config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool  # gate/up/down MLP (Llama) rather than fc → activation → fc (GPT-2)

    @classmethod
    def of(cls, config: Any) -> Block:
        """The block of a transformers config (its text config, for a multimodal one)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        intermediate = (getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                        or 4 * hidden)
        return cls(int(text.num_hidden_layers), hidden, heads, kv_heads, head_dim,
                   int(intermediate), str(getattr(text, "model_type", "")) not in PLAIN_MLP)

    def kept_per_token(self, matmul_bytes: int, seq_len: int, eager: bool,
                       frozen_norms: bool) -> int:
        """Bytes one layer keeps for backward per token (module docstring's formula);
        `frozen_norms`: the norms' weights do not train (adapters), so a norm does not keep
        its normalised value for the weight's gradient."""
        q, k = self.heads * self.head_dim, self.kv_heads * self.head_dim
        norms = 4 if frozen_norms else 6
        float32_values = norms * self.hidden + self.heads + 2  # norms, residuals, log-sum-exp
        matmul_values = 2 * q + 2 * k + (4 if self.gated else 2) * self.intermediate
        kept = FLOAT32 * float32_values + matmul_bytes * matmul_values
        if eager:  # softmax in float32, cast back to the compute dtype for P·V
            kept += self.heads * seq_len * (FLOAT32 + matmul_bytes)
        return kept

    def backward_per_token(self, matmul_bytes: int) -> int:
        """Bytes a layer's backward adds per token over what it frees as it goes: about one
        gradient of the MLP's intermediate width (measured)."""
        return matmul_bytes * self.intermediate


@dataclass(frozen=True)
class Tensors:
    """The parameter shapes of a model, trainable or frozen (tied parameters once)."""

    trainable: tuple[tuple[int, ...], ...]
    frozen: tuple[tuple[int, ...], ...]
    buffer_bytes: int

    @classmethod
    def of(cls, model: nn.Module) -> Tensors:
        params = list(model.parameters())
        return cls(tuple(tuple(p.shape) for p in params if p.requires_grad),
                   tuple(tuple(p.shape) for p in params if not p.requires_grad),
                   sum(b.numel() * b.element_size() for b in model.buffers()))

    @property
    def trainable_count(self) -> int:
        return sum(math.prod(s) for s in self.trainable)

    @property
    def total_count(self) -> int:
        return self.trainable_count + sum(math.prod(s) for s in self.frozen)


def shard(shape: tuple[int, ...], world: int) -> int:
    """Values of one process's FSDP shard of a tensor: ⌈d₀ / world⌉ rows (FSDP2 pads the
    first dimension to a multiple of the world size); the whole tensor when world is 1."""
    if not shape:
        return 1
    return -(-shape[0] // world) * math.prod(shape[1:])


def optimizer_state_bytes(shape: tuple[int, ...], optimizer: str, momentum: float,
                          values: int) -> int:
    """Bytes of one trainable tensor's optimizer state; `values` of it on this process
    (its FSDP shard). Formulas: module docstring, from docs/training.md ("--optimizer")."""
    if optimizer == "adamw":
        return 2 * FLOAT32 * values + ADAM_STEP_BYTES
    if optimizer == "adamw-8bit":
        if values < BNB_MIN_8BIT_SIZE:
            return 2 * FLOAT32 * values
        return 2 * values + 2 * FLOAT32 * -(-values // BNB_BLOCK) + BNB_CODEBOOKS
    if optimizer == "adafactor":
        if len(shape) < 2:
            return FLOAT32 * values + ADAM_STEP_BYTES
        rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
        return FLOAT32 * (rows + cols) + ADAM_STEP_BYTES
    if optimizer == "sgd":
        return FLOAT32 * values if momentum > 0 else 0
    raise ConfigError(f"--optimizer {optimizer!r} has no memory formula")


@dataclass(frozen=True)
class Part:
    """One line of the plan: a name, its bytes per process, and how they were counted."""

    name: str
    bytes: int
    how: str


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for one process of a run (see the module docstring for each part)."""

    student: str
    total_params: int
    trainable_params: int
    setup: str
    world_size: int
    held: tuple[Part, ...]  # across steps: weights, buffers, masters, optimizer state
    gradients: Part
    activations: Part  # kept for backward by one micro-batch
    head_chunks: Part  # the chunked head's transient buffers
    other: tuple[Part, ...]  # DDP buckets, FSDP gathers, bfloat16 copies, temporaries
    forward_backward: int  # transient bytes at the peak of forward + backward, gradients aside
    backward_end: int  # transient bytes at the end of backward: the gradients and one layer
    optimizer_step: int  # transient bytes at the peak of the optimizer step
    sequences_per_step: int
    tokens_per_step: int
    steps: int
    steps_how: str

    @property
    def held_bytes(self) -> int:
        return sum(p.bytes for p in self.held)

    @property
    def peak(self) -> int:
        """Bytes at the step's peak: held, plus the largest of the three phases."""
        return self.held_bytes + max(self.forward_backward, self.backward_end,
                                     self.optimizer_step)


def plan_memory(cfg: TrainConfig, manifest: CacheManifest, model: nn.Module, world_size: int,
                precision: str, device_type: str, others: Sequence[CacheManifest] = ()
                ) -> MemoryPlan:
    """The memory plan of one process of `cfg` (validated) with the meta `model`
    (`meta_student`), `world_size` processes, a resolved --precision (fp32, bf16-mixed,
    bf16-master) on a device of `device_type` (cpu: optimizers loop over tensors; cuda:
    foreach kernels). `others`: the manifests of teachers 2..J (several --cache). Bytes per
    process; formulas in the module docstring."""
    unwrap = getattr(model, "get_base_model", None)  # a peft model: the transformers one
    inner: nn.Module = unwrap() if callable(unwrap) else model
    tensors = Tensors.of(model)
    fsdp = cfg.fsdp and world_size > 1
    world = world_size if fsdp else 1
    trainable_bytes = BFLOAT16 if precision == "bf16-master" else FLOAT32
    frozen = sum(shard(s, world) for s in tensors.frozen)
    trainable = sum(shard(s, world) for s in tensors.trainable)
    held = [Part("weights", FLOAT32 * frozen + trainable_bytes * trainable,
                 f"{frozen:,} frozen × 4 B + {trainable:,} trainable × {trainable_bytes} B"),
            Part("buffers", tensors.buffer_bytes, "rotary tables and other buffers")]
    if precision == "bf16-master":
        held.append(Part("float32 masters", FLOAT32 * trainable, "4 B per trainable value"))
    state = sum(optimizer_state_bytes(s, cfg.optimizer, cfg.momentum, shard(s, world))
                for s in tensors.trainable)
    held.append(Part("optimizer state", state, _optimizer_how(cfg)))
    gradients = Part("gradients", trainable_bytes * trainable,
                     f"{trainable:,} trainable × {trainable_bytes} B")

    block = Block.of(inner.config)
    autocast = precision != "fp32"
    matmul_bytes = BFLOAT16 if autocast else FLOAT32
    seq_len, batch = manifest.max_length, cfg.batch_size
    tokens = batch * seq_len  # of one micro-batch; every position may be a target
    eager = getattr(inner.config, "_attn_implementation", None) == "eager"
    frozen_norms = cfg.adapter.enabled
    layer = block.kept_per_token(matmul_bytes, seq_len, eager, frozen_norms)
    final_norm = (1 if frozen_norms else 2) * block.hidden
    model_wide = FLOAT32 * (final_norm + 2 * block.head_dim + block.hidden)
    if cfg.gradient_checkpointing:
        kept_per_token = block.layers * FLOAT32 * block.hidden + model_wide
        how = (f"{block.layers} layers × h = {block.hidden} (checkpointed: inputs only) "
               f"+ model-wide, float32, × {tokens:,} tokens")
        layer_backward = (layer + block.backward_per_token(matmul_bytes)) * tokens
    else:
        kept_per_token = block.layers * layer + model_wide
        how = (f"{block.layers} layers × {layer:,} B + {model_wide:,} B model-wide per token "
               f"× {tokens:,} tokens ({batch} × {seq_len})")
        layer_backward = block.backward_per_token(matmul_bytes) * tokens
    activations = Part("activations", kept_per_token * tokens, how)
    head, head_held = _head_part(inner, cfg, [manifest, *others],
                                 min(cfg.loss.chunk_size, tokens), autocast)
    hidden_grad = FLOAT32 * block.hidden * tokens  # d loss / d hidden of the target positions

    other = []
    if cfg.grad_accum > 1:
        other.append(Part("gradients of earlier micro-batches", gradients.bytes,
                          f"--grad-accum {cfg.grad_accum}: held through later forwards"))
    if precision == "bf16-mixed":
        # Autocast caches its casts of trainable weights until the forward ends (checkpointed
        # or not); a frozen weight's cast is kept only where a matmul saves it for backward.
        frozen_values = sum(math.prod(s) for s in tensors.frozen)
        if cfg.gradient_checkpointing:
            frozen_values //= max(block.layers, 1)
        other.append(Part("bfloat16 weight copies",
                          BFLOAT16 * (tensors.trainable_count + frozen_values),
                          "autocast's casts: trainable weights cached through the forward"
                          + (", frozen ones kept for backward" if tensors.frozen else "")
                          + (" (one layer)" if tensors.frozen and cfg.gradient_checkpointing
                             else "")))
    if world_size > 1 and not fsdp:
        other.append(Part("DDP gradient buckets", gradients.bytes, "a second copy of the "
                          "gradients, all-reduced"))
    if fsdp:
        other.append(Part("FSDP gathered parameters", _fsdp_gathered(inner, trainable_bytes),
                          f"root unit + {PREFETCHED_BLOCKS} blocks, unsharded"))
    if precision == "bf16-master":  # moved onto the masters one by one, the bfloat16 freed
        other.append(Part("float32 gradients of the masters", FLOAT32 * trainable,
                          "in the optimizer step, in place of the bfloat16 gradients"))
    largest = max((shard(s, world) for s in tensors.trainable), default=0)
    copies = CPU_STEP_COPIES[cfg.optimizer]
    temporaries = FLOAT32 * (trainable if device_type == "cuda" else copies * largest)
    other.append(Part("optimizer temporaries", temporaries,
                      "foreach: a float32 copy of every tensor" if device_type == "cuda"
                      else f"{copies} float32 cop{'y' if copies == 1 else 'ies'} of the "
                      "largest tensor"))
    extra = {p.name: p.bytes for p in other}
    backward = hidden_grad + head_held + max(head.bytes - head_held, layer_backward)
    copies = extra.get("bfloat16 weight copies", 0)
    # Checkpointed, the copies are freed when the forward ends, before backward recomputes.
    backward = max(copies, backward) if cfg.gradient_checkpointing else copies + backward
    forward_backward = (activations.bytes + backward
                        + extra.get("gradients of earlier micro-batches", 0)
                        + extra.get("FSDP gathered parameters", 0))
    # The end of backward: every gradient, and the first layer's activations and backward.
    backward_end = (gradients.bytes + (layer + block.backward_per_token(matmul_bytes)) * tokens
                    + extra.get("FSDP gathered parameters", 0))
    optimizer_step = (extra.get("float32 gradients of the masters", gradients.bytes)
                      + extra.get("DDP gradient buckets", 0) + extra["optimizer temporaries"])
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    steps, steps_how = _steps(cfg, manifest, per_step)
    return MemoryPlan(
        student=f"{cfg.student or cfg.student_config} ({type(inner).__name__})",
        total_params=tensors.total_count, trainable_params=tensors.trainable_count,
        setup=_setup(cfg, precision, world_size, fsdp, device_type), world_size=world_size,
        held=tuple(held), gradients=gradients, activations=activations, head_chunks=head,
        other=tuple(other), forward_backward=forward_backward, backward_end=backward_end,
        optimizer_step=optimizer_step,
        sequences_per_step=per_step, tokens_per_step=per_step * seq_len, steps=steps,
        steps_how=steps_how)


def _head_part(model: nn.Module, cfg: TrainConfig, manifests: Sequence[CacheManifest],
               chunk: int, autocast: bool) -> tuple[Part, int]:
    """The head's transient buffers on the path the run takes, and the part of them held
    from the head's forward through the whole backward (the fused head's weight gradient).
    `manifests`: one per teacher; several teachers add, on the fused path, the kept logits
    while another teacher's term is formed (1 more (chunk, V) tensor with 2 teachers, 2 with
    more: the gradient's running sum too), and on the autograd path
    one more at τ ≠ 1 for each teacher after the first (its tempered softmax)."""
    manifest = manifests[0]
    head = model.get_output_embeddings()  # type: ignore[operator]
    rows, hidden = head.weight.shape
    sampled = manifest.cache_mode == "sampled"
    kind = cfg.loss.resolved(sampled)
    transform, _ = known_transform(model.config)
    several = cfg.loss.mode == "kd" and len(manifests) > 1
    top_k = max(m.top_k for m in manifests)
    if fused_unsupported(head, cfg.loss, kind, manifest.vocab_size, top_k,
                         transform) is not None:
        copies = HEAD_CHUNK_COPIES + (len(manifests) - 1 if several
                                      and cfg.loss.temperature != 1.0 else 0)
        return Part("KD head chunks", copies * FLOAT32 * chunk * rows,
                    f"checkpointed: {copies} × {chunk:,} tokens × {rows:,} rows "
                    "× 4 B"), 0
    copies = FUSED_CHUNK_COPIES + (cfg.loss.mode == "kd" and kind == "forward"
                                   and cfg.loss.temperature != 1.0)
    copies += min(len(manifests) - 1, 2) if several else 0
    chunks = (copies * FLOAT32 + (BFLOAT16 if autocast else 0)) * chunk * manifest.vocab_size
    params = [p for p in (head.weight, head.bias) if p is not None and p.requires_grad]
    held = FLOAT32 * sum(p.numel() for p in params)
    return Part("KD head chunks", chunks + held,
                f"fused: {copies} × {chunk:,} tokens × {manifest.vocab_size:,} ids × 4 B"
                + (" + a bfloat16 copy" if autocast else "")
                + (f" + the head's float32 gradient ({rows:,} × {hidden:,})" if held else "")
                ), held


def _fsdp_gathered(model: nn.Module, trainable_bytes: int) -> int:
    """Bytes of the root unit (everything outside the blocks) and PREFETCHED_BLOCKS of the
    largest block, unsharded (frozen values at 4 B, trainable at `trainable_bytes`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]

    def size(params: Iterable[nn.Parameter]) -> int:
        return sum(p.numel() * (trainable_bytes if p.requires_grad else FLOAT32)
                   for p in params)

    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = size(p for p in model.parameters() if id(p) not in in_blocks)
    largest = max((size(b.parameters()) for b in blocks), default=0)
    return root + PREFETCHED_BLOCKS * largest


def _optimizer_how(cfg: TrainConfig) -> str:
    return {"adamw": "adamw: two float32 moments (8 B) per trainable value",
            "adamw-8bit": "adamw-8bit: two 8-bit moments + block scales (≈ 2.03 B)",
            "adafactor": "adafactor: float32 row + column statistics per matrix",
            "sgd": ("sgd: a float32 momentum per value" if cfg.momentum > 0
                    else "sgd without momentum: none")}[cfg.optimizer]


def _setup(cfg: TrainConfig, precision: str, world_size: int, fsdp: bool,
           device_type: str) -> str:
    adapter = ("no adapters (every weight trains)" if not cfg.adapter.enabled else
               f"--peft-config {cfg.adapter.peft_config}" if cfg.adapter.peft_config else
               f"{'DoRA' if cfg.adapter.use_dora else 'LoRA'} r {cfg.adapter.lora_r}")
    processes = (f"{world_size} processes, " + ("FSDP" if fsdp else "DDP")
                 if world_size > 1 else "1 process") + f" on {device_type}"
    return (f"--precision {precision}, --optimizer {cfg.optimizer}, {adapter}, gradient "
            f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {processes}")


def _steps(cfg: TrainConfig, manifest: CacheManifest, per_step: int) -> tuple[int, str]:
    """Optimizer steps of the run and how they follow. Without --max-steps, from the
    manifest's sequence count less the --eval-fraction held out (a hash of each sample id
    decides, so the count is the expected one) and, with a curriculum, the full epoch."""
    if cfg.max_steps is not None:
        return cfg.max_steps, "--max-steps"
    sequences = manifest.num_sequences
    approx = ""
    if cfg.eval_fraction > 0:
        sequences = round(sequences * (1 - cfg.eval_fraction))
        approx = "≈ "
    epochs = cfg.epochs or 1
    steps = epochs * -(-sequences // per_step)
    return steps, (f"{approx}{epochs} epoch(s) × ⌈{sequences:,} sequences / {per_step} per "
                   "step⌉" + (" (a curriculum's pacing may show fewer per epoch)"
                              if cfg.curriculum.active else ""))


# --- the command -----------------------------------------------------------------------------

def planned_world_size() -> int:
    """The processes to plan for: WORLD_SIZE, as torchrun sets it (1 without)."""
    raw = os.environ.get("WORLD_SIZE", "") or "1"
    try:
        world = int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer (set by "
                          "torchrun; unset it to plan one process)") from exc
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={world} must be at least 1")
    return world


def dry_run(cfg: TrainConfig) -> MemoryPlan:
    """`train-student --dry-run`: check `cfg` as a real run does, build the student on the
    meta device and plan one process's memory. Reads the student's config and the cache's
    manifest only; writes nothing. Raises ConfigError (one line) for bad input."""
    cfg = cfg.with_cache_defaults()
    cfg.validate()
    plan_run_dir(cfg, planned_world_size())  # --out as a real run would find it (reads only)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device).name
    # the manifests alone, from a folder or a URL (no shard is opened; no --local-cache copy)
    caches = [open_cache(cache, check_shards=False) for cache in cfg.cache]
    manifests = [cache.manifest for cache in caches]
    for path, other in zip(cfg.cache[1:], caches[1:], strict=True):
        # what the manifests show; the rest needs the shards: at training
        check_manifests_aligned(caches[0], other, (f"--cache {cfg.cache[0]}", f"--cache {path}"))
    model = meta_student(cfg, manifests[0])
    return plan_memory(cfg, manifests[0], model, planned_world_size(), precision, device.type,
                       manifests[1:])


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def render(plan: MemoryPlan) -> str:
    """The plan as one text table (bytes and GiB per process, and how each was counted)."""
    share = 100.0 * plan.trainable_params / max(plan.total_params, 1)
    lines = [f"student     {plan.student}",
             f"parameters  {plan.total_params:,}, trainable {plan.trainable_params:,} "
             f"({share:.2f}%)",
             f"setup       {plan.setup}",
             f"per step    {plan.sequences_per_step:,} sequence"
             f"{'' if plan.sequences_per_step == 1 else 's'}, {plan.tokens_per_step:,} tokens "
             "(at most: padding included)",
             f"steps       {plan.steps:,} ({plan.steps_how})",
             "",
             f"{'memory per process':<36}{'bytes':>16}{'GiB':>9}  how"]

    def row(part: Part) -> None:
        lines.append(f"{part.name:<36}{part.bytes:>16,}{_gib(part.bytes):>9}  {part.how}")

    for part in plan.held:
        row(part)
    row(plan.gradients)
    row(plan.activations)
    row(plan.head_chunks)
    for part in plan.other:
        row(part)
    lines += [f"{'held across steps':<36}{plan.held_bytes:>16,}{_gib(plan.held_bytes):>9}",
              f"{'+ forward/backward peak':<36}{plan.forward_backward:>16,}"
              f"{_gib(plan.forward_backward):>9}  activations, head or one layer's backward, "
              "copies",
              f"{'+ end of backward':<36}{plan.backward_end:>16,}"
              f"{_gib(plan.backward_end):>9}  gradients, the first layer's backward",
              f"{'+ optimizer step peak':<36}{plan.optimizer_step:>16,}"
              f"{_gib(plan.optimizer_step):>9}  gradients, temporaries",
              f"{'= peak estimate':<36}{plan.peak:>16,}{_gib(plan.peak):>9}  held + the "
              "largest phase"]
    return "\n".join(lines)
