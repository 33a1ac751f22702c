"""The embedded chat corpus: questions about the standard library answered by its docstrings.

Each public function, class and method of the stdlib's public modules (read with `ast`, never
imported: importing runs module code) that has a docstring becomes a question and its answer:
the user asks what `json.dumps` does, in one of a few phrasings chosen by a hash of the name,
and the assistant answers with the first paragraph of the docstring, whitespace joined and cut
at a word boundary after `MAX_ANSWER_CHARS`. No one here wrote the answers. Consecutive
questions about one module make a conversation of one to `MAX_TURNS` exchanges after a fixed
system prompt, so replies are separated by user turns, as in real chat data.

Conversations are split by module with the rule of `corpus.py` (`is_heldout` of the file's
path), so a held-out module is never trained on and the two demo corpora hold out the same
files; modules are visited in the same hash order, until each split's character budget (the
characters of every message's content) is reached. Rows are `{"messages": [...], "module"}`
JSON lines, `cache-teacher --format messages` input.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdpipe.embedded.corpus import (
    HELDOUT_NAME,
    INFO_NAME,
    MAX_FILE_CHARS,
    TRAIN_NAME,
    is_heldout,
    stdlib_files,
    stdlib_root,
)
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You answer questions about the Python standard library."
MAX_ANSWER_CHARS = 400
MIN_ANSWER_WORDS = 4  # shorter first paragraphs ("Deprecated.") say nothing about the code
MAX_TURNS = 3
MAX_CONVERSATION_CHARS = 600  # no further exchange once the contents reach this
QUESTIONS = {
    "function": ("What does `{}` do?", "What is `{}` for?", "Can you explain what `{}` does?",
                 "Briefly, what does `{}` do?"),
    "class": ("What is `{}`?", "What is the class `{}` for?", "Describe the class `{}`.",
              "What does the `{}` class do?"),
    "method": ("What does the method `{}` do?", "What is `{}` for?", "What does `{}` do?",
               "Explain the method `{}`."),
}
FOLLOW_UPS = ("And `{}`?", "What about `{}`?", "Next, what does `{}` do?")


@dataclass(frozen=True)
class Documented:
    """One public object with a docstring: its dotted name, kind and answer text."""

    name: str  # e.g. "json.dumps", "json.JSONEncoder.encode"
    kind: str  # a key of QUESTIONS
    answer: str


def module_name(path: str) -> str:
    """`json/__init__.py` → `json`, `email/mime/text.py` → `email.mime.text`."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def answer_text(docstring: str) -> str | None:
    """The first paragraph, whitespace joined, cut at a word boundary after MAX_ANSWER_CHARS
    (then ending in "..."); None when it has fewer than MIN_ANSWER_WORDS words."""
    words = docstring.strip().split("\n\n", 1)[0].split()
    if len(words) < MIN_ANSWER_WORDS:
        return None
    text = " ".join(words)
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


