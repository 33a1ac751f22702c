"""Errors that reach the user as one line: the CLI prints them without a traceback."""

from __future__ import annotations


class KdpipeError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(KdpipeError, ValueError):
    """A flag, option or input path is invalid; the message names it and what to do."""


class CacheFormatError(KdpipeError, ValueError):
    """A file on disk does not match the schema it claims (or any schema we know)."""


class TeacherOutputError(KdpipeError, RuntimeError):
    """A teacher backend (vLLM) returned output the cache cannot hold as it stands; the message
    names the sample, the target position and the setting to change."""


class NonFiniteError(KdpipeError, ArithmeticError):
    """A NaN or infinity where a number must be finite: a teacher output, a cached value, a
    loss or a gradient. The message names where it appeared and the remedy."""


class StorageError(KdpipeError, OSError):
    """An object store that cannot be used: no credentials, no bucket, no connection after
    the library's retries; `schemas.storage` names the URL and what to do."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DiskError(KdpipeError, OSError):
    """Writing a file failed because the disk is full, the file system read-only or the folder
    not writable; `schemas.write_errors` names the path, what ran out and what to do."""

    def __str__(self) -> str:  # the message alone, never OSError's "[Errno N] ..." form
        return str(self.args[0]) if self.args else ""


def choice_problems(flag: str, value: object, choices: tuple[str, ...]) -> list[str]:
    """[] when `value` is one of `choices`, else the one-line problem every config reports."""
    if value in choices:
        return []
    return [f"{flag} {value!r} is not one of {', '.join(choices)}"]
