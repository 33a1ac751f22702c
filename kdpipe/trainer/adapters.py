"""LoRA and DoRA students through peft: build the adapters, save and resume them, merge them.

A LoRA student keeps the pretrained --student frozen and trains, next to chosen linear layers
W, a low-rank update: W x + (α / r) · B A x with A (r, in) and B (out, r), B = 0 at the start
(Hu et al. 2021, "LoRA"). DoRA (Liu et al. 2024) also learns each output row's magnitude m:
m · (W + (α / r) B A) / ‖W + (α / r) B A‖ (row norms). peft injects the adapters into the
transformers model in place, so `model.split_student` still finds that model's own body and
head inside the PeftModel, and a targeted head is a peft layer the chunked loss calls like any
head module.

Checkpoints and final/ hold the adapters only (peft's `adapter_model.safetensors` and
`adapter_config.json`, whose `base_model_name_or_path` names the base) and
`adapter_base.json`: the base's name and a fingerprint of its weights, checked whenever the
adapters go back on a base (--resume, evaluate, merge), so they never land on another model
unnoticed. This module imports peft only when adapters are used (`pip install 'kdpipe[peft]'`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kdpipe import extras
from kdpipe.options import did_you_mean
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.write_errors import writing
from kdpipe.trainer.adapter_config import (
    ADAPTER_CONFIG_NAME,
    ALL_LINEAR,
    PEFT_PURPOSE,
    AdapterConfig,
)

log = logging.getLogger(__name__)

BASE_RECORD_NAME = "adapter_base.json"  # kdpipe's record of the base the adapters belong to
MERGED_DIR = "merged"  # final/merged/: the student with its adapters merged in
BASE_MODEL_KEY = "base_model"
FINGERPRINT_KEY = "base_fingerprint"
FINGERPRINT_SAMPLES = 4096  # values per tensor that the fingerprint reads (evenly strided)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTENTION_MLP = _ATTENTION + ("gate_proj", "up_proj", "down_proj")
# Every attention and MLP projection, by model_type; other architectures get all-linear.
# MoE models (mixtral, qwen3_moe) keep their experts as fused parameters, not linear layers:
# only attention is adapted by default (peft's target_parameters, through --peft-config,
# reaches the experts).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{name: _ATTENTION_MLP for name in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
        "olmo2", "cohere", "stablelm", "smollm3")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "starcoder2": _ATTENTION + ("c_fc", "c_proj"),
    "mixtral": _ATTENTION,
    "qwen3_moe": _ATTENTION,
}
# adapter_config.json keys that say where or how it was saved, not what it trains.
NOT_SETTINGS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version",
                "auto_mapping", "task_type")
CAUSAL_LM = "CAUSAL_LM"


def require_peft() -> ModuleType:
    """peft, or the one-line ConfigError with its install command."""
    return extras.require("peft", "peft", PEFT_PURPOSE)


# --- which modules --------------------------------------------------------------------------

def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return isinstance(module, (nn.Linear, Conv1D))


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (q_proj, ..., lm_head): what targets name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if name and _is_linear(m)})


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()  # type: ignore[operator]
    return next((name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is head),
                None)


def resolve_targets(requested: Sequence[str], model: nn.Module, where: str) -> list[str]:
    """The leaf module names to adapt: `requested` (default: the architecture's entry in
    DEFAULT_TARGETS, else all-linear) with all-linear expanded to every linear layer but the
    output head. Raises ConfigError naming the ones the model lacks, and those it has."""
    model_type = getattr(model.config, "model_type", None)
    # "q_proj,v_proj" as one item: how a YAML string reaches here from an experiment's arm
    requested = [n.strip() for item in requested for n in item.split(",") if n.strip()]
    if not requested:
        requested = DEFAULT_TARGETS.get(str(model_type), (ALL_LINEAR,))
        where = f"the default targets of {model_type} ({','.join(requested)})"
    linear = linear_names(model)
    head = _head_name(model)
    found: list[str] = []
    for name in requested:
        names = [n for n in linear if n != head] if name == ALL_LINEAR else [name]
        found += [n for n in names if n not in found]
    layers = f"its linear layers are {', '.join(linear)} (or give {ALL_LINEAR})"
    matches = {t: [m for name, m in model.named_modules()
                   if name == t or name.endswith("." + t)] for t in found}
    missing = [t for t in found if not matches[t]]
    if missing:
        hints = "; ".join(f"{t}{did_you_mean(t, linear)}" for t in missing)
        raise ConfigError(f"{where}: {type(model).__name__} has no module named {hints}; "
                          f"{layers}")
    # peft adapts linear layers and embeddings; a block or a norm would fail inside peft
    other = {t: type(m).__name__ for t, ms in matches.items() for m in ms
             if not (_is_linear(m) or isinstance(m, nn.Embedding))}
    if other:
        shown = "; ".join(f"{t} is a {kind}" for t, kind in other.items())
        raise ConfigError(f"{where}: LoRA adapts linear layers (and embeddings), but {shown}; "
                          f"{layers}")
    return found


def _targets_conv1d(model: nn.Module, targets: Sequence[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets
               for name, m in model.named_modules())


def lora_config(cfg: AdapterConfig, model: nn.Module) -> Any:
    """The peft LoraConfig of the --lora-* flags, or of --peft-config FILE, for `model`.

    Target modules are checked against the model (`resolve_targets`); a file's fields against
    LoraConfig's. Raises ConfigError naming the flag or file.
    """
    peft = require_peft()
    if cfg.peft_config is None:
        targets = resolve_targets(cfg.lora_target_modules, model, "--lora-target-modules")
        return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=targets, use_dora=cfg.use_dora,
                               fan_in_fan_out=_targets_conv1d(model, targets),
                               task_type=CAUSAL_LM)
    where = f"--peft-config {cfg.peft_config}"
    data = json.loads(Path(cfg.peft_config).read_text(encoding="utf-8"))  # checked: an object
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown LoraConfig field(s) "
                          + ", ".join(f"{k}{did_you_mean(k, fields)}" for k in unknown))
    settings = {k: v for k, v in data.items() if k not in NOT_SETTINGS}
    given = settings.get("target_modules")
    if given is None or given == ALL_LINEAR or isinstance(given, list):
        requested: list[str] = [given] if isinstance(given, str) else given or []
        settings["target_modules"] = resolve_targets(requested, model,
                                                     f"{where}: target_modules")
        settings.setdefault("fan_in_fan_out",
                            _targets_conv1d(model, settings["target_modules"]))
    try:  # any other string is a regular expression, which peft matches itself
        return peft.LoraConfig(**settings, task_type=CAUSAL_LM)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: not a valid LoraConfig ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the base the adapters belong to -------------------------------------------------------

def base_fingerprint(model: nn.Module) -> str:
    """A fingerprint of a model's weights: sha256 over every tensor's name, shape and up to
    FINGERPRINT_SAMPLES evenly strided values (as float32). It reads a few thousand values
    per tensor, not all of them: it tells one base from another (another checkpoint, another
    fine-tune), not a single edited weight."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def base_name(student: str) -> str:
    """How adapters name their base: a local folder as an absolute path (the run may be
    evaluated from elsewhere), a hub name as it is."""
    path = Path(student)
    return str(path.resolve()) if path.is_dir() else student


