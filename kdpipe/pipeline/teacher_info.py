"""Identify a teacher and its tokenizer without loading weights: fingerprints for the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.fingerprint import files_fingerprint, json_fingerprint
from kdpipe.schemas.manifest import TeacherInfo
from kdpipe.tokenizer_identity import first_line

# Files that determine a local checkpoint's outputs (weights, config, remote code).
_MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.json", "*.py", "*.model")


def describe_teacher(name_or_path: str, backend: str, dtype: str,
                     trust_remote_code: bool) -> tuple[TeacherInfo, Any]:
    """TeacherInfo (name, hub revision, content fingerprint) and the model's config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher {name_or_path}: not a model folder or loadable model name "
                          f"({first_line(exc)})") from exc
    path = Path(name_or_path)
    revision = getattr(config, "_commit_hash", None)
    if path.is_dir():
        files = [f for pattern in _MODEL_FILE_PATTERNS for f in path.glob(pattern)]
        fingerprint = files_fingerprint(files, root=path)
    else:
        fingerprint = json_fingerprint({"name": name_or_path, "revision": revision})
    info = TeacherInfo(name_or_path=name_or_path, revision=revision, fingerprint=fingerprint,
                       backend=backend, dtype=dtype)
    return info, config


def teacher_head_width(config: Any) -> int:
    """Rows of the teacher's output head, from its config (text config for multimodal)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text_config, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        raise ConfigError("--teacher: its config has no vocab_size; is it a causal LM?")
    return size
