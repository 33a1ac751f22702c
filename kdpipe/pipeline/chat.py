"""Conversations to token ids and training targets (docs/chat-data.md).

A conversation is rendered with the teacher tokenizer's chat template (`apply_chat_template`)
or a Jinja file given with `--chat-template`. Which characters are trained is read off the
rendered text, so templates without generation markers get correct targets too:

1. Render the whole conversation once.
2. For each trained assistant message i, render `messages[:i]` with the generation prompt
   (`before`) and `messages[:i + 1]` (`upto`). When `before` begins both `upto` and the whole
   text, and the whole text goes on with the rest of `upto`, that rest is the turn: the reply,
   its tool calls and end-of-turn token(s), less the whitespace the template writes after
   them (a model must not learn to write on after it stops).
3. A template that renders earlier turns differently (one that drops earlier reasoning, say)
   fails that check. Then the message's content is searched forward in the whole text, from
   the previous turn's end and from where `before` stops matching it, and the turn runs on
   over what the template writes after the content when the turn is the last one (its
   end-of-turn marker) if the whole text has that there.
4. Neither works: the row is malformed.

The whole text is tokenized once, without added special tokens (the template writes its own),
with character offsets; a token is a target when its characters overlap a turn's, so a token
straddling a turn's edge is one. When the tokenizer's own encoding puts a prefix before every
text (a BOS) and the rendered ids do not start with it, it is prepended (`add_special_tokens`).
Position t is a target when token t + 1 is.

A prompt and completion given as strings are not rendered: the text is prompt + completion,
encoded as a text document is (the tokenizer's prefix, then its end: EOS), and the
completion's characters and that end are the targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.pipeline.corpus import CorpusStats, Skips, Source, iter_records, source_name
from kdpipe.pipeline.formats import Conversation, DataFormat, Malformed, parse_row
from kdpipe.pipeline.sequences import TokenSequence, document_end, fast_backend, special_affixes
from kdpipe.schemas.errors import ConfigError

log = logging.getLogger(__name__)

NO_TEMPLATE = ("the tokenizer has no chat template (tokenizer.chat_template is unset); pass "
               "--chat-template FILE with a Jinja chat template, or --tokenizer naming a "
               "tokenizer that has one")
Span = tuple[int, int]  # [start, end) in characters of the rendered text
Render = Callable[[Sequence[dict[str, Any]], bool], str]  # (messages, generation prompt)


@dataclass(frozen=True)
class ChatOptions:
    """How conversations become sequences (the options of docs/chat-data.md)."""

    train_on: str  # a resolved formats.TRAIN_ON value
    max_length: int
    overlong: str = "truncate"  # or "skip"
    add_special_tokens: bool = True
    template: str | None = None  # Jinja text of --chat-template; None: the tokenizer's


def read_template(path: str | Path | None) -> str | None:
    """The text of a `--chat-template` file (None without one). Raises ConfigError."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--chat-template {path}: cannot read it ({exc}); pass a Jinja "
                          "chat template file") from exc


def check_template(tokenizer: Any, template: str | None) -> None:
    """Raise ConfigError when there is no template to render with, or it is not valid Jinja."""
    import jinja2

    if template is None and tokenizer.chat_template is None:
        raise ConfigError(NO_TEMPLATE)
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template,
                                      tokenize=False)
    except jinja2.TemplateSyntaxError as exc:
        where = "--chat-template" if template is not None else "the tokenizer's chat template"
        raise ConfigError(f"{where}: not a valid Jinja template (line {exc.lineno}: "
                          f"{exc.message}); fix it or pass another with --chat-template") from exc
    except Exception as exc:  # a template may refuse this one-message probe: the rows will tell
        log.debug("the chat template refused a one-message probe: %s", exc)