def base_of(folder: str | Path) -> str | None:
    """The base an adapter folder names: kdpipe's record, else peft's
    base_model_name_or_path; None when neither names one."""
    record = _read_json(Path(folder) / BASE_RECORD_NAME)
    if isinstance(record, dict) and record.get(BASE_MODEL_KEY):
        return str(record[BASE_MODEL_KEY])
    config = _read_json(Path(folder) / ADAPTER_CONFIG_NAME)
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(name) if name else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from exc


def check_base(folder: str | Path, fingerprint: str, base: str) -> None:
    """Refuse to put the adapters of `folder` on a base whose weights are not the ones they
    were trained on (folders without kdpipe's record, made elsewhere, are not checked)."""
    record = _read_json(Path(folder) / BASE_RECORD_NAME)
    if not isinstance(record, dict) or record.get(FINGERPRINT_KEY) in (None, fingerprint):
        return
    raise ConfigError(f"{folder}: its adapters were trained on {record.get(BASE_MODEL_KEY)} "
                      f"(weights fingerprint {str(record[FINGERPRINT_KEY])[:12]}), but the "
                      f"base {base} has other weights ({fingerprint[:12]}); give the base "
                      "they were trained on")


# --- training -----------------------------------------------------------------------------

def attach(model: nn.Module, cfg: AdapterConfig, student: str, checkpoint: Path | None,
           seed: int) -> tuple[nn.Module, dict[str, str]]:
    """`model` (the frozen base) with trainable adapters: new ones, or a checkpoint's when
    resuming. Returns the PeftModel and the record of its base (BASE_RECORD_NAME).

    New adapters are initialised from `seed` alone, on a forked RNG: every process of a
    torchrun draws the same A matrices (FSDP keeps each rank's own shard of what it drew),
    and the trainer's RNG stream is left as it was.

    Raises ConfigError for targets the model lacks, a checkpoint made on another base, or one
    whose adapter settings differ from the options given now (an edited --peft-config).
    """
    peft = require_peft()
    record = {BASE_MODEL_KEY: base_name(student), FINGERPRINT_KEY: base_fingerprint(model)}
    config = lora_config(cfg, model)
    with _quiet_peft():
        if checkpoint is not None:
            check_base(checkpoint, record[FINGERPRINT_KEY], student)
            _check_same_settings(checkpoint, config)
            adapted = peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                adapted = new_adapters(model, cfg, config)
    adapted.peft_config["default"].base_model_name_or_path = record[BASE_MODEL_KEY]
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    log.info("%s adapters (r %d, alpha %s) on %s: %d trainable parameters of %d (%.2f%%)",
             "DoRA" if config.use_dora else "LoRA", config.r, config.lora_alpha,
             ",".join(sorted(config.target_modules)) if isinstance(config.target_modules, set)
             else config.target_modules, trainable, total, 100.0 * trainable / max(total, 1))
    return adapted, record


