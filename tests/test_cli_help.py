"""`--help` tells the truth: readable at 80 columns, install hints intact, every option's help
from its one declaration, `--config` shown, environment variables named by the README's rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.core import TyperOption

from kdpipe import options
from kdpipe.cli import cli, main
from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.trainer.config import EvalConfig, TrainConfig

from .conftest import run_cli

COMMANDS = ("cache-teacher", "inspect", "verify", "train-student", "evaluate",
            "build-curriculum", "demo", "experiment", "report")
STAGE_CONFIGS = {"cache-teacher": CacheTeacherConfig, "build-curriculum": BuildCurriculumConfig,
                 "train-student": TrainConfig, "evaluate": EvalConfig}
THREADED = ("cache-teacher", "build-curriculum", "train-student", "evaluate", "demo",
            "experiment")
WIDTH = 80
# click's help puts descriptions after a name column of at most 30 characters, so at 80
# columns every description line has at least 80 - 34 = 46 characters to itself.
MAX_DESCRIPTION_INDENT = 34


def render_help(command: str, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch, width: int = WIDTH) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = run_cli([command, "--help"], capsys)
    assert code == 0, err
    return out


def squashed(text: str) -> str:
    """Text without whitespace: what survives any line wrapping."""
    return re.sub(r"\s+", "", text)


def description_columns(lines: list[str]) -> list[int]:
    """Where each description line of a help section starts: after an option's name and two
    spaces, or at the indent of a continued description."""
    columns = []
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("  -"):  # an option's line (a continued one is indented further)
            named = re.match(r"^(  -.*?\s{2,})\S", line)
            if named:
                columns.append(len(named.group(1)))
        else:
            columns.append(len(line) - len(line.lstrip()))
    return columns


def readme_envvar(command: str, long_flag: str) -> str:
    """README: `KDPIPE_<COMMAND>_<OPTION>`, e.g. KDPIPE_CACHE_TEACHER_TOP_K for --top-k."""
    return "KDPIPE_" + f"{command}_{long_flag.removeprefix('--')}".upper().replace("-", "_")


def command_options(command: str) -> list[TyperOption]:
    return [p for p in cli().commands[command].params if isinstance(p, TyperOption)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_readable_at_80_columns(command: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    text = render_help(command, capsys, monkeypatch)
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    columns = description_columns(lines[lines.index("Options:") + 1:])
    assert columns and max(columns) <= MAX_DESCRIPTION_INDENT, text
    flat = squashed(text)
    for option in command_options(command):
        assert squashed(option.help or "") in flat, option.opts  # never cut short
        if not option.is_eager:  # the variable's name whole, never cut
            assert f"envvar:{readme_envvar(command, max(option.opts, key=len))}" in flat


@pytest.mark.parametrize("command", sorted(STAGE_CONFIGS))
def test_stage_help_comes_from_the_declarations(command: str,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    flat = squashed(render_help(command, capsys, monkeypatch))
    for flag in options.flags(STAGE_CONFIGS[command]):
        assert squashed(flag.cli) in flat
        assert squashed(flag.field.metadata["help"]) in flat, flag.cli
    assert squashed("--config FILE") in flat and squashed(options.CONFIG_HELP) in flat


@pytest.mark.parametrize("command", THREADED)
def test_every_stage_takes_threads(command: str, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    flat = squashed(render_help(command, capsys, monkeypatch))
    assert squashed("--threads") in flat and squashed(options.THREADS_HELP) in flat


@pytest.mark.parametrize(("command", "hint"), [("cache-teacher", "pip install 'kdpipe[vllm]'"),
                                               ("report", "pip install 'kdpipe[report]'")])
def test_install_hints_keep_their_extras(command: str, hint: str,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    text = render_help(command, capsys, monkeypatch, width=200)
    assert hint in text


def test_install_hint_in_an_error_keeps_its_extra(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from kdpipe.pipeline import teacher_vllm

    if teacher_vllm.vllm_importable():
        pytest.skip("vLLM is installed here")
    code, _, err = run_cli(["cache-teacher", "--teacher", "t", "--data", "d", "--backend",
                            "vllm", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "pip install 'kdpipe[vllm]'" in err
    assert not (tmp_path / "out").exists()


def test_envvar_names_follow_the_readme_rule() -> None:
    group = cli()
    assert set(COMMANDS) == set(group.commands)
    for name, command in group.commands.items():
        for param in command.params:
            if not isinstance(param, TyperOption):
                continue
            expected = None if param.is_eager else readme_envvar(name, max(param.opts, key=len))
            assert param.envvar == expected, (name, param.opts, param.envvar)
    assert command_options("inspect")[0].envvar == "KDPIPE_INSPECT_JSON"
    assert all(p.envvar is None for p in group.params)  # --version reads nothing


def test_version_is_not_read_from_the_environment(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from kdpipe import __version__

    monkeypatch.setenv("KDPIPE_VERSION", "1")
    code, out, _ = run_cli(["inspect", "--help"], capsys)
    assert code == 0 and "Usage: kdpipe inspect" in out
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == __version__


def test_an_option_reads_its_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDPIPE_EVALUATE_BATCH_SIZE", "0")
    code, _, err = run_cli(["evaluate", "--student", "s", "--cache", str(tmp_path)], capsys)
    assert code == 2 and "--batch-size 0 must be >= 1" in err


def test_a_repeated_option_reads_space_separated_values(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("KDPIPE_EVALUATE_CACHE", f"{a} {b}")  # two values: both reported
    code, _, err = run_cli(["evaluate", "--student", "s"], capsys)
    assert code == 2 and f"--cache {a}: no such folder" in err and f"--cache {b}" in err
    for variable, value in (("KDPIPE_EVALUATE_CACHE", f"{a},{b}"),
                            ("KDPIPE_EVALUATE_TEACHER_WEIGHT", "1,2")):
        monkeypatch.setenv(variable, value)
        code, _, err = run_cli(["evaluate", "--student", "s"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "separate the values of a repeated option with spaces, not commas: " \
               f"{variable}=\"{value.replace(',', ' ')}\"" in err
        monkeypatch.delenv(variable)
    # a comma inside an existing path is that path
    odd = tmp_path / "x,y"
    odd.mkdir()
    monkeypatch.setenv("KDPIPE_EVALUATE_CACHE", str(odd))
    code, _, err = run_cli(["evaluate", "--student", "s"], capsys)
    assert "not commas" not in err


def test_config_file_keys_get_a_suggestion(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("evaluate:\n  batch-sise: 4\n  max_sample: 3\n  zzz: 1\n")
    code, _, err = run_cli(["evaluate", "--config", str(config)], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line
    assert "unknown option(s) for evaluate: batch-sise (did you mean 'batch-size'?), " \
        "max_sample (did you mean 'max_samples'?), zzz" in line
    assert "zzz (did you mean" not in line


def test_config_file_is_read_before_the_other_options(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """Required options may come from the file, wherever --config stands on the line;
    comma-separated options take a YAML list."""
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher: t\ndata: [d.jsonl]\nout: {tmp_path / 'out'}\n"
                      "tail_temperatures: [2, 4]\nbackend: vllm\n")
    code, _, err = run_cli(["cache-teacher", "--top-k", "4", "--config", str(config)], capsys)
    assert code == 2 and "--tail-temperatures needs --backend hf" in err  # read, then checked
    code, _, err = run_cli(["cache-teacher", "--config", str(config), "--backend", "hf"], capsys)
    assert code == 2 and "d.jsonl: file not found" in err  # every option valid; next: the data


def test_commands_without_a_config_refuse_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--config", "x.yaml", "cache"])
    assert info.value.code == 2
    assert "No such option: --config" in capsys.readouterr().err


def test_help_does_not_import_torch() -> None:
    """`--help` answers in a fraction of a second: no command's options need torch (seconds to
    import), so it is loaded only when a stage runs."""
    import subprocess  # a fresh interpreter: this one imported torch long ago
    import sys

    probe = ("import sys\nfrom kdpipe.cli import main\nfor command in sys.argv[1:]:\n"
             "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
             "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", probe, *COMMANDS], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("args", "expected"), [
    (["train-student", "--bogus"], "No such option: --bogus"),
    (["cache-teacher", "--top-k", "abc"], "Invalid value for '--top-k'"),
    (["nope"], "No such command 'nope'"),
    (["evaluate", "--cache", "c"], "Missing option '--student'"),
])
def test_usage_errors_are_one_line(args: list[str], expected: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"kdpipe: error: {expected}")
    assert f"(see 'kdpipe {args[0]} --help')" in err or args == ["nope"]


@pytest.mark.parametrize("config", [TrainConfig, EvalConfig])
def test_read_ahead_help_says_each_cache_reads_ahead(config: type) -> None:
    # several teachers: one read-ahead of the whole budget per --cache, so J times the memory
    flag = next(f for f in options.flags(config) if f.cli == "--read-ahead")
    text = flag.field.metadata["help"]
    assert "per --cache" in text and "J teachers hold J such copies" in text