def template_digest(tokenizer: Any, template: str | None) -> str:
    """sha256 of the template(s) conversations are rendered with ('' when there are none)."""
    used = template if template is not None else tokenizer.chat_template
    if used is None:
        return ""
    text = used if isinstance(used, str) else json.dumps(used, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _first_line(exc: Exception, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ConversationEncoder:
    """Renders and tokenizes conversations: `encode` gives ids and per-token target flags."""

    def __init__(self, tokenizer: Any, options: ChatOptions, fmt: DataFormat) -> None:
        backend = fast_backend(tokenizer)
        if backend is None:
            raise ConfigError("conversations need a fast tokenizer (a tokenizer.json): its "
                              "character offsets place the targets; pass --tokenizer naming "
                              "one")
        self.tokenizer, self.backend, self.options = tokenizer, backend, options
        prefix, suffix = (special_affixes(tokenizer) if options.add_special_tokens
                          else ([], []))
        self.prefix, self.end = prefix, document_end(tokenizer, suffix)
        self.label = (f"field {fmt.messages_field!r}" if fmt.kind == "messages" else
                      f"fields {fmt.prompt_field!r} + {fmt.completion_field!r}")

    def encode(self, conversation: Conversation) -> tuple[list[int], list[bool]]:
        """Token ids and which tokens are targets. Raises Malformed."""
        if conversation.messages:
            text, spans = self._spans(conversation)
            end: list[int] = []
        else:
            text = conversation.prompt + conversation.completion
            spans = [(0 if conversation.everything else len(conversation.prompt), len(text))]
            end = self.end  # a plain completion ends as a text document does, trained
        try:
            text.encode("utf-8")  # lone surrogates from "\ud800" escapes crash the tokenizer
        except UnicodeEncodeError:
            raise Malformed(self.label, "not valid UTF-8") from None
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids, flags = list(encoding.ids) + end, overlaps(encoding.offsets, spans) + [True] * len(end)
        if self.prefix and ids[:len(self.prefix)] != self.prefix:
            ids, flags = self.prefix + ids, [False] * len(self.prefix) + flags
        return ids, flags

    def _render(self, tools: list[Any] | None) -> Render:
        def render(messages: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
            if self.options.template is None and self.tokenizer.chat_template is None:
                raise ConfigError(NO_TEMPLATE)  # plain rows needed none: known only now
            try:
                text = self.tokenizer.apply_chat_template(
                    list(messages), tools=tools, chat_template=self.options.template,
                    add_generation_prompt=generation_prompt, tokenize=False)
            except Exception as exc:  # a template is code: any failure of it is the row's
                raise Malformed(self.label, f"the chat template failed to render it "
                                f"({type(exc).__name__}: {_first_line(exc)})") from None
            assert isinstance(text, str)
            return text

        return render

    def _spans(self, conversation: Conversation) -> tuple[str, list[Span]]:
        render = self._render(conversation.tools)
        messages = list(conversation.messages)
        full = render(messages, False)
        if conversation.everything:
            return full, [(0, len(full))]
        spans: list[Span] = []
        for i in conversation.trained:
            span = turn_span(render, messages, i, full, spans[-1][1] if spans else 0)
            if span is None:
                raise Malformed(f"{self.label} message {i + 1}", "the chat template does not "
                                "render this assistant reply's content where it can be found")
            spans.append(span)
        return full, spans


def turn_span(render: Render, messages: Sequence[dict[str, Any]], i: int, full: str,
              cursor: int) -> Span | None:
    """Where assistant message i's turn lies in `full` (the whole conversation rendered), at or
    after `cursor`; None when it cannot be placed (the module docstring has the rule)."""
    upto = render(messages[:i + 1], False)
    start = cursor
    if i > 0:
        before = render(messages[:i], True)
        if len(before) >= cursor and upto.startswith(before) and full.startswith(before):
            turn = upto[len(before):].rstrip()
            if full.startswith(turn, len(before)):
                return len(before), len(before) + len(turn)
        start = max(cursor, len(os.path.commonprefix([before, full])))
    return _search_span(full, messages[i].get("content"), upto, start)


def _search_span(full: str, content: Any, upto: str, start: int) -> Span | None:
    """The content's first place in `full` from `start` (as given, or trimmed as templates
    often print it), with the end-of-turn marker `upto` writes after it, when `full` has it."""
    if not isinstance(content, str):
        return None
    closing_text = upto.rstrip()
    for text in dict.fromkeys((content, content.strip())):
        found = full.find(text, start) if text else -1
        if found < 0:
            continue
        end = found + len(text)
        at = closing_text.rfind(text)
        closing = closing_text[at + len(text):] if at >= 0 else ""
        if closing and full.startswith(closing, end):
            end += len(closing)
        return found, end
    return None


def overlaps(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """Per token (character offsets, in order): whether it overlaps any of the ordered,
    disjoint `spans`. A token of no characters overlaps nothing."""
    spans = [s for s in spans if s[0] < s[1]]
    flags = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        flags.append(k < len(spans) and start < end and end > spans[k][0])
    return flags


def _fit(ids: list[int], flags: list[bool], where: str, options: ChatOptions, skip: Skips
         ) -> TokenSequence | None:
    """The conversation as a sequence (truncated per `--overlong`), or None when skipped."""
    stats = skip.stats
    cut = len(ids) > options.max_length
    if cut and options.overlong == "skip":
        stats.conversations_too_long += 1
        skip(where, f"longer than --max-length {options.max_length} (--overlong skip)",
             malformed=False)
        return None
    ids, flags = ids[:options.max_length], flags[:options.max_length]
    targets = flags[1:] + [False]  # position t predicts token t + 1
    if not any(targets):
        stats.conversations_without_targets += 1
        skip(where, "no target tokens" + (f" in the first {options.max_length}" if cut else ""),
             malformed=False)
        return None
    stats.conversations_truncated += cut
    return TokenSequence(ids, targets)


def iter_conversations(sources: Sequence[Source], fmt: DataFormat, tokenizer: Any,
                       options: ChatOptions, split: str | None = "train", strict: bool = False,
                       stats: CorpusStats | None = None, allow_empty: bool = False
                       ) -> Iterator[TokenSequence]:
    """Yield each conversation of `sources` (rows of format `fmt`, resolved and not text) as
    one sequence of at most `options.max_length` tokens with its targets, in order.

    Malformed rows (an unknown role, content that is not a string, a template that fails on
    them) are skipped and counted in `stats`, or raise ConfigError naming the file, row and
    field under `strict`; so are (never fatally) conversations longer than `max_length` with
    `overlong="skip"` and conversations with no target token. Raises ConfigError for a corpus
    with no conversation (unless `allow_empty`: a worker's share may hold none), or no chat
    template where one is needed.
    """
    encoder = ConversationEncoder(tokenizer, options, fmt)  # refuses a slow tokenizer at once
    return _conversations(sources, fmt, encoder, split, Skips(stats or CorpusStats(), strict),
                          allow_empty)


def _conversations(sources: Sequence[Source], fmt: DataFormat, encoder: ConversationEncoder,
                   split: str | None, skip: Skips, allow_empty: bool
                   ) -> Iterator[TokenSequence]:
    read = 0
    try:
        for source in sources:
            for where, record in iter_records(source, fmt.fields(), split, skip,
                                              optional=[fmt.tools_field]):
                try:
                    ids, flags = encoder.encode(parse_row(record, fmt, encoder.options.train_on))
                except Malformed as bad:
                    skip(f"{where}, {bad.field}", bad.reason)
                    continue
                sequence = _fit(ids, flags, where, encoder.options, skip)
                if sequence is not None:
                    read += 1
                    skip.stats.documents_read += 1
                    yield sequence
        if not allow_empty:
            skip.check_nonempty(read, [source_name(s) for s in sources],
                                ", ".join(f.flag for f in fmt.fields()))
    finally:
        skip.summarise(read)
