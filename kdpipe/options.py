"""Options declared once: a config dataclass field is its flag, YAML key and environment variable.

A stage's config is a frozen dataclass whose fields are declared with `option(...)`: default,
help text, and the checks every value must pass. From that one declaration

* `command(Config, run)` makes the typer command: one flag per field, nested configs
  flattened (`TrainConfig.loss.temperature` is `--temperature`), with typer's help, its
  `--x/--no-x` booleans and a `--config FILE` of YAML values (read into click's default map
  before any other option, so flags and environment variables still win; the
  `KDPIPE_<COMMAND>_<OPTION>` variables are named in `kdpipe/cli.py`);
* `build(Config, {...})` makes a config from flat option names, as the command, the
  experiment runner and tests do;
* `field_problems(config)` runs every declared check: finite numbers, bounds, choices.
  Checks that involve several options live in each config's `problems()`.

Why typer and a generated signature rather than tyro, HfArgumentParser or pydantic-settings:
typer already parses our commands, reads environment variables and config files and renders
help; it builds a command from a function's signature, so giving it a signature derived from
the dataclass is all that is missing. tyro would replace typer for half the commands and has
no environment variables; HfArgumentParser is argparse without environment variables or
nested dataclasses; pydantic-settings names nested options `--loss.temperature`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.storage import is_url

C = TypeVar("C")

DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N."
PROGRESS_HELP = "Show a progress bar."
REMOTE_CODE_HELP = "Allow the model/tokenizer to run code from its repository."
CONFIG_HELP = ("YAML file of option values: keys are this command's option names (kd_weight or "
               "kd-weight), flat or under a section named after the command. Flags and "
               "environment variables win over it.")
# The rule itself is `torch_runtime.auto_threads`; README.md's "CPU threads" says it at length.
THREADS_HELP = ("Torch CPU threads of this process. 0 (auto): OMP_NUM_THREADS when set, else "
                "half the CPUs this process may use, shared among the processes of one job "
                "on this machine, from 1 to 8.")
LOCAL_CACHE_HELP = ("A cache given as a URL (s3://, gs://, ...): keep verified copies of its "
                    "shards in this node-local folder, so later epochs and other runs on the "
                    "node read them from disk (default: stream them from the store). See "
                    "docs/storage.md.")
VERIFY_READS_HELP = ("Check each cache shard's sha256 against the manifest before first reading "
                     "it (--no-verify-reads: skip, for a cache `kdpipe verify` has passed).")


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None,
           choices: Sequence[str] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           comma_separated: bool = False) -> Any:
    """A config field that is a command-line option.

    `flag`: its name on the command line, in YAML and in the environment (default: the field's
    name; nested configs need their own, e.g. `LossConfig.kind` is `--loss`). `choices`,
    `ge`/`gt`/`le`/`lt`: checks of the value (None always passes). A tuple field is a
    repeatable flag, or one comma-separated value with `comma_separated`.
    """
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None,
                "bounds": (ge, gt, le, lt), "comma_separated": comma_separated}
    if default is MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Flag:
    """One leaf option of a (possibly nested) config class."""

    name: str  # python identifier: --name-with-dashes, YAML key, env var suffix
    path: tuple[str, ...]  # attribute path in the config, e.g. ("loss", "temperature")
    hint: Any  # the field's resolved type
    field: dataclasses.Field

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return MISSING


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def flags(cls: type, prefix: tuple[str, ...] = ()) -> list[Flag]:
    """Every leaf option of `cls`, nested configs flattened, in declaration order."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _is_config(hint):
            found += flags(hint, prefix + (f.name,))
        else:
            found.append(Flag(f.metadata.get("flag") or f.name, prefix + (f.name,), hint, f))
    names = [flag.name for flag in found]
    assert len(names) == len(set(names)), f"{cls.__name__}: two options share a flag name"
    return found


