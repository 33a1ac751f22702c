"""What `--threads 0` (auto) means: OMP_NUM_THREADS, else half the CPUs this process may use,
shared by the processes of one job, from 1 to 8."""

from __future__ import annotations

import pytest

from kdpipe import torch_runtime
from kdpipe.schemas.errors import ConfigError
from kdpipe.torch_runtime import MAX_AUTO_THREADS, auto_threads, resolve_threads


@pytest.fixture()
def cpus(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OMP_NUM_THREADS, no torchrun; set the CPU count with `cpus.setattr(...)`."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return monkeypatch


def with_cpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch_runtime, "available_cpus", lambda: count)


@pytest.mark.parametrize(("count", "processes", "expected"), [
    (1, 1, 1), (2, 1, 1), (6, 1, 3), (64, 1, MAX_AUTO_THREADS), (16, 2, 4), (6, 4, 1)])
def test_half_the_cpus_shared_and_capped(cpus: pytest.MonkeyPatch, count: int, processes: int,
                                         expected: int) -> None:
    with_cpus(cpus, count)
    assert auto_threads(processes) == expected


def test_torchrun_processes_on_one_machine_share_it(cpus: pytest.MonkeyPatch) -> None:
    with_cpus(cpus, 32)
    cpus.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_threads() == 4
    assert auto_threads(processes=2) == 2


def test_omp_num_threads_wins(cpus: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with_cpus(cpus, 64)
    cpus.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(processes=4) == 3
    cpus.setenv("OMP_NUM_THREADS", "12,2")  # nested parallelism: the outer count
    assert auto_threads() == 12
    cpus.setenv("OMP_NUM_THREADS", "many")
    assert auto_threads() == MAX_AUTO_THREADS
    assert "ignoring OMP_NUM_THREADS='many'" in caplog.text


def test_explicit_counts_and_refusals(cpus: pytest.MonkeyPatch) -> None:
    with_cpus(cpus, 64)
    assert resolve_threads(5) == 5 and resolve_threads(40) == 40  # no cap on an explicit count
    assert resolve_threads(0) == MAX_AUTO_THREADS
    with pytest.raises(ConfigError, match=r"^--threads -1 must be >= 0 \(0: auto\)$"):
        resolve_threads(-1)


def test_available_cpus_is_the_affinity_mask() -> None:
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity masks on this platform")
    assert torch_runtime.available_cpus() == len(os.sched_getaffinity(0))
