"""Training on many processes with PyTorch's own engine: torchrun, DDP, FSDP2.

`torchrun --nproc-per-node N -m kdpipe train-student ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
`Distributed.from_env()` reads them and joins the process group (NCCL on CUDA, gloo on CPU).
Without torchrun everything here is a no-op on one process, so the trainer has one code path.

How the data is split (what makes N processes train like one with the same global batch):
every rank builds the same epoch order (same seed, same sampler, same curriculum), cuts it
into global batches of `batch_size * grad_accum * world_size` samples, and takes its own
contiguous slice of each (`rank_slice`). The λ of every sample is computed on the whole global
batch on every rank, so curricula, pacing and selective reliance are identical to one process.
A short last batch is split as evenly as possible; a rank left with fewer micro-batches than
another runs copies of one of its own (or of the global batch's first sample) with weight 0,
because FSDP needs the same number of forward passes on every rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from kdpipe.schemas.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RankSlice:
    """One rank's share of one global batch."""

    sample_ids: np.ndarray  # (n,) the samples this rank trains on (a placeholder when empty)
    start: int  # where they begin in the global batch (to pick their λ)
    real: bool  # False: the rank got no sample; `sample_ids` is a zero-weight placeholder
    micro_batches: int  # forward passes every rank makes for this global batch


def rank_slice(global_ids: np.ndarray, world_size: int, rank: int, batch_size: int
               ) -> RankSlice:
    """This rank's contiguous slice of a global batch, and the micro-batch count all ranks use.

    With a full global batch every rank gets `len / world_size` samples; a short last batch is
    split as evenly as np.array_split does. A rank with no sample gets the batch's first
    sample as a placeholder, to be weighted 0.
    """
    parts = np.array_split(np.asarray(global_ids, dtype=np.int64), world_size)
    micro = max(max(-(-p.size // batch_size) for p in parts), 1)
    start = sum(p.size for p in parts[:rank])
    mine = parts[rank]
    if mine.size == 0:
        return RankSlice(np.asarray(global_ids[:1], dtype=np.int64), 0, False, micro)
    return RankSlice(mine, start, True, micro)


def rank_order(order: np.ndarray, per_step: int, world_size: int, rank: int,
               batch_size: int) -> tuple[np.ndarray, list[RankSlice]]:
    """This rank's sample order for a whole epoch (what its loader reads) and its slices.

    order: the epoch's global order; per_step: the global batch size. Every slice but the
    last has exactly per_step / world_size samples, so the loader's batches line up with them.
    """
    slices = [rank_slice(order[s:s + per_step], world_size, rank, batch_size)
              for s in range(0, order.size, per_step)]
    ids = [s.sample_ids for s in slices]
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), slices


class Distributed:
    """The process group of this run, or a single process; every collective kdpipe uses."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 owns_group: bool = False) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.owns_group = owns_group  # created the process group, so destroys it in close()

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        """Join torchrun's process group (or one the caller already made); else one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            return cls(rank, world, _env_int("LOCAL_RANK", rank))
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        log.info("distributed: rank %d of %d (local rank %d)", rank, world, local_rank)
        return cls(rank, world, local_rank, owns_group=True)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU when training on CUDA (torchrun gives one per process)."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank (small picklable objects only)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value)
        return found

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result to every rank.

        A ConfigError on rank 0 (e.g. the run folder refused) is raised on every rank, so no
        rank waits forever for a rank that has already given up.
        """
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except ConfigError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise ConfigError(value)
        return value

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun launch, or not under torchrun at all."""
    return os.environ.get("RANK", "0") == "0"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by "
                          "torchrun; unset it to train on one process)") from exc


def wrap(module: nn.Module, dist_ctx: Distributed, fsdp: bool, device: torch.device
         ) -> nn.Module:
    """DDP (default) or FSDP2 (`fully_shard`) around the training objective; as is on one rank.

    FSDP shards every transformer block (the classes the model lists in `_no_split_modules`),
    then the root, which keeps the embeddings, final norm and head.
    """
    if not dist_ctx.enabled:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist_ctx.world_size,))
        block_names = set(getattr(getattr(module, "model", module), "_no_split_modules", None)
                          or [])
        blocks = [m for m in module.modules() if type(m).__name__ in block_names]
        if not blocks:
            log.warning("--fsdp: no transformer blocks found (no _no_split_modules); sharding "
                        "the whole student as one unit")
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: the module sits on one device and the batches are already there.
    # Buffers (rotary tables, causal masks) are constants: no broadcast on every forward.
    return DistributedDataParallel(module, device_ids=None, forward_sync_buffers=False)


def local_value(value: torch.Tensor) -> float:
    """A scalar that may be an FSDP DTensor (e.g. the clipped gradient norm) as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)


# --- model and optimizer state: FSDP gathers them to rank 0; DDP has them as one process ---

def gather_model_state(objective: nn.Module, fsdp: bool, trainable_only: bool = False
                       ) -> dict[str, torch.Tensor] | None:
    """FSDP: the full weights, keyed as in the HF model, on rank 0; otherwise None (the model
    gives them itself). trainable_only: only the parameters that train (adapters), not the
    frozen base."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(objective, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    return {k.removeprefix("model."): v for k, v in full.items()
            if isinstance(v, torch.Tensor)}


def gather_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer,
                           fsdp: bool) -> dict[str, Any]:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(objective, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer,
                         saved: dict[str, Any], fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(objective, optimizer, optim_state_dict=saved,
                             options=StateDictOptions(full_state_dict=True))
