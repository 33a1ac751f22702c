"""Chat data as input to cache-teacher: formats and their detection, malformed rows, long
conversations, sequence layouts, and plain text exactly as before."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.pipeline.corpus import CorpusStats, iter_documents
from kdpipe.pipeline.inputs import cache_sequences, resolve_reading
from kdpipe.pipeline.sequences import iter_sequences
from kdpipe.schemas.errors import ConfigError

from .chat_helpers import (
    CHAT,
    SYSTEM,
    TOOL_CALL_TURN,
    TOOL_CHAT,
    WEATHER_TOOL,
    config,
    make_tokenizer,
    read,
    trained_text,
    write_jsonl,
    write_parquet,
)
from .chat_templates import CHATML, STRICT_ALTERNATION, TOOLS
from .conftest import run_cli, small_config


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer("qwen2", tmp_path_factory.mktemp("qwen2"), CHATML)


def conversation(i: int, reply_words: int = 1) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": " ".join([f"Answer {i}."] * reply_words)}]


# ---- formats and --format auto -------------------------------------------------------------


@pytest.mark.parametrize(("rows", "chosen"), [
    ([{"messages": CHAT}], "messages (field 'messages' in the first rows of"),
    ([{"prompt": "a", "completion": "b"}], "prompt-completion (fields 'prompt' and "
     "'completion' in the first rows of"),
    ([{"text": "plain", "prompt": "only a prompt"}], "text (field 'text' in the first rows of"),
    ([{"prompt": "a", "completion": "b", "messages": CHAT}], "messages (field 'messages'"),
])
def test_auto_says_what_it_chose(chatml: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 rows: list[dict[str, Any]], chosen: str) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", ["not json", *rows])
    with caplog.at_level(logging.INFO, logger="kdpipe.pipeline.formats"):
        sequences, _ = read(data, chatml)
    assert f"--format auto: chose {chosen}" in caplog.text and f"rows of {data})" in caplog.text
    assert len(sequences) == 1


def test_auto_with_renamed_fields(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [{"conversation": CHAT, "functions": None}])
    sequences, _ = read(data, chatml, messages_field="conversation", tools_field="functions")
    assert trained_text(chatml, sequences[0]) == ["Hello, world.<|im_end|>",
                                                  "Yes again.<|im_end|>"]


def test_explicit_format_reads_the_field_it_names(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": CHAT, "text": "plain text"}])
    (text,), _ = read(data, chatml, format="text")
    assert text.targets is None and chatml.decode(text.ids) == "plain text<|endoftext|>"


def test_parquet_equals_jsonl(chatml: Any, tmp_path: Path) -> None:
    """Parquet fills every struct field a row lacks with null (a `tool_calls` on every
    message, `function` keys on no call): the rows render as their JSON originals."""
    rows = [{"messages": TOOL_CHAT, "tools": [WEATHER_TOOL]}, {"messages": CHAT, "tools": None}]
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS, encoding="utf-8")
    as_jsonl, _ = read(write_jsonl(tmp_path / "c.jsonl", rows), chatml,
                       chat_template=str(template))
    as_parquet, stats = read(write_parquet(tmp_path / "c.parquet", rows), chatml,
                             chat_template=str(template))
    assert as_parquet == as_jsonl and stats.documents_read == 2
    assert trained_text(chatml, as_parquet[0]) == [TOOL_CALL_TURN, "It is sunny.<|im_end|>"]


def test_prompt_completion_parquet_and_content_parts(chatml: Any, tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Yes"}, {"type": "text", "text": "again."}]
    rows = [{"prompt": CHAT[:4], "completion": [{"role": "assistant", "content": parts}]}]
    (sequence,), _ = read(write_parquet(tmp_path / "pc.parquet", rows), chatml)
    assert trained_text(chatml, sequence) == ["Yes\nagain.<|im_end|>"]


def test_hugging_face_dataset_folder(chatml: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "chat_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"messages": CHAT}, {"messages": conversation(1)}])
    cfg = replace(config(tmp_path / "x"), data=("hf:" + str(folder),))
    stats = CorpusStats()
    sources = list(cfg.data)
    sequences = list(cache_sequences(cfg, resolve_reading(cfg, sources, chatml), sources,
                                     chatml, stats))
    assert [trained_text(chatml, s)[-1] for s in sequences] == ["Yes again.<|im_end|>",
                                                                "Answer 1.<|im_end|>"]


def test_txt_file_with_a_conversation_format(chatml: Any, tmp_path: Path) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("plain", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"notes\.txt: a \.txt file holds plain text"):
        read(data, chatml, format="messages")


def test_missing_field_names_its_flag(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [{"chat": CHAT}])
    with pytest.raises(ConfigError, match=r"^--messages-field messages: .*rows\.jsonl has no "
                       r"field 'messages' \(fields: chat\); pass --messages-field"):
        read(data, chatml, format="messages")
    with pytest.raises(ConfigError, match=r"^--prompt-field prompt: .*parquet has no field"):
        read(write_parquet(tmp_path / "p.parquet", [{"chat": "x"}]), chatml,
             format="prompt-completion")


# ---- templates -----------------------------------------------------------------------------


def test_no_template_is_one_line_naming_both_ways_out(tmp_path: Path) -> None:
    tokenizer = make_tokenizer("qwen2", tmp_path / "tok", None)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match=r"no chat template .*pass --chat-template FILE.*, or "
                       r"--tokenizer naming a tokenizer that has one$"):
        read(data, tokenizer)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    (sequence,), _ = read(data, tokenizer, chat_template=str(template))
    assert trained_text(tokenizer, sequence)[0] == "Hello, world.<|im_end|>"
    # Prompt/completion strings need no template; their messages do, at the first such row.
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"},
                                             {"prompt": CHAT[:4], "completion": CHAT[4:]}])
    with pytest.raises(ConfigError, match=r"no chat template"):
        read(pc, tokenizer)


def test_template_file_errors(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match=r"^--chat-template .*missing\.jinja: cannot read it"):
        read(data, chatml, chat_template=str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^--chat-template: not a valid Jinja template "
                       r"\(line 1"):
        read(data, chatml, chat_template=str(broken))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    with pytest.raises(ConfigError, match=r"^--chat-template renders conversations, but the "
                       r"data is read as plain text"):
        read(text, chatml, chat_template=str(broken))


def test_config_problems_of_explicit_formats(tmp_path: Path) -> None:
    cfg = config(tmp_path / "x.jsonl", format="text", train_on="assistant",
                 chat_template="t.jinja")
    assert [p.split(":")[0] for p in cfg.problems()] == ["--train-on assistant",
                                                         "--chat-template renders conversations; "
                                                         "drop it with --format text"]
    assert config(tmp_path / "x.jsonl", format="messages", train_on="completion").problems()
    assert not config(tmp_path / "x.jsonl", train_on="completion").problems()  # auto: later


# ---- malformed rows ------------------------------------------------------------------------

GOOD = {"messages": CHAT[1:3]}
BAD_ROWS = [
    ({"messages": [{"role": "bot", "content": "x"}, *CHAT[2:3]]},
     "field 'messages' message 1", "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}, *CHAT[2:3]]},
     "field 'messages' message 1", "content is dict, not a string"),
    ({"messages": [CHAT[1], {"role": "assistant"}]}, "field 'messages' message 2",
     "content is missing"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                   *CHAT[2:3]]},
     "field 'messages' message 1", "content part of type 'image_url'"),
    ({"messages": "Hi there"}, "field 'messages'", "is str, not a list of messages"),
    ({"messages": []}, "field 'messages'", "holds no messages"),
    ({"messages": CHAT[1:3], "tools": 5}, "field 'tools'", "is int, not a list of tools"),
    ({"messages": [CHAT[1], CHAT[1], CHAT[2]]}, "field 'messages'",
     "the chat template failed to render it (TemplateError: Conversation roles must alternate"),
    ({"prompt": "x"}, "", "no field 'messages'"),
]


def test_malformed_rows_are_skipped_and_counted(chatml: Any, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    template = tmp_path / "alternating.jinja"
    template.write_text(STRICT_ALTERNATION, encoding="utf-8")
    rows = [GOOD, *(row for row, _, _ in BAD_ROWS), "{broken json", GOOD]
    data = write_jsonl(tmp_path / "dirty.jsonl", rows)
    sequences, stats = read(data, chatml, chat_template=str(template), format="messages")
    assert len(sequences) == 2
    assert (stats.documents_read, stats.documents_skipped) == (2, len(BAD_ROWS) + 1)
    assert f"skipped {len(BAD_ROWS) + 1} of {len(BAD_ROWS) + 3} documents (" in caplog.text
    assert f"first at {data} line 2, field 'messages' message 1" in caplog.text


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_malformed_row_is_fatal_under_strict(chatml: Any, tmp_path: Path, row: dict[str, Any],
                                             field: str, reason: str) -> None:
    template = tmp_path / "alternating.jinja"
    template.write_text(STRICT_ALTERNATION, encoding="utf-8")
    data = write_jsonl(tmp_path / "dirty.jsonl", [GOOD, row])
    with pytest.raises(ConfigError) as info:
        read(data, chatml, chat_template=str(template), strict=True, format="messages")
    where = f"{data} line 2" + (f", {field}" if field else "")
    assert str(info.value).startswith(f"--strict: {where}: {reason}"), str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_parquet_row_names_the_row(chatml: Any, tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": CHAT[1:2], "completion": "b"}]
    data = write_parquet(tmp_path / "pc.parquet", [rows[0]])
    assert len(read(data, chatml)[0]) == 1
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    with pytest.raises(ConfigError, match=r"pc\.jsonl line 2, field 'completion': is a string "
                       r"while the other of prompt and completion is not"):
        read(data, chatml, strict=True)
    rows = [GOOD, {"messages": [{"role": "narrator", "content": "x"}]}]
    with pytest.raises(ConfigError, match=r"m\.parquet row 2, field 'messages' message 1: "
                       r"unknown role 'narrator'"):
        read(write_parquet(tmp_path / "m.parquet", rows), chatml, strict=True)


def test_nothing_but_bad_rows_is_an_empty_corpus(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ConfigError, match=r"^--data: empty corpus \(0 documents, 1 skipped\).*"
                       r"check --data and --messages-field$"):
        read(data, chatml)


# ---- too long ------------------------------------------------------------------------------


def test_overlong_truncate_keeps_the_first_tokens(chatml: Any, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    long_reply = {"messages": conversation(1, reply_words=30)}
    late_reply = {"messages": [*CHAT[:2], {"role": "assistant", "content": "late"}]}
    (whole, late), _ = read(write_jsonl(tmp_path / "alone.jsonl", [long_reply, late_reply]),
                            chatml)
    # Keep the late reply's tokens up to the one before its reply: no target is left.
    max_length = late.targets.index(True) + 1
    assert whole.targets.index(True) < max_length - 1 < len(whole.ids)
    data = write_jsonl(tmp_path / "long.jsonl", [long_reply, late_reply])
    (cut,), stats = read(data, chatml, max_length=max_length)
    assert cut.ids == whole.ids[:max_length]
    assert cut.targets == whole.targets[:max_length - 1] + [False]
    assert (stats.conversations_truncated, stats.conversations_without_targets,
            stats.conversations_too_long, stats.documents_skipped,
            stats.documents_read) == (1, 1, 0, 1, 1)
    assert f"no target tokens in the first {max_length}" in caplog.text


def test_overlong_skip(chatml: Any, tmp_path: Path) -> None:
    rows = [{"messages": conversation(1, reply_words=30)}, {"messages": conversation(2)}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    short = len(read(write_jsonl(tmp_path / "short.jsonl", rows[1:]), chatml)[0][0].ids)
    sequences, stats = read(data, chatml, max_length=short, overlong="skip", strict=True)
    assert len(sequences) == 1 and len(sequences[0].ids) == short
    assert (stats.conversations_too_long, stats.conversations_truncated,
            stats.documents_skipped) == (1, 0, 1)


# ---- layouts -------------------------------------------------------------------------------


def test_document_layout_is_one_conversation_per_sequence(chatml: Any, tmp_path: Path) -> None:
    rows = [{"messages": conversation(i, reply_words=i)} for i in range(1, 6)]
    sequences, _ = read(write_jsonl(tmp_path / "c.jsonl", rows), chatml)
    assert [trained_text(chatml, s) for s in sequences] == [
        [" ".join([f"Answer {i}."] * i) + "<|im_end|>"] for i in range(1, 6)]
    assert all(s.segments is None for s in sequences)


def test_packed_layout_packs_whole_conversations(chatml: Any, tmp_path: Path) -> None:
    rows = [{"messages": conversation(i, reply_words=i % 3 + 1)} for i in range(9)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    alone, _ = read(data, chatml)
    max_length = 2 * max(len(s.ids) for s in alone) + 7
    packed, stats = read(data, chatml, max_length=max_length, pack=True)
    assert stats.documents_read == 9 and len(packed) < 9
    assert all(len(s.ids) <= max_length for s in packed)
    # Greedy and in order: a sequence is closed only when the next conversation does not fit.
    sizes = [len(s.ids) for s in alone]
    assert [n for s in packed for n in (s.segments or [])] == sizes
    for sequence, following in zip(packed, packed[1:], strict=False):
        assert len(sequence.ids) + (following.segments or [0])[0] > max_length
    assert [i for s in packed for i in s.ids] == [i for s in alone for i in s.ids]
    assert [t for s in packed for t in s.targets or []] == [t for s in alone
                                                            for t in s.targets or []]


# ---- plain text as before ------------------------------------------------------------------


@pytest.mark.parametrize("pack", [False, True])
def test_plain_text_sequences_are_as_before(tiny_tokenizer_dir: Path, jsonl_corpus: Path,
                                            pack: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    got, stats = read(jsonl_corpus, tokenizer, max_length=64, pack=pack)
    before = list(iter_sequences(iter_documents([str(jsonl_corpus)]), tokenizer, 64,
                                 "packed" if pack else "document"))
    assert got == before and stats.documents_read == 10
    assert all(s.targets is None for s in got)


# ---- through cache-teacher -----------------------------------------------------------------


def test_cache_teacher_reads_conversations(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": [SYSTEM, *conversation(i, reply_words=i)]} for i in range(7)]
    data = write_jsonl(tmp_path / "chat.jsonl", [*rows, {"messages": CHAT[:2]}])
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    manifest = cache_teacher(small_config(tiny_teacher_dir, data, tmp_path / "cache",
                                          chat_template=str(template), max_length=200))
    assert manifest.complete and manifest.num_sequences == 7
    assert (manifest.corpus.documents_read, manifest.corpus.documents_skipped) == (7, 1)


def test_cli_without_a_template(tiny_teacher_dir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    out = tmp_path / "cache"
    code, _, err = run_cli(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data",
                            str(data), "--out", str(out), "--max-length", "64"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("kdpipe: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "--chat-template FILE" in errors[0] and "--tokenizer" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": None, "completion": "b"}, "field 'prompt': is null, neither a string nor a list"),
    ({"prompt": "a", "completion": 3}, "field 'completion': is int, neither a string nor"),
    ({"prompt": "a", "completion": CHAT[2:3]}, "field 'prompt': is a string while the other"),
    ({"prompt": ["a"], "completion": CHAT[2:3]}, "field 'prompt': is a list of str, not a list "
     "of messages"),
])
def test_malformed_prompt_completion(chatml: Any, tmp_path: Path, row: dict[str, Any],
                                     message: str) -> None:
    data = write_jsonl(tmp_path / "pc.jsonl", [row])
    with pytest.raises(ConfigError, match=rf"^--strict: .*pc\.jsonl line 1, {message}"):
        read(data, chatml, strict=True)
