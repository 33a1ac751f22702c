"""The `kdpipe` command line: parse options, build a stage's config, call the stage's function.

Every option of a stage can also come from a YAML file (`kdpipe COMMAND --config FILE ...`:
keys are option names, flat or under a section named after the command; `options.py` reads
it) or from an environment variable `KDPIPE_<COMMAND>_<OPTION>` (e.g.
`KDPIPE_CACHE_TEACHER_TOP_K=32`). Flags on the command line win over the environment, which
wins over the file.

Help is click's plain layout rather than typer's rich panels: rich reads `[vllm]` in an
install hint as markup and drops it, and squeezes descriptions to a few characters at 80
columns.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup, TyperOption

from kdpipe import __version__
from kdpipe.log_setup import configure_logging
from kdpipe.schemas import write_errors
from kdpipe.schemas.errors import KdpipeError

app = typer.Typer(
    name="kdpipe",
    help="Knowledge distillation for language models: run the teacher once, cache what "
    "students need, train any number of students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
log = logging.getLogger("kdpipe")

# typer vendors click, so its UsageError is reached through a class typer exports (typed as
# that subclass: only UsageError's attributes are used).
USAGE_ERROR: type[typer.BadParameter] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
USER_ERRORS = (KdpipeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
ENV_PREFIX = "KDPIPE"


def _register_commands() -> None:
    """Each stage's commands live in its package; this file only registers them (once)."""
    if app.registered_commands:
        return
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


def envvar_name(command: str, option: TyperOption) -> str:
    """The README's rule: `KDPIPE_<COMMAND>_<OPTION>`, OPTION being the option's long flag
    (`--json` is JSON, `--pack/--no-pack` is PACK), upper case, `-` as `_`."""
    flag = max(option.opts, key=len).lstrip("-")
    return f"{ENV_PREFIX}_{command}_{flag}".upper().replace("-", "_")


def _name_environment_variables(group: TyperGroup) -> None:
    """Give every option of every command its variable by `envvar_name`.

    Set here rather than by click's `auto_envvar_prefix`, which names a variable after the
    Python parameter (`inspect --json` read KDPIPE_INSPECT_AS_JSON) and gives eager options one
    too (KDPIPE_VERSION=1 turned every command into a version print). Eager options
    (`--help`, `--version`, `--config`) read no variable.
    """
    for name, command in group.commands.items():
        for param in command.params:
            if isinstance(param, TyperOption) and not param.is_eager:
                param.envvar = envvar_name(name, param)
                if param.multiple:
                    _refuse_commas(param)


def _refuse_commas(option: TyperOption) -> None:
    """A repeatable option's variable holds its values separated by spaces, as click splits
    it (`KDPIPE_TRAIN_STUDENT_CACHE="a b"`). A value with a comma that names no existing
    path ("a,b", "1,2") was meant as a list: refuse it with one line saying so, instead of
    click's parse error or a "no such folder" for the joined text."""
    read = option.value_from_envvar

    def value_from_envvar(ctx: Any) -> Any:  # click's Context, as typer vendors it
        raw = option.resolve_envvar_value(ctx)
        if raw and any("," in part and not Path(part).exists() for part in raw.split()):
            raise typer.BadParameter(
                "separate the values of a repeated option with spaces, not commas: "
                f"{option.envvar}=\"{raw.replace(',', ' ')}\"", ctx=ctx, param=option)
        return read(ctx)

    option.value_from_envvar = value_from_envvar  # type: ignore[method-assign]


def cli() -> TyperGroup:
    """The `kdpipe` command, every command registered and its variables named."""
    _register_commands()
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    _name_environment_variables(group)
    return group


def _exit(code: int) -> NoReturn:
    """sys.exit, except in a process torchrun started: there, tearing the interpreter down
    after a finished run can destroy torch.distributed's C++ threads while they are still
    joinable, and the process aborts ("terminate called without an active exception",
    SIGABRT) instead of exiting with `code`. So run the exit handlers, flush, and leave
    without the teardown; every file kdpipe writes is closed (and synced) by then."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(code)
    atexit._run_exitfuncs()  # e.g. temporary folders of remote caches
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and exit code 2 for input the user can fix (a run
    stopped by SIGINT/SIGTERM after saving: 128 + the signal's number, as shells report it)."""
    configure_logging()
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        with write_errors.at_command(args):  # a full or read-only disk: one line, not a trace
            # Not standalone: click would print its usage errors on four lines.
            code = cli().main(args=args, prog_name="kdpipe", standalone_mode=False)
    except USER_ERRORS as exc:
        print(f"kdpipe: error: {exc}", file=sys.stderr)
        _exit(getattr(exc, "exit_code", 2))  # a run stopped by a signal: 128 + its number
    except USAGE_ERROR as exc:  # an unknown option or command, a value of the wrong type
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `kdpipe`: the help itself
            exc.show()
            _exit(exc.exit_code)
        command = exc.ctx.command_path if exc.ctx is not None else "kdpipe"
        print(f"kdpipe: error: {exc.format_message().rstrip('.')} (see '{command} --help')",
              file=sys.stderr)
        _exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        print("kdpipe: aborted", file=sys.stderr)
        _exit(1)
    _exit(code if isinstance(code, int) else 0)  # `Exit(n)`: e.g. 130 after Ctrl-C


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True,
                                                help="Print the version.")] = False) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
