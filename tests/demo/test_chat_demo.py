"""`kdpipe demo --preset chat-tiny` end to end, and the chat corpus it is built from."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from kdpipe.demo.run import ARM_LABELS, run_demo
from kdpipe.embedded.chat import (
    MAX_ANSWER_CHARS,
    SYSTEM_PROMPT,
    answer_text,
    documented,
    module_name,
    write_chat_corpus,
)
from kdpipe.embedded.prepare import PRESET_NAME, check_preset
from kdpipe.embedded.presets import get_preset
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache, summarize
from kdpipe.schemas.errors import ConfigError

SOURCE = '''
def dumps(obj, indent=None):
    """Serialize ``obj`` to a JSON formatted ``str``.

    More detail that is not part of the answer.
    """

def _private():
    """A private helper that is never asked about."""

class Encoder:
    """Extensible JSON encoder for Python data structures."""

    def encode(self, o):
        """Return a JSON string representation of a Python data structure."""

    def _iterencode(self, o):
        """Private again, so never asked about."""

def short():
    """Deprecated."""
'''


def test_questions_are_public_objects_answered_by_their_first_paragraph() -> None:
    assert module_name("json/__init__.py") == "json"
    assert module_name("email/mime/text.py") == "email.mime.text"
    found = documented(SOURCE, "json")
    assert [(d.name, d.kind) for d in found] == [
        ("json.dumps", "function"), ("json.Encoder", "class"),
        ("json.Encoder.encode", "method")]
    assert found[0].answer == "Serialize ``obj`` to a JSON formatted ``str``."
    capped = answer_text("word " * 500)
    assert capped is not None and capped.endswith(" ...")
    assert len(capped) <= MAX_ANSWER_CHARS + 4
    assert documented("def broken(:\n", "x") == []


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chat_corpus_is_split_by_module_and_stable(tmp_path: Path) -> None:
    train, heldout = write_chat_corpus(tmp_path / "c", train_chars=20_000, heldout_chars=4_000)
    train_rows, heldout_rows = rows(train), rows(heldout)
    assert train_rows and heldout_rows
    train_modules = {r["module"] for r in train_rows}
    heldout_modules = {r["module"] for r in heldout_rows}
    assert not train_modules & heldout_modules
    for row in train_rows + heldout_rows:
        messages = row["messages"]
        assert isinstance(messages, list) and messages[0] == {"role": "system",
                                                              "content": SYSTEM_PROMPT}
        roles = [m["role"] for m in messages[1:]]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(m["content"] for m in messages)
    info = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert info["kind"] == "chat" and info["heldout_conversations"] == len(heldout_rows)
    mtime = train.stat().st_mtime_ns
    assert write_chat_corpus(tmp_path / "c", 20_000, 4_000) == (train, heldout)
    assert train.stat().st_mtime_ns == mtime  # finished: not rewritten


def test_folder_prepared_before_the_corpus_field_still_matches(tmp_path: Path) -> None:
    preset = get_preset("small")
    recorded = asdict(preset)
    del recorded["corpus"]  # as kdpipe wrote preset.json before chat presets existed
    (tmp_path / PRESET_NAME).write_text(json.dumps(recorded))
    check_preset(tmp_path, preset)
    with pytest.raises(ConfigError, match="--preset small"):
        check_preset(tmp_path, get_preset("chat"))


def segment_targets(cache_dir: Path) -> list[list[int]]:
    """Per packed conversation, in order: the tokens its target positions predict."""
    found: list[list[int]] = []
    for shard in open_cache(cache_dir).manifest.shards:
        for row in pq.read_table(cache_dir / shard.file).to_pylist():
            ids = np.asarray(row[cols.INPUT_IDS])
            mask = np.asarray(row[cols.TARGET_MASK], dtype=bool)  # (T-1,)
            start = 0
            for length in row[cols.SEGMENTS]:
                end = start + length  # positions start..end-2 predict tokens of this segment
                found.append(ids[start + 1:end][mask[start:end - 1]].tolist())
                assert not mask[end - 1:end].any() or end == ids.size  # never across segments
                start = end
    return found


@pytest.mark.slow
def test_chat_tiny_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    table = run_demo(out, "chat-tiny", threads=1, device="cpu", progress=False)
    found = {row["arm"]: row for row in table["rows"]}
    assert set(found) == {"teacher", "ce", "kd"}
    for arm, row in found.items():
        assert math.isfinite(row["eval_ce"]) and row["eval_ce"] > 0, arm
    markdown = (out / "demo.md").read_text()
    for arm in ("ce", "kd"):
        assert f"| {ARM_LABELS[arm]} |" in markdown
    assert "assistant-only targets" in markdown

    # Both caches hold assistant-only targets: the target tokens of each packed conversation
    # decode to its replies, each with its end-of-turn token (a conversation cut at
    # max_length, none on the Python this was written on, to a prefix of them).
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.chat_template
    for name, split in (("cache", "train"), ("heldout-cache", "heldout")):
        cache = open_cache(out / name)
        summary = summarize(cache)
        assert summary["format"] == "messages" and summary["train_on"] == "assistant"
        assert 0 < summary["target_fraction"] < 0.9  # type: ignore[operator]
        expected = ["".join(f"{m['content']}<|im_end|>" for m in c["messages"]  # type: ignore[attr-defined]
                            if m["role"] == "assistant")
                    for c in rows(out / "corpus" / f"{split}.jsonl")]
        trained = [tokenizer.decode(text) for text in segment_targets(out / name)]
        assert len(trained) == len(expected)
        cut = [i for i, (t, e) in enumerate(zip(trained, expected, strict=True)) if t != e]
        assert all(expected[i].startswith(trained[i]) for i in cut)
        assert len(cut) <= cache.manifest.corpus.conversations_truncated
    assert (out / "timings.json").is_file() and json.loads(
        (out / PRESET_NAME).read_text())["corpus"] == "chat"

    # A re-run finds every stage done and trains nothing.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr("kdpipe.trainer.train.train", no_training)
    again = run_demo(out, "chat-tiny", threads=1, device="cpu", progress=False)
    assert again["rows"] == table["rows"]
