"""What transformers raises when it refuses a model, a config or a tokenizer, as one line.

Besides OSError (a missing file) and ValueError (bad settings), transformers' config classes
are validated by huggingface_hub's strict dataclasses, whose StrictDataclassError is no
ValueError, and whose message names the validator on its first line and the reason on its
last ("ValueError: The hidden size (30) is not a multiple of ...").
"""

from __future__ import annotations


def refusals() -> tuple[type[BaseException], ...]:
    """The exception types to turn into a one-line ConfigError around a transformers load:
    a missing file, a package it needs, bad settings, a JSON file of another shape, or a
    config validator's error."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' own dependency

    return (OSError, ImportError, ValueError, KeyError, TypeError, StrictDataclassError)


def refusal_reason(exc: BaseException) -> str:
    """Why transformers refused, in one line: the reason line of a validator's error, else
    the message's first line, else the exception's type."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if "validation error" in lines[0].lower() else lines[0]
