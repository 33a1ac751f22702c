"""Process-level torch concerns both stages share: picking the device, building models safely.

Neither teacher- nor student-specific, so it lives beside the two sides rather than in one.
"""

from __future__ import annotations

import threading

import torch

from kdpipe.schemas.errors import ConfigError

# transformers builds models under process-global context managers (weight init, tying):
# two threads building at once can leave them switched, and every later model in the process
# then loads with untied, uninitialised weights. Stages started from threads (cache workers,
# several students on one cache) therefore build their models one at a time.
MODEL_INIT_LOCK = threading.Lock()


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when available, else CPU) or an explicit torch device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device (try cpu, cuda, cuda:1)"
                          ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    return resolved
