"""Checkpoints that describe themselves and resume exactly.

`RUN/checkpoints/step-XXXXXX/` holds the model (`save_pretrained`, safetensors), the
tokenizer, `trainer_state.json` (schema version, step, epoch, data position, config) and
`training_state.pt` (optimizer, scheduler, RNG and per-sample statistics; tensors and plain
containers only, loaded with `weights_only=True`). A checkpoint is written under a temporary
name and renamed, so the newest complete one is always usable after a crash. A LoRA/DoRA
student's checkpoints hold its adapters and the record of its frozen base instead of the model
(`adapters.py`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from kdpipe import __version__
from kdpipe.schemas.errors import CacheFormatError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.records import from_dict, read_json, to_dict
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.write_errors import writing
from kdpipe.trainer import adapters

log = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_STATE_NAME = "training_state.pt"
TRAINER_STATE_SCHEMA_VERSION = 1

# Keys of training_state.pt.
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
RNG_KEY = "rng"  # rank 0's RNG (the only one on a single process)
RANK_RNG_KEY = "rng_per_rank"  # every rank's RNG, in rank order (distributed runs)
SAMPLE_STATS_KEY = "sample_stats"
TORCH_RNG_KEY = "torch"
CUDA_RNG_KEY = "cuda"
NUMPY_RNG_KEY = "numpy"
PYTHON_RNG_KEY = "python"


@dataclass(frozen=True)
class TrainerState:
    """Where a run stands: enough, with the config, to rebuild the exact data position."""

    step: int  # optimizer steps done
    epoch: int  # epoch in progress
    batches_in_epoch: int  # global batches of that epoch already consumed
    tokens_seen: int
    samples_seen: int
    config: dict[str, Any]
    world_size: int = 1  # processes that trained it; --resume needs the same number
    schema_version: int = TRAINER_STATE_SCHEMA_VERSION
    kdpipe_version: str = __version__


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from, as tensors and plain Python values."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    version, internal, gauss = random.getstate()
    return {
        TORCH_RNG_KEY: torch.get_rng_state(),
        CUDA_RNG_KEY: torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        NUMPY_RNG_KEY: [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)),
                        int(np_state[2]), int(np_state[3]), float(np_state[4])],
        PYTHON_RNG_KEY: [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state[TORCH_RNG_KEY])
    if state[CUDA_RNG_KEY] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state[CUDA_RNG_KEY])
    name, keys, pos, has_gauss, cached = state[NUMPY_RNG_KEY]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state[PYTHON_RNG_KEY]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(folder: Path, model: nn.Module, tokenizer: Any, state: TrainerState,
                    training_state: dict[str, Any] | None,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    adapter_base: dict[str, str] | None = None) -> Path:
    """Write a checkpoint (or the final model, without training state) atomically.

    state_dict: the model's weights when `model` cannot give them itself (FSDP: gathered
    from the shards on rank 0). adapter_base: given for a peft model, whose adapters are
    saved with this record of their base (`adapters.save_adapters`), not the base itself.
    """
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with writing(tmp):  # a full or read-only disk: DiskError naming the checkpoint
            tmp.mkdir(parents=True)
            if adapter_base is not None:
                adapters.save_adapters(model, tmp, state_dict, adapter_base)
            else:
                model.save_pretrained(tmp, safe_serialization=True,  # type: ignore[operator]
                                      state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if training_state is not None:
                # Into a Python file: torch's own file writer drops the errno of a failed write.
                with open(tmp / TRAINING_STATE_NAME, "wb") as f:
                    torch.save(training_state, f)
            atomic_write_json(tmp / TRAINER_STATE_NAME, to_dict(state))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint stays behind
        raise
    return folder


def read_trainer_state(folder: Path) -> TrainerState:
    path = folder / TRAINER_STATE_NAME
    state = from_dict(TrainerState, read_json(path), str(path))
    if state.schema_version != TRAINER_STATE_SCHEMA_VERSION:
        raise CacheFormatError(f"{path}: trainer state version {state.schema_version}, this "
                               f"kdpipe reads {TRAINER_STATE_SCHEMA_VERSION}")
    return state


def load_training_state(folder: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(folder / TRAINING_STATE_NAME, weights_only=True)
    return state


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporaries and partial ones skipped)."""
    root = RunLayout(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / TRAINER_STATE_NAME).is_file()
             and (p / TRAINING_STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep = 0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
