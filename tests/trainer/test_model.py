"""Student loading: tokenizer fingerprint check, head width, and the body/head split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    PreTrainedTokenizerFast,
)

from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.trainer.model import check_tokenizer, check_vocab, load_tokenizer, split_student
from kdpipe.trainer.train import train

from ..families import permuted_tokenizer
from .conftest import small_config


def test_tokenizer_mismatch_is_refused(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                       tiny_tokenizer_dir: Path) -> None:
    """Same size, two ids swapped: refused, naming the first id that differs and both strings."""
    other = permuted_tokenizer(tiny_tokenizer_dir, tmp_path / "permuted", 100, 101)
    cfg = small_config(tiny_cache, tmp_path / "run", student=str(tiny_student_dir),
                       tokenizer=str(other))
    with pytest.raises(ConfigError, match="tokenizer mismatch") as caught:
        train(cfg)
    message = str(caught.value)
    assert "\n" not in message and "id 100 is " in message
    cache = open_cache(tiny_cache)
    expected = load_tokenizer(str(tiny_student_dir), None, cache).convert_ids_to_tokens([100, 101])
    assert repr(expected[0]) in message and repr(expected[1]) in message
    # The matching tokenizer, found next to the student, passes.
    check_tokenizer(load_tokenizer(str(tiny_student_dir), None, cache), cache)


def test_extra_tokens_after_the_real_ids_are_compatible(tmp_path: Path, tiny_cache: Path,
                                                        tiny_student_dir: Path) -> None:
    """The student trains on the cache's ids: ids past them cannot occur, so a tokenizer that
    only adds tokens at the end maps every cached id the same way."""
    other = tmp_path / "more-tokens"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_student_dir)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    cache = open_cache(tiny_cache)
    check_tokenizer(load_tokenizer(None, str(other), cache), cache)


def test_head_narrower_than_the_teacher_vocab_is_refused(tmp_path: Path, tiny_cache: Path,
                                                         student_config_file: Path) -> None:
    spec = json.loads(student_config_file.read_text())
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps({**spec, "vocab_size": 100}))
    cfg = small_config(tiny_cache, tmp_path / "run", student_config=str(narrow))
    with pytest.raises(ConfigError, match="head has 100 rows, fewer than the 320 real ids"):
        train(cfg)


def test_wider_head_is_allowed(tiny_cache: Path, student_config_file: Path) -> None:
    manifest = open_cache(tiny_cache).manifest
    from transformers import AutoConfig

    spec = json.loads(student_config_file.read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec,
                                  vocab_size=manifest.vocab_size + 64)
    wide = AutoModelForCausalLM.from_config(config)
    check_vocab(wide, manifest, "wide")
    # generate() never emits the 64 untrained padding ids.
    assert wide.generation_config.suppress_tokens == list(range(manifest.vocab_size,
                                                                manifest.vocab_size + 64))


@pytest.mark.parametrize("fixture", ["tiny_student_dir", "tiny_gpt2_dir"])
def test_split_reproduces_the_model_logits(fixture: str, request: pytest.FixtureRequest) -> None:
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    parts = split_student(model, fixture)
    ids = torch.randint(0, 300, (2, 11))
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        found = parts.logits(parts.hidden_states(ids, mask))
    torch.testing.assert_close(found, expected)


def test_soft_capped_logits_are_handled() -> None:
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5))
    parts = split_student(model, "gemma2")
    assert parts.logit_transform is not None


def test_unknown_head_transform_is_refused(tiny_student_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    original = model.forward

    def doubled(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0  # something the chunked head would not reproduce
        return out

    model.forward = doubled
    with pytest.raises(ConfigError, match="computes its logits differently"):
        split_student(model, "doubled")


def test_a_config_transformers_validators_refuse_is_one_line(tiny_cache: Path, tmp_path: Path
                                                             ) -> None:
    # transformers' config validators raise huggingface_hub's StrictDataclassError (no
    # ValueError), whose first line only names the validator.
    bad = {"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(bad))
    folder = tmp_path / "badmodel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bad))
    reason = "The hidden size (30) is not a multiple of the number of attention heads (4)"
    for where in (dict(student_config=str(config)), dict(student=str(folder))):
        with pytest.raises(ConfigError, match=re.escape(reason)) as caught:
            train(small_config(tiny_cache, tmp_path / "run", **where))
        assert "\n" not in str(caught.value)
