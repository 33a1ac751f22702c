"""Errors that reach the user as one line: the CLI prints them without a traceback."""

from __future__ import annotations

import dataclasses
import math


class KdpipeError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(KdpipeError, ValueError):
    """A flag, option or input path is invalid; the message names it and what to do."""


class CacheFormatError(KdpipeError, ValueError):
    """A file on disk does not match the schema it claims (or any schema we know)."""


class NonFiniteError(KdpipeError, ArithmeticError):
    """A NaN or infinity where a number must be finite: a teacher output, a cached value, a
    loss or a gradient. The message names where it appeared and the remedy."""


def choice_problems(flag: str, value: object, choices: tuple[str, ...]) -> list[str]:
    """[] when `value` is one of `choices`, else the one-line problem every config reports."""
    if value in choices:
        return []
    return [f"{flag} {value!r} is not one of {', '.join(choices)}"]


def check_finite(config: object, what: str) -> None:
    """Raise one ConfigError naming every float option of a config dataclass (or float in a
    tuple option) that is NaN or infinite: `--lr inf` would pass `lr > 0`, and
    `--max-grad-norm nan` every comparison. Run before the range checks, which a non-finite
    value makes meaningless; `what` names the command in the message."""
    problems = []
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            shown = ",".join(map(str, values)) if isinstance(value, tuple) else value
            problems.append(f"--{field.name.replace('_', '-')} {shown}: must be a finite "
                            "number")
    if problems:
        raise ConfigError(f"invalid {what} options: " + "; ".join(problems))
