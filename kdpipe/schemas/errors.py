"""Errors that reach the user as one line: the CLI prints them without a traceback."""


class KdpipeError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(KdpipeError, ValueError):
    """A flag, option or input path is invalid; the message names it and what to do."""


class CacheFormatError(KdpipeError, ValueError):
    """A file on disk does not match the schema it claims (or any schema we know)."""


def choice_problems(flag: str, value: object, choices: tuple[str, ...]) -> list[str]:
    """[] when `value` is one of `choices`, else the one-line problem every config reports."""
    if value in choices:
        return []
    return [f"{flag} {value!r} is not one of {', '.join(choices)}"]
