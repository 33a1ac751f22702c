"""benchmarks/gpu/run.sh --cpu-smoke: every step of the GPU benchmark runs, at toy sizes on CPU,
so that a lent GPU's minutes go to measuring, not debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "run.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_step_on_cpu(tmp_path: Path) -> None:
    done = _run("--cpu-smoke", "--out", str(tmp_path / "bench"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "bench" / "gpu_bench.json").read_text())
    errors = {name: value["error"] for name, value in results.items()
              if isinstance(value, dict) and "error" in value}
    assert not errors
    assert results["mode"] == "cpu-smoke"
    assert results["cache"]["P1_stage_over_forward"] > 0
    assert {"ce", "kd"} <= set(results["train"]["summary"])
    assert results["loader"]["summary"]["loader"]["tokens_per_s"] > 0
    assert results["fused"]["speedup"]["forward τ=1"] > 0
    assert results["gpu_tests"]["returncode"] == 0  # on CPU every GPU test skips
    table = (tmp_path / "bench" / "gpu_bench.md").read_text()
    assert "P1 cache-teacher / bare forward" in table and "–" not in table.split("|---|")[1]


def test_a_wrong_argument_is_one_line() -> None:
    done = _run("--gpus", "2")
    assert done.returncode == 2
    assert done.stderr.strip() == ("run.sh: unknown argument '--gpus' (use --cpu-smoke and --out "
                                   "DIR)")
