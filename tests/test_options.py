"""Options declared once: configs are the only declaration of every command's flags."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import typer

from kdpipe import options
from kdpipe.cli import main
from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer.config import EvalConfig, TrainConfig, read_config

STAGE_CONFIGS = (CacheTeacherConfig, BuildCurriculumConfig, TrainConfig, EvalConfig)


@pytest.mark.parametrize("cls", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_every_option_has_help_and_one_flag(cls: type) -> None:
    flags = options.flags(cls)
    assert all(f.field.metadata.get("help") for f in flags), [f.name for f in flags
                                                             if not f.field.metadata.get("help")]
    names = [f.cli for f in flags]
    assert len(names) == len(set(names))


def test_nested_options_are_flat_flags() -> None:
    names = {f.name for f in options.flags(TrainConfig)}
    assert {"loss", "temperature", "kd_weight", "mode", "chunk_size", "curriculum", "pacing",
            "reliance", "lr"} <= names
    cfg = TrainConfig.from_options(cache="c", out="o", loss="jsd", temperature=2.0,
                                   pacing="root", lr=1e-3)
    assert cfg.loss.kind == "jsd" and cfg.loss.temperature == 2.0
    assert cfg.curriculum.pacing == "root" and cfg.lr == 1e-3
    assert options.flat_values(cfg)["temperature"] == 2.0
    with pytest.raises(ConfigError, match="unknown option.*temprature"):
        TrainConfig.from_options(cache="c", out="o", temprature=2.0)
    with pytest.raises(ConfigError, match="missing required option.*--out"):
        TrainConfig.from_options(cache="c")


def test_declared_checks_report_each_value_once() -> None:
    cfg = TrainConfig.from_options(
        cache="c", out="o", lr=float("inf"), kd_weight=float("nan"), batch_size=0,
        eval_fraction=1.0, scheduler="cubic", temperature=-1.0)
    problems = options.field_problems(cfg)
    assert "--lr inf: must be a finite number" in problems
    assert "--kd-weight nan: must be a finite number" in problems
    assert "--batch-size 0 must be >= 1" in problems
    assert "--eval-fraction 1.0 must be within [0, 1)" in problems
    assert "--scheduler 'cubic' is not one of cosine, linear, constant, constant_with_warmup" \
        in problems
    assert "--temperature -1.0 must be within [0.05, 100]" in problems
    assert len(problems) == 6  # a NaN is reported once, not also as out of range
    cache = CacheTeacherConfig(out=Path("x"), tail_temperatures=(2.0, 0.0, float("inf")))
    assert options.field_problems(cache) == ["--tail-temperatures 2.0,0.0,inf: must be a "
                                             "finite number"]
    cache = replace(cache, tail_temperatures=(2.0, 0.0))
    assert options.field_problems(cache) == ["--tail-temperatures 0.0 must be within [0.05, 100]"]


def test_run_folders_with_flat_configs_still_read(tmp_path: Path) -> None:
    """Run folders written before the loss and curriculum options nested hold them flat."""
    cfg = TrainConfig.from_options(cache="c", out=str(tmp_path), student="s", loss="jsd",
                                   kd_weight=0.3, pacing="root", curriculum="x.parquet")
    RunLayout(tmp_path).config.write_text(json.dumps(options.flat_values(cfg)))
    assert read_config(tmp_path) == cfg
    RunLayout(tmp_path).config.write_text(json.dumps({**options.flat_values(cfg), "bogus": 1}))
    with pytest.raises(CacheFormatError, match="unknown field.*bogus"):
        read_config(tmp_path)


def test_the_generated_command_parses_every_kind_of_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated, comma-separated, boolean and nested options reach the config as typed."""
    seen: list[CacheTeacherConfig] = []
    monkeypatch.setattr("kdpipe.pipeline.cli._cache_teacher", seen.append)
    from kdpipe.pipeline import cli as pipeline_cli

    command = options.command(CacheTeacherConfig, pipeline_cli._cache_teacher, "doc")
    app = typer.Typer()
    app.command("cache-teacher")(command)
    runner_args = ["--out", str(tmp_path / "c"), "--teacher", "t", "--data", "a.jsonl",
                   "--data", "b.jsonl", "--tail-temperatures", "2,4", "--no-add-special-tokens",
                   "--top-k", "16"]
    typer.main.get_command(app).main(args=runner_args, standalone_mode=False)
    (cfg,) = seen
    assert cfg.data == ("a.jsonl", "b.jsonl") and cfg.tail_temperatures == (2.0, 4.0)
    assert cfg.add_special_tokens is False and cfg.top_k == 16 and cfg.out_dir == tmp_path / "c"
    with pytest.raises(SystemExit) as done:
        main(["cache-teacher", "--out", str(tmp_path / "c"), "--teacher", "t", "--data",
              "a.jsonl", "--tail-temperatures", "2,x"])
    assert done.value.code == 2
    assert "--tail-temperatures '2,x': expected comma-separated values" in \
        capsys.readouterr().err