def _tuple_item(hint: Any) -> Any | None:
    """T of a `tuple[T, ...]` hint, else None."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    return None


def _parse_comma_separated(text: str, item: type, flag: str) -> tuple[Any, ...]:
    try:
        return tuple(item(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated values, e.g. 2,4") from exc


def did_you_mean(name: Any, known: Iterable[str]) -> str:
    """" (did you mean 'x'?)" naming the closest of `known` to a misspelled `name`, else "".

    Dashes and underscores count as the same (`kd-weight` is `kd_weight`); the suggestion is
    spelled the way `name` was.
    """
    text = str(name)
    close = difflib.get_close_matches(text.replace("-", "_"),
                                      [k.replace("-", "_") for k in known], n=1)
    if not close:
        return ""
    shown = close[0].replace("_", "-") if "-" in text else close[0]
    return f" (did you mean {shown!r}?)"


def unknown_names(names: Iterable[Any], known: Iterable[str]) -> str:
    """The unknown `names`, comma-separated, each with its `did_you_mean` hint."""
    known = list(known)
    return ", ".join(f"{name}{did_you_mean(name, known)}" for name in names)


def build(cls: type[C], values: dict[str, Any]) -> C:
    """A `cls` from flat option values (missing ones keep their defaults).

    Raises ConfigError naming unknown options and required ones that are missing.
    """
    known = {flag.name for flag in flags(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for {cls.__name__}: "
                          f"{unknown_names(unknown, known)}")
    return _build(cls, values)


def _build(cls: type[C], values: dict[str, Any]) -> C:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    missing = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        name = f.metadata.get("flag") or f.name
        if _is_config(hint):
            kwargs[f.name] = _build(hint, values)
        elif name in values:
            kwargs[f.name] = values[name]
        elif f.default is MISSING and f.default_factory is MISSING:
            missing.append("--" + name.replace("_", "-"))
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    return cls(**kwargs)


def nested(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """Flat {option name: value} as the nested dict of `cls`'s fields (the JSON form of a
    config); names that are no option of `cls` stay at the top, for the reader to report."""
    known = {flag.name for flag in flags(cls)}
    return {**_nest(cls, flat), **{k: v for k, v in flat.items() if k not in known}}


def _nest(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("flag") or f.name
        if _is_config(hints[f.name]):
            out[f.name] = _nest(hints[f.name], flat)
        elif name in flat:
            out[f.name] = flat[name]
    return out


def flat_values(config: Any) -> dict[str, Any]:
    """{flag name: value} of every leaf option of a config instance."""
    values = {}
    for flag in flags(type(config)):
        value = config
        for attr in flag.path:
            value = getattr(value, attr)
        values[flag.name] = value
    return values


def convert_value(flag: Flag, value: Any, where: str | None = None) -> Any:
    """A YAML or JSON value as `flag`'s type, strictly: an integer never from a fraction or a
    boolean, a boolean only from a boolean; numbers also from numeric strings (YAML 1.1 reads
    `2e-3` as one). Raises ConfigError naming `where` (default: the flag)."""
    return _convert(value, flag.hint, where or flag.cli)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        errors = []
        for choice in options:
            try:
                return _convert(value, choice, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(v, typing.get_args(hint)[0], where) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, found {value!r}")
    if hint in (int, float):
        wrong = f"{where}: expected {'an integer' if hint is int else 'a number'}, found {value!r}"
        accepted = (int, str) if hint is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(wrong)
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(wrong) from None
    if hint in (str, Path):
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, found {value!r}")
        return hint(value)
    return value


# ---- checks ------------------------------------------------------------------------------

def _bound_problem(flag: str, value: float, bounds: tuple[float | None, ...]) -> str | None:
    ge, gt, le, lt = bounds
    low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    high_ok = (le is None or value <= le) and (lt is None or value < lt)
    if low_ok and high_ok:
        return None
    low, high = ge if ge is not None else gt, le if le is not None else lt
    if low is not None and high is not None:
        interval = (f"{'[' if ge is not None else '('}{low:g}, {high:g}"
                    f"{']' if le is not None else ')'}")
        return f"{flag} {value} must be within {interval}"
    if low is not None:
        return f"{flag} {value} must be {'>=' if ge is not None else '>'} {low:g}"
    return f"{flag} {value} must be {'<=' if le is not None else '<'} {high:g}"


def field_problems(config: Any) -> list[str]:
    """Every declared check of every option of `config` that fails, one line each.

    A float must be finite first (`--lr inf` would pass `> 0`, `--max-grad-norm nan` any
    comparison); its bounds are checked only then, so each value gets one message.
    """
    problems = []
    values = flat_values(config)
    for flag in flags(type(config)):
        value = values[flag.name]
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            shown = ",".join(map(str, items)) if isinstance(value, tuple) else value
            problems.append(f"{flag.cli} {shown}: must be a finite number")
            continue
        choices = flag.field.metadata.get("choices")
        if choices and value is not None and value not in choices:
            problems.append(f"{flag.cli} {value!r} is not one of {', '.join(choices)}")
        bounds = flag.field.metadata.get("bounds", (None,) * 4)
        for item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                problem = _bound_problem(flag.cli, item, bounds)
                if problem is not None:
                    problems.append(problem)
                    break
    return problems


def raise_problems(command: str, problems: list[str]) -> None:
    """One ConfigError listing every problem of a command's options, or nothing."""
    if problems:
        raise ConfigError(f"invalid {command} options: " + "; ".join(problems))