def new_adapters(model: nn.Module, cfg: AdapterConfig, config: Any) -> nn.Module:
    """peft's PeftModel of `model` with new adapters of `config` (`lora_config(cfg, model)`),
    on whatever device `model` is (the memory plan's is `meta`). Raises ConfigError (one line)
    where peft refuses a target (a norm, a block)."""
    peft = require_peft()
    try:
        with _quiet_peft():
            adapted: nn.Module = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"{_where(cfg)}: peft cannot adapt these modules "
                          f"({_first_line(exc)})") from exc
    return adapted


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Without two warnings peft gives while it builds adapters: that a tied head has an
    adapter (`merge` unties it) and that transformers renamed is_gradient_checkpointing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _where(cfg: AdapterConfig) -> str:
    return (f"--peft-config {cfg.peft_config}" if cfg.peft_config is not None
            else "--lora-target-modules")


def _settings(config: Any) -> dict[str, Any]:
    """A LoraConfig's training settings, comparable across a save (sets as sorted lists)."""
    out = {}
    for key, value in config.to_dict().items():
        if key in NOT_SETTINGS:
            continue
        if isinstance(value, (set, list, tuple)) and all(isinstance(v, str) for v in value):
            value = sorted(value)
        out[key] = value
    return out


def _check_same_settings(checkpoint: Path, config: Any) -> None:
    peft = require_peft()
    saved = _settings(peft.LoraConfig.from_pretrained(str(checkpoint)))
    now = _settings(config)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k} (run: {saved.get(k)!r}, now: {now.get(k)!r})" for k in changed)
        raise ConfigError(f"--resume: {checkpoint.name}'s adapters were made with other "
                          f"settings: {shown}; resume with the run's own --lora-* options or "
                          "--peft-config file")


def save_adapters(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None,
                  record: dict[str, str]) -> None:
    """The adapters of a PeftModel (not its frozen base) and the record of that base.

    state_dict: the model's trainable weights when `model` cannot give them itself (FSDP:
    gathered on rank 0). Embedding and head weights are never saved with a LoRA on the head
    (peft would copy the whole frozen matrix): they are the base's.
    """
    model.save_pretrained(folder, safe_serialization=True,  # type: ignore[operator]
                          state_dict=state_dict, save_embedding_layers=False)
    atomic_write_json(folder / BASE_RECORD_NAME, record)


# --- adapter folders: merge -------------------------------------------------------------------

def merge(base: nn.Module, folder: str | Path) -> nn.Module:
    """The plain model of `base` with the adapters of `folder` merged into its weights, every
    weight trainable as in a model loaded with from_pretrained.

    A head tied to the input embeddings that has an adapter is untied first (its own copy of
    the weights, `tie_word_embeddings` off), since merging into the shared matrix would
    change the embeddings too.
    """
    peft = require_peft()
    with _quiet_peft():
        adapted = peft.PeftModel.from_pretrained(base, str(folder))
    inner = adapted.get_base_model()
    head = inner.get_output_embeddings()
    layer = getattr(head, "base_layer", None)  # a peft layer: the head has an adapter
    embeddings = inner.get_input_embeddings()
    if isinstance(layer, nn.Linear) and layer.weight is getattr(embeddings, "weight", None):
        layer.weight = nn.Parameter(layer.weight.detach().clone(),
                                    requires_grad=layer.weight.requires_grad)
        for config in {id(c): c for c in (inner.config, inner.config.get_text_config())
                       }.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        log.info("%s: the adapted head was tied to the input embeddings; the merged model "
                 "has its own head (tie_word_embeddings false)", folder)
    merged: nn.Module = adapted.merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base; a plain model trains every weight
    return merged


def save_merged(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """Write a merged model and its tokenizer as a plain transformers folder, atomically."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(tmp):
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged student written to %s", out)
    return out
