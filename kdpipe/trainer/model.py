"""Load a student and split it into body (→ final hidden states) and output head.

The loss computes the head in chunks over target tokens (`chunked_loss.py`), so the model's
own forward, which would build a (B, T, V) logits tensor, is never called in training. That
split is only correct if `head(body(x))`, plus any known logit transform, equals the model's
logits: `split_student` checks this numerically on a few tokens (`model_parts.split_model`)
and refuses any architecture whose head does something else, rather than training on silently
wrong logits.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import tokenizer_identity as identity
from kdpipe.hf_errors import refusal_reason, refusals
from kdpipe.model_parts import ModelParts, SplitError, split_model
from kdpipe.packing import check_packing
from kdpipe.schemas.cache import Cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.manifest import TOKENIZER_DIR, CacheManifest
from kdpipe.torch_runtime import MODEL_INIT_LOCK
from kdpipe.trainer import adapters
from kdpipe.trainer.adapter_config import AdapterConfig, is_adapter_folder

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # from the tokenizer



def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32 (the default on CPU)."""
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    return AUTOCAST_DTYPES.get(dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass, or nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_tokenizer(student: str | None, tokenizer: str | None, cache: Cache,
                   trust_remote_code: bool = False) -> Any:
    """--tokenizer if given, else the student's own, else the one the cache was made with: the
    copy in the cache (its files checked against the manifest first), or, for a cache made
    before kdpipe kept one, the tokenizer its manifest names.

    Raises ConfigError naming every place tried; CacheFormatError for an altered copy.
    """
    if tokenizer:
        return identity.load_tokenizer(tokenizer, trust_remote_code, "--tokenizer")
    errors = []
    if student:
        try:
            return identity.load_tokenizer(student, trust_remote_code, "--student")
        except ConfigError as exc:
            errors.append(str(exc))
    folder = cache.checked_tokenizer_dir()
    if folder is not None:
        return identity.load_tokenizer(folder, trust_remote_code, "the cache's tokenizer")
    recorded = cache.manifest.tokenizer.name_or_path
    try:
        return identity.load_tokenizer(recorded, trust_remote_code, "the cache's manifest")
    except ConfigError as exc:
        reason = identity.first_line(exc.__cause__ or exc)
    where = "here" if Path(recorded).is_absolute() else (
        "from the current folder (a relative path is read from the folder kdpipe runs in, not "
        "the one cache-teacher ran in)")
    raise ConfigError(
        f"cannot load a tokenizer: cache {cache.location} has no {TOKENIZER_DIR}/ folder (made "
        f"before kdpipe kept a copy), and the tokenizer its manifest names, {recorded}, does "
        f"not load {where}: {reason}" + "".join(f"; {e}" for e in errors)
        + "; pass --tokenizer with the tokenizer the cache was made with")


def check_tokenizer(tokenizer: Any, cache: Cache, trust_remote_code: bool = False) -> None:
    """Refuse a student whose tokenizer maps the cache's ids to other tokens (one warning when
    only its normaliser, pre-tokenizer or BOS/EOS roles differ: `tokenizer_identity`)."""
    what = f"the student's tokenizer ({getattr(tokenizer, 'name_or_path', '?')})"
    identity.check_compatible(tokenizer, cache, what, trust_remote_code)


def load_student(student: str | None, student_config: str | None, manifest: CacheManifest,
                 tokenizer: Any, seed: int, trust_remote_code: bool = False,
                 attn_implementation: str | None = None, base: str | None = None
                 ) -> nn.Module:
    """A causal LM in float32: pretrained from --student, or initialised from --student-config.

    A --student folder of peft adapters is loaded on its base (`base`, default the one it
    names) and merged into it: a plain model, whose logits are the adapted model's.

    A config file without `vocab_size` gets the cache's real vocabulary size: padding rows
    would never be trained (they are outside the student's softmax); give `vocab_size` to pad
    the head anyway. Special token ids default to the tokenizer's. Initialisation is seeded, so
    a run is reproducible. `attn_implementation` (sdpa, flash_attention_2, eager; None: the
    model's default) becomes `model.config._attn_implementation`, which packing reads.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation

    if student is not None and is_adapter_folder(student):
        return _load_merged(student, base, kwargs)
    if student is not None:
        return _pretrained(student, f"--student {student}", kwargs)
    assert student_config is not None
    config = student_model_config(student_config, manifest, {
        key: getattr(tokenizer, key) for key in SPECIAL_TOKEN_KEYS})
    with MODEL_INIT_LOCK:
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(config, **kwargs)
        except refusals() as exc:  # e.g. an attention it does not implement
            raise ConfigError(f"--student-config {student_config}: {refusal_reason(exc)}"
                              ) from exc


def student_model_config(student_config: str, manifest: CacheManifest,
                         specials: dict[str, int | None]) -> Any:
    """The transformers config of a --student-config JSON file: `vocab_size` defaults to the
    cache's real vocabulary, and the special token ids (SPECIAL_TOKEN_KEYS) to `specials`.

    Raises ConfigError naming the file when it is not JSON, has no `model_type`, or
    transformers refuses its settings.
    """
    from transformers import AutoConfig

    try:
        spec = json.loads(Path(student_config).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--student-config {student_config}: not valid JSON ({exc})") from exc
    if not isinstance(spec, dict) or "model_type" not in spec:
        raise ConfigError(f"--student-config {student_config}: needs a JSON object with "
                          "'model_type' (e.g. \"llama\") and the model's settings")
    spec.setdefault("vocab_size", manifest.vocab_size)
    for key in SPECIAL_TOKEN_KEYS:
        spec.setdefault(key, specials.get(key))
    model_type = spec.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **spec)
    except refusals() as exc:
        raise ConfigError(f"--student-config {student_config}: {refusal_reason(exc)}") from exc


def _pretrained(name: str, what: str, kwargs: dict[str, Any], hint: str = "") -> nn.Module:
    """from_pretrained with `kwargs` (dtype, trust_remote_code, attn_implementation), or a
    ConfigError starting with `what` (the flag), ending with `hint`."""
    from transformers import AutoModelForCausalLM

    try:
        with MODEL_INIT_LOCK:
            return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except refusals() as exc:
        raise ConfigError(f"{what}: cannot load a causal LM ({refusal_reason(exc)}){hint}"
                          ) from exc


def _load_merged(folder: str, base: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """The adapters of `folder` merged into their base (`base`, default the one it names)."""
    name = base or adapters.base_of(folder)
    if name is None:
        raise ConfigError(f"--student {folder}: its adapter_config.json names no base model "
                          "(base_model_name_or_path); pass --base")
    if base:
        model = _pretrained(name, f"--base {name}", kwargs)
    else:
        model = _pretrained(name, f"--student {folder}: its base {name}", kwargs,
                            "; pass --base where the base is now")
    adapters.check_base(folder, adapters.base_fingerprint(model), name)
    return adapters.merge(model, folder)


def check_vocab(model: nn.Module, manifest: CacheManifest, student: str) -> None:
    """The head must have a row for every real id of the cache's tokenizer, the embeddings too.

    Rows beyond the real ids are padding (a head padded to a multiple of 64 or 128, as Qwen2.5
    and others are): they are left out of the student's softmax, so the student's head may be
    narrower or wider than the teacher's as long as it covers the real ids.
    """
    head = model.get_output_embeddings()  # type: ignore[operator]
    width = head.weight.shape[0]
    if width < manifest.vocab_size:
        raise ConfigError(
            f"{student}: the student's output head has {width} rows, fewer than the "
            f"{manifest.vocab_size} real ids of the cache's tokenizer (the teacher's head has "
            f"{manifest.teacher_head_width} rows); the student cannot represent every id: "
            f"resize its embeddings to at least {manifest.vocab_size}")
    rows = model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]
    if rows < manifest.vocab_size:
        raise ConfigError(f"{student}: {rows} input embeddings for a tokenizer of "
                          f"{manifest.vocab_size} real ids; resize its embeddings to at least "
                          f"{manifest.vocab_size}")
    if width != manifest.vocab_size:
        log.info("student head: %d rows for %d real ids; rows %d.. are padding, left out of "
                 "its softmax and suppressed in generate()", width, manifest.vocab_size,
                 manifest.vocab_size)
        suppress_padding_rows(model, manifest.vocab_size, width)


def suppress_padding_rows(model: nn.Module, vocab_size: int, width: int) -> None:
    """List head rows vocab_size .. width - 1 in the model's `generation_config.suppress_tokens`
    (saved with it), so that `generate()` never emits an id the tokenizer does not have.

    Training never moves those rows (they are outside every softmax here), so their logits
    drift from the real ones' as the body trains: a pretrained student's low padding logits
    may not stay low. transformers' SuppressTokensLogitsProcessor sets them to -inf.
    """
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    config.suppress_tokens = sorted(set(config.suppress_tokens or ()) | set(range(vocab_size,
                                                                                  width)))


def split_student(model: nn.Module, name: str) -> ModelParts:
    """The student's body and head (`model_parts.split_model`). Raises ConfigError when they
    do not reproduce its logits: training on wrong logits would go unnoticed."""
    try:
        return split_model(model, name)
    except SplitError as exc:
        raise ConfigError(f"{exc}; kdpipe refuses to train it rather than use wrong logits"
                          ) from exc


@dataclass
class Student:
    """A student opened for a cache: its parts (model, body, head) and its tokenizer."""

    parts: ModelParts
    tokenizer: Any
    adapter_base: dict[str, str] | None = None  # adapters: the record of their frozen base

    @property
    def model(self) -> nn.Module:
        return self.parts.model


def open_student(cache: Cache, device: torch.device, *, student: str | None,
                 student_config: str | None = None, tokenizer: str | None = None,
                 weights: str | Path | None = None, seed: int = 0,
                 trust_remote_code: bool = False, attn_implementation: str | None = None,
                 adapter: AdapterConfig | None = None, base: str | None = None) -> Student:
    """The student of `--student` (or `--student-config`), checked against `cache`.

    Tokenizer (must map the cache's ids: `check_tokenizer`) → model in float32 (from
    `weights`, a checkpoint folder, when given; an adapter folder merged into its `base`) →
    head width (`check_vocab`) → with `adapter` enabled, trainable adapters on the frozen
    model (a checkpoint's: `weights`) → on `device` → body/head split (`split_student`) → for
    a packed cache, whether it keeps packed documents apart (`packing.check_packing`). Raises
    ConfigError naming the option at fault.
    """
    name = student or student_config or "student"
    tok = load_tokenizer(student, tokenizer, cache, trust_remote_code)
    check_tokenizer(tok, cache, trust_remote_code)
    adapting = adapter is not None and adapter.enabled
    source = str(weights) if weights is not None and not adapting else student
    model = load_student(source, None if source else student_config, cache.manifest, tok,
                         seed, trust_remote_code, attn_implementation, base)
    check_vocab(model, cache.manifest, name)
    record = None
    if adapting:  # checkpoints hold the adapters: the base is always --student
        assert adapter is not None and student is not None
        model, record = adapters.attach(model, adapter, student,
                                        Path(weights) if weights is not None else None, seed)
    model.to(device)
    parts = split_student(model, name)
    if cache.manifest.segments:  # packed documents must stay apart, as in the teacher's pass
        check_packing(model, "student", name)
    return Student(parts, tok, record)


def write_merged(final: Path, base: str, manifest: CacheManifest, tokenizer: Any,
                 trust_remote_code: bool = False) -> Path:
    """final/merged/: the adapters of `final` merged into `base`, a plain transformers model
    (padding rows of its head listed in suppress_tokens, as in every saved student)."""
    model = load_student(str(final), None, manifest, tokenizer, 0, trust_remote_code, base=base)
    check_vocab(model, manifest, str(final))
    return adapters.save_merged(model, tokenizer, final / adapters.MERGED_DIR)