# ---- the command -------------------------------------------------------------------------

CONFIG_PARAMETER = "config"  # `--config FILE`, on every generated command


def _cli_annotation(flag: Flag) -> tuple[Any, Any]:
    """(annotation, default) of the typer parameter for `flag`."""
    metadata = flag.field.metadata
    info = typer.Option(help=metadata.get("help", ""))
    default = flag.default
    item = _tuple_item(flag.hint)
    if item is not None and metadata.get("comma_separated"):
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default or ())
        return Annotated[str, info], shown
    if item is not None:
        return Annotated[list[item] | None, info], None  # type: ignore[valid-type]
    return Annotated[flag.hint, info], default


def _from_cli(flag: Flag, value: Any) -> Any:
    item = _tuple_item(flag.hint)
    if item is None:
        return value
    if flag.field.metadata.get("comma_separated"):
        return _parse_comma_separated(value, item, flag.cli)
    return tuple(value or ())


def _to_cli(flag: Flag, value: Any) -> Any:
    """A converted value as its typer parameter takes it (the inverse of `_from_cli`)."""
    if flag.field.metadata.get("comma_separated") and isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def read_config_file(path: Path, command: str, cls: type) -> dict[str, Any]:
    """The values a `--config` YAML file gives `command`'s options, keyed by option name.

    Keys are option names (dashes or underscores), flat or under a section named `command`;
    values are converted as strictly as an experiment file's. Raises FileNotFoundError, or
    one ConfigError naming the file and every unknown key (with the closest option name) and
    every value that does not fit its option.
    """
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})"
                          ) from exc
    section = loaded.get(command, loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    by_name = {flag.name: flag for flag in flags(cls)}
    unknown = [key for key in section if str(key).replace("-", "_") not in by_name]
    problems = [f"unknown option(s) for {command}: {unknown_names(unknown, by_name)}"
                ] if unknown else []
    values = {}
    for key, value in section.items():
        flag = by_name.get(str(key).replace("-", "_"))
        if flag is None:
            continue
        try:
            values[flag.name] = _to_cli(flag, convert_value(flag, value, str(key)))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"--config {path}: " + "; ".join(problems))
    return values


def _config_parameter(cls: type) -> inspect.Parameter:
    """`--config FILE`: eager, so its values become click's defaults before any other option
    is read (click then takes a flag first, then an environment variable, then the file)."""

    def load(ctx: Any, param: Any, value: Path | None) -> Path | None:
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}),
                               **read_config_file(value, ctx.info_name, cls)}
        return value

    info = typer.Option("--config", metavar="FILE", help=CONFIG_HELP, is_eager=True,
                        callback=load)
    return inspect.Parameter(CONFIG_PARAMETER, inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[Path | None, info], default=None)


def command(cls: type[C], run: Callable[[C], None], doc: str) -> Callable[..., None]:
    """A typer command whose options are `cls`'s (and `--config FILE`); it builds the config
    and calls `run`."""
    all_flags = flags(cls)
    assert CONFIG_PARAMETER not in {f.name for f in all_flags}, "--config is taken"
    parameters = [_config_parameter(cls)]
    for flag in all_flags:
        annotation, default = _cli_annotation(flag)
        parameters.append(inspect.Parameter(
            flag.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
            default=inspect.Parameter.empty if default is MISSING else default))

    def callback(**values: Any) -> None:
        run(build(cls, {f.name: _from_cli(f, values[f.name]) for f in all_flags}))

    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    callback.__doc__ = doc
    callback.__name__ = cls.__name__
    return callback


def path_problems(flag: str, value: str | Path | None, kind: str) -> list[str]:
    """[] when `value` is None or an existing file (`kind` "file") or folder ("dir")."""
    if value is None or is_url(value):  # a URL is checked when it is opened
        return []
    path = Path(value)
    if kind == "dir" and not path.is_dir():
        return [f"{flag} {value}: no such folder"]
    if kind == "file" and not path.is_file():
        return [f"{flag} {value}: no such file"]
    return []
