"""The `kdpipe` command line: parse options, build a stage's config, call the stage's function.

Every option can also come from a YAML file (`kdpipe COMMAND --config FILE ...`: keys are option
names, flat or under a section named after the command) or from an environment variable
`KDPIPE_<COMMAND>_<OPTION>` (e.g. `KDPIPE_CACHE_TEACHER_TOP_K=32`). Flags on the command line
win over the environment, which wins over the file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kdpipe import __version__, options
from kdpipe.schemas import write_errors
from kdpipe.schemas.errors import ConfigError, KdpipeError

app = typer.Typer(
    name="kdpipe",
    help="Knowledge distillation for language models: run the teacher once, cache what "
    "students need, train any number of students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
log = logging.getLogger("kdpipe")

USER_ERRORS = (KdpipeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def _register_commands() -> None:
    """Each stage's commands live in its package; this file only registers them."""
    from kdpipe import reports
    from kdpipe.pipeline import cli as pipeline_cli
    from kdpipe.trainer import cli as trainer_cli

    app.command("cache-teacher")(pipeline_cli.cache_teacher)
    app.command("inspect")(reports.inspect)
    app.command("verify")(reports.verify)

    app.command("train-student")(trainer_cli.train_student)
    app.command("evaluate")(trainer_cli.evaluate)
    from kdpipe.curriculum import cli as curriculum_cli

    app.command("build-curriculum")(curriculum_cli.build_curriculum)
    from kdpipe.demo import cli as demo_cli
    from kdpipe.experiments import cli as experiments_cli

    app.command("demo")(demo_cli.demo)
    app.command("experiment")(experiments_cli.experiment)
    app.command("report")(experiments_cli.report)


def _config_file_defaults(argv: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Strip `--config FILE` from argv and turn the file into click's `default_map`."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv, None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path, del_span = Path(args[i + 1]), slice(i, i + 2)
            break
        if arg.startswith("--config="):
            path, del_span = Path(arg.split("=", 1)[1]), slice(i, i + 1)
            break
    else:
        raise ConfigError("--config needs a file path")
    del args[del_span]
    command = next((a for a in args if not a.startswith("-")), None)
    if command is None:
        raise ConfigError("--config must come with a command, e.g. kdpipe train-student "
                          "--config run.yaml")
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    section = loaded.get(command, loaded)
    commands = getattr(typer.main.get_command(app), "commands", {})  # the click group's
    target = commands.get(command)
    known = {p.name for p in target.params} if target is not None else set()
    values = {str(k).replace("-", "_"): v for k, v in section.items()}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) for {command}: "
                          f"{', '.join(unknown)}")
    config_class = getattr(getattr(target, "callback", None), "config_class", None)
    if config_class is not None:  # a stage: its values as strictly as the experiment YAML's
        flags = {flag.name: flag for flag in options.flags(config_class)}
        problems = []
        for key, value in values.items():
            try:
                values[key] = options.convert_value(flags[key], value, key)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError(f"--config {path}: " + "; ".join(problems))
    return args, {command: values}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and exit code 2 for input the user can fix."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    try:
        _register_commands()
        args, default_map = _config_file_defaults(list(sys.argv[1:] if argv is None else argv))
        command = typer.main.get_command(app)
        with write_errors.at_command(args):  # a full or read-only disk: one line, not a trace
            command.main(args=args, prog_name="kdpipe", auto_envvar_prefix="KDPIPE",
                         default_map=default_map)
    except USER_ERRORS as exc:
        print(f"kdpipe: error: {exc}", file=sys.stderr)
        sys.exit(2)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False
          ) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
