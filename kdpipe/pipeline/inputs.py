"""What `kdpipe cache-teacher` reads: its corpus format resolved, and the sequence stream.

`resolve_reading` settles everything that can be refused before a row is read (`--format
auto`'s choice, `--train-on`, the chat template); `cache_sequences` then streams the corpus as
`TokenSequence`s: plain text through `sequences.iter_sequences` exactly as before, chat data
through `chat.iter_conversations` and `sequences.conversation_sequences`. One of several
workers tokenizes only its share of the corpus and reads the rest as the other workers
tokenized it (`corpus_split`): the same stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.pipeline.chat import (
    ChatOptions,
    check_template,
    iter_conversations,
    read_template,
    template_digest,
)
from kdpipe.pipeline.corpus import CorpusStats, Source, iter_documents
from kdpipe.pipeline.corpus_split import SharedCorpus, plan_shares
from kdpipe.pipeline.formats import DataFormat, resolve_format, resolve_train_on
from kdpipe.pipeline.sequences import (
    TokenSequence,
    conversation_sequences,
    iter_sequences,
    iter_token_ids,
    sequences_of_ids,
)
from kdpipe.schemas.errors import ConfigError


@dataclass(frozen=True)
class Reading:
    """How the corpus is read, resolved: the format (never `auto`), the positions trained,
    what to do with long conversations and the chat template (text of --chat-template, None:
    the tokenizer's)."""

    format: DataFormat
    train_on: str
    overlong: str
    template: str | None
    template_sha256: str  # of the template conversations are rendered with; '' for text

    def settings(self) -> dict[str, str]:
        """What determines the sequences beyond the corpus files, by option name (for a
        cache to record and compare on resume). Plain text: the format and its field only."""
        if self.format.kind == "text":
            return self.format.settings()
        return {**self.format.settings(), "train_on": self.train_on, "overlong": self.overlong,
                "chat_template_sha256": self.template_sha256}


def data_format(cfg: CacheTeacherConfig) -> DataFormat:
    """The `--format` and field options of `cfg`, unresolved."""
    return DataFormat(cfg.format, cfg.text_field, cfg.messages_field, cfg.prompt_field,
                      cfg.completion_field, cfg.tools_field)


def resolve_reading(cfg: CacheTeacherConfig, sources: Sequence[str], tokenizer: Any) -> Reading:
    """Resolve `--format auto` from the first rows of `sources` and check the options that
    depend on the format. Raises ConfigError: a `--train-on` the format has no use for, a
    `--chat-template` for plain text, no chat template for conversations, a template that is
    not valid Jinja."""
    fmt = resolve_format(data_format(cfg), sources, cfg.split)
    train_on = resolve_train_on(fmt.kind, cfg.train_on)
    template = read_template(cfg.chat_template)
    if fmt.kind == "text":
        if template is not None:
            raise ConfigError("--chat-template renders conversations, but the data is read as "
                              "plain text; drop it, or pass --format messages or "
                              "prompt-completion (and the field that holds them)")
        return Reading(fmt, train_on, cfg.overlong, None, "")
    # Prompt/completion strings need no template: its absence is refused at the first row
    # of messages.
    if fmt.kind == "messages" or template is not None:
        check_template(tokenizer, template)
    return Reading(fmt, train_on, cfg.overlong, template, template_digest(tokenizer, template))


def cache_sequences(cfg: CacheTeacherConfig, reading: Reading, sources: Sequence[str],
                    tokenizer: Any, stats: CorpusStats,
                    on_done: Callable[[int], None] | None = None, key: str = ""
                    ) -> Iterator[TokenSequence]:
    """The sequence stream of `sources` read as `reading` says, in `cfg.layout`, counting
    documents read and skipped in `stats` (`on_done(n)`: n more documents fully yielded).

    A worker of several (`cfg.num_workers > 1`) tokenizes only its share, keeping the shares
    in `cfg.out` under `key` (the cache's settings fingerprint), unless the corpus cannot be
    split (`corpus_split.plan_shares`). Raises ConfigError at once for a `--max-length`,
    layout or tokenizer the layout cannot use; corpus errors come as the stream is read."""
    shares = plan_shares(sources, cfg.num_workers) if cfg.num_workers > 1 else None
    if reading.format.kind == "text":
        field = reading.format.text_field
        if shares is None:
            documents = iter_documents(sources, field, cfg.split, cfg.strict, stats)
            return iter_sequences(documents, tokenizer, cfg.max_length, cfg.layout,
                                  add_special_tokens=cfg.add_special_tokens, on_done=on_done)

        def tokenize_text(share: list[Source], counts: CorpusStats) -> Iterator[list[int]]:
            return iter_token_ids(iter_documents(share, field, cfg.split, cfg.strict, counts,
                                                 allow_empty=True), tokenizer)

        shared = SharedCorpus(cfg.out_dir, shares, cfg.worker_index, key, tokenize_text,
                              conversations=False, flags="--text-field")
        return sequences_of_ids(shared.items(stats), tokenizer, cfg.max_length, cfg.layout,
                                cfg.add_special_tokens, on_done)
    options = ChatOptions(reading.train_on, cfg.max_length, reading.overlong,
                          cfg.add_special_tokens, reading.template)
    if shares is None:
        conversations = iter_conversations(sources, reading.format, tokenizer, options,
                                           cfg.split, cfg.strict, stats)
    else:
        def tokenize_chat(share: list[Source], counts: CorpusStats) -> Iterator[TokenSequence]:
            return iter_conversations(share, reading.format, tokenizer, options, cfg.split,
                                      cfg.strict, counts, allow_empty=True)

        flags = ", ".join(f.flag for f in reading.format.fields())
        conversations = SharedCorpus(cfg.out_dir, shares, cfg.worker_index, key, tokenize_chat,
                                     conversations=True, flags=flags).items(stats)
    return conversation_sequences(conversations, cfg.max_length, cfg.layout, on_done)