def documented(source: str, module: str) -> list[Documented]:
    """Public top-level functions and classes of a module's source and the public methods of
    its classes that have a usable docstring, in source order. Unparsable source gives none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file of another Python version; NUL bytes
        return []
    found: list[Documented] = []

    def add(node: ast.AST, name: str, kind: str) -> None:
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        doc = ast.get_docstring(node)
        answer = answer_text(doc) if doc else None
        if answer is not None:
            found.append(Documented(name, kind, answer))

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions) and not node.name.startswith("_"):
            add(node, f"{module}.{node.name}", "function")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            add(node, f"{module}.{node.name}", "class")
            for member in node.body:
                if isinstance(member, functions) and not member.name.startswith("_"):
                    add(member, f"{module}.{node.name}.{member.name}", "method")
    return found


def _pick(options: tuple[str, ...], name: str) -> str:
    return options[zlib.crc32(name.encode()) % len(options)]


def conversations(items: list[Documented]) -> Iterator[list[dict[str, str]]]:
    """Group a module's items, in order, into conversations of 1..MAX_TURNS exchanges (the
    number asked for chosen by a hash of the first name; fewer when the contents would pass
    MAX_CONVERSATION_CHARS)."""
    i = 0
    while i < len(items):
        wanted = 1 + zlib.crc32(b"turns:" + items[i].name.encode()) % MAX_TURNS
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        chars = len(SYSTEM_PROMPT)
        for turn in range(wanted):
            if i >= len(items):
                break
            item = items[i]
            question = (_pick(QUESTIONS[item.kind], item.name) if turn == 0
                        else _pick(FOLLOW_UPS, item.name)).format(item.name)
            if turn and chars + len(question) + len(item.answer) > MAX_CONVERSATION_CHARS:
                break
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": item.answer}]
            chars += len(question) + len(item.answer)
            i += 1
        yield messages


@dataclass(frozen=True)
class ChatCorpusInfo:
    """What `corpus.json` records for the chat corpus: the budgets asked for and the result."""

    train_chars: int  # budget asked for (characters of message contents)
    heldout_chars: int
    python: str
    stdlib: str
    kind: str = "chat"
    train_conversations: int = 0
    heldout_conversations: int = 0
    train_modules: int = 0
    heldout_modules: int = 0
    train_chars_written: int = 0
    heldout_chars_written: int = 0


ASKED = ("kind", "train_chars", "heldout_chars", "python", "stdlib")


def _chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def write_chat_corpus(out: Path, train_chars: int, heldout_chars: int) -> tuple[Path, Path]:
    """Write OUT/train.jsonl and OUT/heldout.jsonl (conversations); skip when done.

    Whole modules are taken until each split's budget of content characters is reached (the
    last module may overshoot it). Raises ConfigError when a split got no conversation.
    """
    out.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path, info_path = out / TRAIN_NAME, out / HELDOUT_NAME, out / INFO_NAME
    root = stdlib_root()
    asked = ChatCorpusInfo(train_chars=train_chars, heldout_chars=heldout_chars,
                           python=sys.version.split()[0], stdlib=str(root))
    if info_path.is_file() and train_path.is_file() and heldout_path.is_file():
        done: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
        if {k: done.get(k) for k in ASKED} == {k: getattr(asked, k) for k in ASKED}:
            return train_path, heldout_path
    budget = {True: heldout_chars, False: train_chars}
    written = {True: 0, False: 0}
    rows = {True: 0, False: 0}
    modules = {True: 0, False: 0}
    with atomic_path(train_path) as train_tmp, atomic_path(heldout_path) as heldout_tmp, \
            open(train_tmp, "w", encoding="utf-8") as train_f, \
            open(heldout_tmp, "w", encoding="utf-8") as heldout_f:
        for path in stdlib_files(root):
            name = path.relative_to(root).as_posix()
            held = is_heldout(name)
            if written[held] >= budget[held]:
                if written[not held] >= budget[not held]:
                    break
                continue
            source = path.read_text(encoding="utf-8", errors="replace")
            if len(source) > MAX_FILE_CHARS:
                continue
            module = module_name(name)
            if any(part.startswith("_") for part in module.split(".")):
                continue  # private modules (`_pyio`, `__main__`) implement public ones
            found = list(conversations(documented(source, module)))
            for messages in found:
                (heldout_f if held else train_f).write(
                    json.dumps({"messages": messages, "module": module}) + "\n")
                written[held] += _chars(messages)
            rows[held] += len(found)
            modules[held] += bool(found)
    if not rows[False] or not rows[True]:
        raise ConfigError(f"chat corpus: no conversation in a split of {root} (train "
                         f"{rows[False]}, held-out {rows[True]}); raise the budgets")
    info = ChatCorpusInfo(train_chars=train_chars, heldout_chars=heldout_chars,
                          python=asked.python, stdlib=asked.stdlib,
                          train_conversations=rows[False], heldout_conversations=rows[True],
                          train_modules=modules[False], heldout_modules=modules[True],
                          train_chars_written=written[False],
                          heldout_chars_written=written[True])
    atomic_write_json(info_path, asdict(info))
    log.info("chat corpus: %d train conversations (%d modules, %d chars), %d held-out (%d "
             "modules, %d chars) from %s", rows[False], modules[False], written[False],
             rows[True], modules[True], written[True], root)
    return train_path, heldout_path
