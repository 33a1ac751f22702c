"""`kdpipe report`: Markdown (always) and PNG plots (with matplotlib) from an experiment."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdpipe.experiments import report_data
from kdpipe.experiments.report import render_report
from kdpipe.schemas.errors import ConfigError

ARMS = ("ce", "kd", "kd-cl", "kd-cl-sr-student")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_markdown_names_every_arm_and_section(tiny_experiment: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    _, out = tiny_experiment
    path = render_report(out, plots=False, out=tmp_path / "md")
    text = path.read_text()
    for arm in ARMS:
        assert f"| {arm} |" in text
    for section in ("## Summary", "## Runs", "## Held-out evaluation over training",
                    "## Curricula: difficulty scores", "## Selective reliance",
                    "## Curriculum pool over training", "paired by seed",
                    "| kd-cl-sr-student − kd-cl | "):  # the YAML's `comparisons`
        assert section in text
    assert "teacher-nll" in text and "ce-snapshot/seed-0" in text
    assert not list((tmp_path / "md").glob("*.png"))


def test_the_curriculum_run_stayed_inside_its_pool(tiny_experiment: tuple[Path, Path]) -> None:
    _, out = tiny_experiment
    traces = report_data.pool_traces(report_data.load_view(out))
    assert set(traces) == {"kd-cl", "kd-cl-sr-student"}
    trace = traces["kd-cl"]
    assert trace.drawn_max is not None and trace.violations == 0
    assert trace.share[0] < 1.0 and trace.share[-1] == 1.0
    weights = report_data.logged_lambdas(report_data.load_view(out))
    assert set(weights) == {"kd-cl-sr-student"}
    assert set(weights["kd-cl-sr-student"]["values"].round(6).tolist()) <= {0.1, 0.5, 0.9}


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed (kdpipe[report])")
def test_plots_are_written_and_linked(tiny_experiment: tuple[Path, Path], tmp_path: Path
                                      ) -> None:
    _, out = tiny_experiment
    path = render_report(out, plots=True, out=tmp_path / "full")
    text = path.read_text()
    for name in ("eval_curves.png", "difficulty.png", "kd_weight.png", "pool_size.png"):
        png = tmp_path / "full" / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in text


def test_missing_matplotlib_is_a_clear_error(tiny_experiment: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ConfigError, match=r"kdpipe\[report\].*--no-plots"):
        render_report(tiny_experiment[1], plots=True)


def test_a_single_run_folder_and_a_foreign_folder(tiny_experiment: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    _, out = tiny_experiment
    run = out / "runs" / "kd" / "seed-1"
    text = render_report(run, plots=False, out=tmp_path / "one").read_text()
    record = json.loads((run / "final_metrics.json").read_text())
    assert "seed-1" in text and f"{record['eval_ce']:.4f}" in text
    with pytest.raises(ConfigError, match="neither an experiment folder"):
        render_report(tmp_path, plots=False)
