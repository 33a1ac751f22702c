"""Conversations rendered with chat templates: which tokens are targets, for every template
kind and --train-on mode, asserted against the decoded text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kdpipe.pipeline.chat import overlaps
from kdpipe.schemas.errors import ConfigError

from .chat_helpers import (
    CHAT,
    TOOL_CALL_TURN,
    TOOL_CHAT,
    WEATHER_TOOL,
    make_tokenizer,
    read,
    trained_text,
    write_jsonl,
)
from .chat_templates import CHATML, LLAMA3, REASONING, TOOLS


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Qwen-like: ChatML special tokens, no BOS."""
    return make_tokenizer("qwen2", tmp_path_factory.mktemp("qwen2"), CHATML)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Llama-3-like: its post-processor adds <|begin_of_text|>, the template writes it too."""
    return make_tokenizer("llama", tmp_path_factory.mktemp("llama"), LLAMA3)


def one(data: Path, tokenizer: Any, **options: Any) -> Any:
    sequences, stats = read(data, tokenizer, **options)
    assert len(sequences) == 1 and stats.documents_read == 1
    return sequences[0]


def test_chatml_trains_assistant_replies_and_their_end_of_turn(chatml: Any,
                                                              tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    sequence = one(data, chatml)
    assert trained_text(chatml, sequence) == ["Hello, world.<|im_end|>", "Yes again.<|im_end|>"]
    assert chatml.decode(sequence.ids) == chatml.apply_chat_template(CHAT, tokenize=False)
    assert sequence.segments is None


def test_llama3_template_writes_its_own_bos_once(llama: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    sequence = one(data, llama)
    assert sequence.ids[0] == llama.bos_token_id and sequence.ids.count(llama.bos_token_id) == 1
    assert trained_text(llama, sequence) == ["Hello, world.<|eot_id|>", "Yes again.<|eot_id|>"]
    # The header tokens are the tokenizer's special tokens, never targets.
    header = llama.convert_tokens_to_ids("<|start_header_id|>")
    assert all(not sequence.targets[t] for t, i in enumerate(sequence.ids[1:]) if i == header)


def test_template_without_bos_gets_the_tokenizers_prefix(tmp_path: Path) -> None:
    """A ChatML template on a tokenizer whose encoding starts with BOS: the BOS is prepended
    (never a target), unless --no-add-special-tokens."""
    tokenizer = make_tokenizer("llama", tmp_path / "tok", CHATML)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with_bos = one(data, tokenizer)
    without = one(data, tokenizer, add_special_tokens=False)
    assert with_bos.ids == [tokenizer.bos_token_id] + without.ids
    assert with_bos.targets == [False] + without.targets
    assert trained_text(tokenizer, with_bos) == ["Hello, world.<|im_end|>",
                                                 "Yes again.<|im_end|>"]


def test_tool_calls_are_trained_and_tool_results_never(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CHAT,
                                                   "tools": [WEATHER_TOOL]}])
    sequence = one(data, chatml, chat_template=str(write_template(tmp_path, TOOLS)))
    text = chatml.decode(sequence.ids)
    assert '"name": "get_weather", "description"' in text  # the tools were rendered
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert trained_text(chatml, sequence) == [TOOL_CALL_TURN, "It is sunny.<|im_end|>"]


def test_tools_as_a_json_string(chatml: Any, tmp_path: Path) -> None:
    import json

    rows = [{"messages": TOOL_CHAT, "tools": json.dumps([WEATHER_TOOL])}]
    template = str(write_template(tmp_path, TOOLS))
    as_string = one(write_jsonl(tmp_path / "s.jsonl", rows), chatml, chat_template=template)
    rows[0]["tools"] = [WEATHER_TOOL]
    assert one(write_jsonl(tmp_path / "l.jsonl", rows), chatml,
               chat_template=template) == as_string


def write_template(folder: Path, text: str) -> Path:
    path = folder / "template.jinja"
    path.write_text(text, encoding="utf-8")
    return path


def test_template_that_is_not_prefix_stable_falls_back_to_the_content(chatml: Any,
                                                                      tmp_path: Path) -> None:
    """Qwen-3-like: an earlier reply's reasoning is dropped once a later user message comes,
    so rendering the conversation up to that reply is no prefix of the whole."""
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "content": "answer1", "reasoning_content": "first thoughts"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "answer2", "reasoning_content": "r2"}]
    data = write_jsonl(tmp_path / "think.jsonl", [{"messages": messages}])
    sequence = one(data, chatml, chat_template=str(write_template(tmp_path, REASONING)))
    assert "first thoughts" not in chatml.decode(sequence.ids)
    assert trained_text(chatml, sequence) == ["answer1<|im_end|>",
                                              "<think>\nr2\n</think>\n\nanswer2<|im_end|>"]


def test_content_search_starts_after_the_prompt(chatml: Any, tmp_path: Path) -> None:
    """A reply whose text also appears in the user's message is found in the reply."""
    messages = [{"role": "user", "content": "Say OK"},
                {"role": "assistant", "content": "OK", "reasoning_content": "easy"},
                {"role": "user", "content": "OK then"},
                {"role": "assistant", "content": "Bye"}]
    data = write_jsonl(tmp_path / "ok.jsonl", [{"messages": messages}])
    sequence = one(data, chatml, chat_template=str(write_template(tmp_path, REASONING)))
    assert trained_text(chatml, sequence) == ["OK<|im_end|>", "Bye<|im_end|>"]


