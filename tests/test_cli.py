"""Option sources: command line over environment over `--config FILE`, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def cache_args(tmp_path: Path) -> list[str]:
    return ["cache-teacher", "--teacher", "t", "--data", "d.jsonl", "--out",
            str(tmp_path / "out")]


def test_config_file_fills_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("cache-teacher:\n  top-k: 0\n  max_length: 1\n")
    code, err = run([*cache_args(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "--top-k 0 must be >= 1" in err and "--max-length 1 must be >= 2" in err


def test_flags_beat_environment_beat_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("top_k: 0\n")
    monkeypatch.setenv("KDPIPE_CACHE_TEACHER_TOP_K", "-3")
    code, err = run([*cache_args(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "--top-k -3 must be >= 1" in err
    code, err = run([*cache_args(tmp_path), "--config", str(config), "--top-k", "4"], capsys)
    assert code == 2 and "--top-k" not in err and "d.jsonl" in err  # next problem: the data


def test_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("top_k: 8\nsurprise: 1\n")
    code, err = run([*cache_args(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "unknown option(s) for cache-teacher: surprise" in err
    code, err = run([*cache_args(tmp_path), "--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "none.yaml: file not found" in err
    config.write_text("[unclosed")
    code, err = run([*cache_args(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "not valid YAML" in err


def test_config_file_values_are_converted_strictly(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A fraction for an integer, or 1 for a boolean, is refused, never truncated or guessed;
    YAML 1.1's string for `2e-3` is a number."""
    config = tmp_path / "run.yaml"
    config.write_text("top_k: 3.5\nstrict: 1\n")
    code, err = run([*cache_args(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "top_k: expected an integer, found 3.5" in err
    assert "strict: expected true or false, found 1" in err
    config.write_text("gpu_memory_utilization: 5e-1\ntop_k: '4'\n")
    code, err = run([*cache_args(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "expected" not in err and "d.jsonl" in err  # next problem: the data


def test_logging_leaves_out_bitsandbytes_cpu_kernel_warning() -> None:
    """bitsandbytes' warning about its optional 4-bit CPU kernels (printed on import where the
    CPU has AVX512-BF16) concerns nothing kdpipe runs; other bitsandbytes warnings still show."""
    import logging

    from kdpipe.log_setup import configure_logging

    configure_logging()
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not quiet.isEnabledFor(logging.WARNING) and quiet.isEnabledFor(logging.ERROR)
    assert logging.getLogger("bitsandbytes").isEnabledFor(logging.WARNING)
