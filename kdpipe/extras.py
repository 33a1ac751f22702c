"""Optional dependencies: imported only where used, with the install line when missing.

Heavy or specialised libraries live in extras of the package (pyproject.toml), so a machine
that caches teachers need not install what reports need, and the other way round.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from kdpipe.schemas.errors import ConfigError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`import module`, or a one-line ConfigError naming the extra that provides it.

    `purpose` completes "... needs `module` for PURPOSE", e.g. "confidence intervals".
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(_install_line(module, extra, purpose)) from exc


def missing(module: str, extra: str, purpose: str) -> str | None:
    """The line `require` would raise when `module` is not installed, else None; without
    importing it (for checks of a command's options, reported with the others)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return _install_line(module, extra, purpose)
    return None


def _install_line(module: str, extra: str, purpose: str) -> str:
    top = module.split(".")[0]
    return (f"kdpipe needs {top} for {purpose}, and it is not installed: "
            f"pip install 'kdpipe[{extra}]' (or {top})")