def test_reply_the_template_rewrites_and_moves_is_malformed(chatml: Any,
                                                            tmp_path: Path) -> None:
    shouting = REASONING.replace("{{- message.content + '<|im_end|>\\n' }}",
                                 "{{- (message.content | upper if loop.index0 < ns.last_query "
                                 "else message.content) + '<|im_end|>\\n' }}")
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "quiet",
                                                    "reasoning_content": "r"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "fine"}]
    data = write_jsonl(tmp_path / "loud.jsonl", [{"messages": messages},
                                                 {"messages": CHAT[:3]}])
    template = str(write_template(tmp_path, shouting))
    sequences, stats = read(data, chatml, chat_template=template)
    assert len(sequences) == 1 and stats.documents_skipped == 1
    with pytest.raises(ConfigError, match=r"loud\.jsonl line 1, field 'messages' message 2: "
                       r"the chat template does not render this assistant reply"):
        read(data, chatml, chat_template=template, strict=True)


# ---- --train-on ----------------------------------------------------------------------------


def test_last_assistant(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    sequence = one(data, chatml, train_on="last-assistant")
    assert trained_text(chatml, sequence) == ["Yes again.<|im_end|>"]


def test_all_trains_every_position_but_the_last(chatml: Any, llama: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    for tokenizer in (chatml, llama):
        sequence = one(data, tokenizer, train_on="all")
        assert sequence.targets == [True] * (len(sequence.ids) - 1) + [False]


def test_completion_on_conversations_is_refused(chatml: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match=r"^--train-on completion: .*--train-on "
                       r"last-assistant") as info:
        read(data, chatml, train_on="completion")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("train_on", ["assistant", "last-assistant", "completion"])
def test_text_trains_everything_only(chatml: Any, tmp_path: Path, train_on: str) -> None:
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text"}])
    with pytest.raises(ConfigError, match=rf"^--train-on {train_on}: plain text"):
        read(data, chatml, train_on=train_on)


def test_conversation_without_a_reply_is_skipped_and_counted(chatml: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[:2]}, {"messages": CHAT}])
    sequences, stats = read(data, chatml, strict=True)  # not malformed: never fatal
    assert len(sequences) == 1
    assert (stats.documents_read, stats.documents_skipped,
            stats.conversations_without_targets) == (1, 1, 1)
    assert "skipped 1 of 2 documents (1 no target tokens); first at" in caplog.text


# ---- prompt / completion -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_plain_prompt_completion(family: str, tmp_path: Path) -> None:
    """Strings are not templated: prompt + completion encoded as a text document is (the
    tokenizer's BOS, then EOS); the completion and its EOS are the targets."""
    tokenizer = make_tokenizer(family, tmp_path / "tok", None)  # no template needed
    row = {"prompt": "Question: what is two plus two?\nAnswer:", "completion": " four."}
    data = write_jsonl(tmp_path / "pc.jsonl", [row])
    sequence = one(data, tokenizer)
    assert trained_text(tokenizer, sequence) == [" four." + tokenizer.eos_token]
    text = row["prompt"] + row["completion"]
    expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert sequence.ids == expected
    everything = one(data, tokenizer, train_on="all")
    assert everything.ids == sequence.ids
    assert everything.targets == [True] * (len(sequence.ids) - 1) + [False]


def test_prompt_completion_messages(chatml: Any, tmp_path: Path) -> None:
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    data = write_jsonl(tmp_path / "pc.jsonl", [row])
    assert trained_text(chatml, one(data, chatml)) == ["Yes again.<|im_end|>"]
    assert trained_text(chatml, one(data, chatml, train_on="assistant")) == [
        "Hello, world.<|im_end|>", "Yes again.<|im_end|>"]
    assert one(data, chatml).ids == one(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]),
                                        chatml).ids


def test_targets_of_tokens_straddling_a_boundary() -> None:
    # tokens [0,3) [3,6) [6,9); a span [4,7) touches the last two, [3,3) none
    assert overlaps([(0, 3), (3, 6), (6, 9)], [(4, 7)]) == [False, True, True]
    assert overlaps([(0, 3), (3, 6), (6, 9)], [(3, 3)]) == [False, False, False]
    assert overlaps([(0, 3), (3, 6), (6, 9)], [(0, 3), (6, 9)]) == [True, False, True]
    assert overlaps([(0, 0), (0, 2)], [(0, 2)]) == [False, True]  # no characters: no target


def test_token_straddling_prompt_and_completion_is_a_target(chatml: Any,
                                                           tmp_path: Path) -> None:
    """The byte-level BPE reads the prompt's last newline and the completion's indent as one
    token: it overlaps the completion, so it is a target (docs/chat-data.md)."""
    row = {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}
    sequence = one(write_jsonl(tmp_path / "pc.jsonl", [row]), chatml)
    assert trained_text(chatml, sequence) == ["\n    return a + b\n" + chatml.eos_token]
