"""What a row of `--data` is, and which of its parts are trained (docs/chat-data.md).

Three formats (`--format`):

* `text`: one text field per row (`--text-field`), or a `.txt` file; every token is trained.
* `messages`: a conversation, a list of `{role, content}` messages (`--messages-field`), as
  Hugging Face datasets and OpenAI write them; optional tool definitions (`--tools-field`).
* `prompt-completion` (TRL's convention): `--prompt-field` and `--completion-field`, both
  strings or both lists of messages.

`auto` looks at the first rows of the first source and picks the first format whose fields are
there, in that order of preference: messages, then prompt and completion, then text.

`parse_row` checks one row and says which messages are trained (`--train-on`); a malformed
row raises `Malformed`, which the reader turns into a counted skip (or a stop under
`--strict`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kdpipe.pipeline.corpus import Field, first_fields
from kdpipe.schemas.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "messages", "prompt-completion")
TRAIN_ON = ("assistant", "last-assistant", "completion", "all")
OVERLONG = ("truncate", "skip")
DEFAULT_TRAIN_ON = {"text": "all", "messages": "assistant", "prompt-completion": "completion"}
# Roles of OpenAI's and the common chat templates' messages. Only assistant turns are trained;
# tool results (tool; ipython in Llama 3.1; function in OpenAI's older API) never are.
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


class Malformed(ValueError):
    """A row that cannot be read as its format says: `field` names where, `reason` what."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class DataFormat:
    """A `--format` and the column names it reads."""

    kind: str = "auto"  # one of FORMATS; never "auto" once resolved
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tools_field: str = "tools"

    def fields(self) -> list[Field]:
        """The columns every row of this (resolved) format must hold."""
        if self.kind == "messages":
            return [Field(self.messages_field, "--messages-field", "the conversations")]
        if self.kind == "prompt-completion":
            return [Field(self.prompt_field, "--prompt-field", "the prompts"),
                    Field(self.completion_field, "--completion-field", "the completions")]
        return [Field(self.text_field)]

    def settings(self) -> dict[str, str]:
        """The format and the fields it reads, by option name (what a cache records)."""
        fields = {"text": ("text_field",), "messages": ("messages_field", "tools_field"),
                  "prompt-completion": ("prompt_field", "completion_field", "tools_field")}
        return {"format": self.kind, **{f: getattr(self, f) for f in fields[self.kind]}}


def resolve_format(fmt: DataFormat, sources: Sequence[str], split: str | None) -> DataFormat:
    """`fmt` itself, or for `auto` the format the first rows of the first source have (logged
    in one line). A source with none of the fields is read as text, whose reader then names
    the missing text field."""
    if fmt.kind != "auto":
        return fmt
    source = sources[0]
    for names in first_fields(source, split):
        if fmt.messages_field in names:
            kind, why = "messages", f"field {fmt.messages_field!r}"
        elif fmt.prompt_field in names and fmt.completion_field in names:
            kind, why = "prompt-completion", (f"fields {fmt.prompt_field!r} and "
                                              f"{fmt.completion_field!r}")
        elif fmt.text_field in names:
            kind, why = "text", f"field {fmt.text_field!r}"
        else:
            continue
        log.info("--format auto: chose %s (%s in the first rows of %s)", kind, why, source)
        return replace(fmt, kind=kind)
    log.info("--format auto: chose text (no %r, %r and %r, or %r field in the first rows of %s)",
             fmt.messages_field, fmt.prompt_field, fmt.completion_field, fmt.text_field, source)
    return replace(fmt, kind="text")


def train_on_problem(kind: str, train_on: str | None) -> str | None:
    """Why `--train-on` does not fit data of format `kind`, or None when it does."""
    if train_on is None or kind == "auto":
        return None
    if kind == "text" and train_on != "all":
        return (f"--train-on {train_on}: plain text (--format text) has no turns to choose "
                "from, so every token is trained; drop --train-on, or read conversations with "
                "--format messages or prompt-completion")
    if kind == "messages" and train_on == "completion":
        return ("--train-on completion: conversations (--format messages) have no separate "
                "completion; pass --train-on last-assistant to train on the final reply, or "
                "assistant for every reply")
    return None


def resolve_train_on(kind: str, train_on: str | None) -> str:
    """`train_on`, or the default of a resolved format `kind`. Raises ConfigError when it does
    not fit the format."""
    problem = train_on_problem(kind, train_on)
    if problem is not None:
        raise ConfigError(problem)
    return train_on or DEFAULT_TRAIN_ON[kind]


