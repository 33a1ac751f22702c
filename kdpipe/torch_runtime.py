"""Process-level torch concerns both stages share: the device, CPU threads, building models.

Neither teacher- nor student-specific, so it lives beside the two sides rather than in one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kdpipe.schemas.errors import ConfigError

log = logging.getLogger(__name__)

# transformers builds models under process-global context managers (weight init, tying):
# two threads building at once can leave them switched, and every later model in the process
# then loads with untied, uninitialised weights. Stages started from threads (cache workers,
# several students on one cache) therefore build their models one at a time.
MODEL_INIT_LOCK = threading.Lock()

# More intra-op threads than this rarely pays for the models kdpipe runs on a CPU, and on a
# shared machine every extra thread competes with other jobs: torch's own default (one per
# core) was measured 5-10x slower than one thread on a busy machine.
MAX_AUTO_THREADS = 8


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


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups cpusets, SLURM)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _omp_num_threads() -> int | None:
    """OMP_NUM_THREADS as a positive count (its first entry), or None when unset or unusable."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    try:
        count = int(value.split(",")[0])
    except ValueError:
        count = 0
    if count < 1:
        log.warning("ignoring OMP_NUM_THREADS=%r: not a positive integer", value)
        return None
    return count


def auto_threads(processes: int = 1) -> int:
    """What `--threads 0` means: OMP_NUM_THREADS when it is set; else half the CPUs this
    process may use, divided among the `processes` of one job that share them (and among
    torchrun's processes on this machine, LOCAL_WORLD_SIZE), between 1 and MAX_AUTO_THREADS.

    Half, because the data loader, tokenizer and writer threads need cores too: on 2 cores,
    1 torch thread trained demo-sized models 2-4x faster than 2.
    """
    from_env = _omp_num_threads()
    if from_env is not None:
        return from_env
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    sharing = max(processes, 1) * max(local_ranks, 1)
    return max(1, min(MAX_AUTO_THREADS, available_cpus() // (2 * sharing)))


def resolve_threads(threads: int, processes: int = 1) -> int:
    """`--threads` as a count: itself when positive, `auto_threads(processes)` for 0.

    Raises ConfigError for a negative value.
    """
    if threads < 0:
        raise ConfigError(f"--threads {threads} must be >= 0 (0: auto)")
    return threads or auto_threads(processes)


def set_threads(threads: int, processes: int = 1) -> int:
    """Set torch's intra-op CPU threads for this process from `--threads`; returns the count.

    The command line calls this once per process, before the stage runs; Python callers of
    a stage keep whatever torch setting they chose.
    """
    count = resolve_threads(threads, processes)
    torch.set_num_threads(count)
    log.info("torch uses %d CPU thread(s) (%s)", count,
             f"--threads {threads}" if threads else "auto; --threads N to choose")
    return count


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for a block, then restore them (None: leave them)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
