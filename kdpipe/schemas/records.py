"""Frozen dataclasses <-> JSON, with type checking on read.

Every JSON file kdpipe writes (manifests, run configs, curriculum metadata) is a frozen
dataclass. `from_dict` checks each field's presence and type so a hand-edited or truncated file
fails with a message naming the field, instead of a KeyError deep inside a stage.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from kdpipe.schemas.errors import CacheFormatError

T = TypeVar("T")


def to_dict(record: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able data (tuples become lists)."""
    return dataclasses.asdict(record)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, where)
            except CacheFormatError as exc:
                errors.append(str(exc))
        raise CacheFormatError(f"{where}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is not None:
            raise CacheFormatError(f"{where}: expected null, found {value!r}")
        return None
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise CacheFormatError(f"{where}: expected a list, found {type(value).__name__}")
        return tuple(_convert(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise CacheFormatError(f"{where}: expected an object, found {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CacheFormatError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if hint is int and isinstance(value, bool):
        raise CacheFormatError(f"{where}: expected an integer, found {value!r}")
    if hint is Any:
        return value
    if not isinstance(value, hint):
        raise CacheFormatError(f"{where}: expected {hint.__name__}, found {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from JSON data, checking every field; `where` prefixes errors."""
    if not isinstance(data, dict):
        raise CacheFormatError(f"{where}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in data:
            has_default = (field.default is not dataclasses.MISSING
                           or field.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise CacheFormatError(f"{where}: missing field '{field.name}'")
        kwargs[field.name] = _convert(data[field.name], hints[field.name],
                                      f"{where}.{field.name}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise CacheFormatError(f"{where}: unknown field(s) {sorted(unknown)}")
    return cls(**kwargs)


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning syntax errors into a CacheFormatError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheFormatError(f"{path}: not valid JSON ({exc}); was it edited by hand?") from exc