@dataclass(frozen=True)
class Conversation:
    """One row, checked: chat messages to render, or a plain prompt and completion.

    `trained` are the indices of the messages whose turns are targets (chat), `everything`
    marks `--train-on all`. A plain row has no messages; its completion is its target.
    """

    messages: tuple[dict[str, Any], ...] = ()
    tools: list[Any] | None = None
    trained: tuple[int, ...] = ()
    everything: bool = False
    prompt: str = ""
    completion: str = ""


def parse_row(record: dict[str, Any], fmt: DataFormat, train_on: str) -> Conversation:
    """The conversation in `record` (a row holding `fmt.fields()`), trained per `train_on`.

    Raises Malformed: messages that are not a list of objects, an unknown role, content that
    is not a string (or a list of text parts), tools that are not a list.
    """
    everything = train_on == "all"
    if fmt.kind == "messages":
        messages = _messages(record[fmt.messages_field], fmt.messages_field)
        prompt_length = 0
    else:
        prompt, completion = record[fmt.prompt_field], record[fmt.completion_field]
        for field, value in ((fmt.prompt_field, prompt), (fmt.completion_field, completion)):
            if not isinstance(value, (str, list)):
                raise Malformed(f"field {field!r}", f"is {_kind(value)}, neither a string nor "
                                "a list of messages")
        if isinstance(prompt, str) and isinstance(completion, str):
            return Conversation(everything=everything, prompt=prompt, completion=completion)
        if isinstance(prompt, str) or isinstance(completion, str):
            plain = fmt.prompt_field if isinstance(prompt, str) else fmt.completion_field
            raise Malformed(f"field {plain!r}", "is a string while the other of prompt and "
                            "completion is not; give both as strings or both as messages")
        messages = (_messages(prompt, fmt.prompt_field, allow_empty=True)
                    + _messages(completion, fmt.completion_field))
        prompt_length = len(prompt)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last-assistant":
        replies = replies[-1:]
    elif train_on == "completion":
        replies = [i for i in replies if i >= prompt_length]
    tools = _tools(record.get(fmt.tools_field), fmt.tools_field)
    return Conversation(tuple(messages), tools, tuple(replies), everything)


def _kind(value: Any) -> str:
    """A value's type as an error names it: null, str, a list of int, ..."""
    if value is None:
        return "null"
    if isinstance(value, list):
        inner = sorted({"null" if v is None else type(v).__name__ for v in value
                        if not isinstance(v, dict)})
        return f"a list of {', '.join(inner)}" if inner else "a list"
    return type(value).__name__


def _without_none(value: Any) -> Any:
    """`value` with None entries of mappings dropped, at every depth: Parquet and Arrow fill
    every struct field a row lacks with null, and templates test for keys, not for null."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _messages(value: Any, field: str, allow_empty: bool = False) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise Malformed(f"field {field!r}", f"is {_kind(value)}, not a list of messages")
    if not value and not allow_empty:
        raise Malformed(f"field {field!r}", "holds no messages")
    return [_message(_without_none(m), f"field {field!r} message {i}")
            for i, m in enumerate(value, start=1)]


def _message(message: dict[str, Any], where: str) -> dict[str, Any]:
    role = message.get("role")
    if role not in ROLES:
        raise Malformed(where, f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": _text_parts(content, where)}
    if content is None and role == "assistant" and message.get("tool_calls"):
        return message  # a reply that only calls tools
    if not isinstance(content, str):
        what = "missing" if content is None else f"{type(content).__name__}, not a string"
        raise Malformed(where, f"content is {what}")
    return message


def _text_parts(parts: list[Any], where: str) -> str:
    """OpenAI's content parts, text only, joined with newlines (as vLLM joins them): most
    templates print `content` as a string."""
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise Malformed(where, f"content part of type {kind!r} (only text parts are read)")
        texts.append(part["text"])
    return "\n".join(texts)


def _tools(value: Any, field: str) -> list[Any] | None:
    """Tool definitions: a list, a JSON string of one (datasets often store them so), or
    nothing."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Malformed(f"field {field!r}", "is a string that is not JSON") from None
    if not isinstance(value, list):
        raise Malformed(f"field {field!r}", f"is {_kind(value)}, not a list of tools")
    return [_without_none(tool) for tool in value]
