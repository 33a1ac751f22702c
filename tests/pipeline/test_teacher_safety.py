"""cache-teacher refuses what would make a wrong cache: a tokenizer that is not the teacher's,
and a teacher whose output is not finite (nothing non-finite is ever written)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError, NonFiniteError
from kdpipe.schemas.manifest import read_manifest

from ..conftest import STDLIB
from ..families import Family, permuted_tokenizer
from .conftest import run_cli, small_config


def test_a_tokenizer_that_is_not_the_teachers_is_refused(
        tiny_teacher_dir: Path, tiny_tokenizer_dir: Path, small_corpus: Path,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same size, ids permuted: the teacher would read scrambled text and exit 0."""
    other = permuted_tokenizer(tiny_tokenizer_dir, tmp_path / "permuted", 150, 151)
    out = tmp_path / "cache"
    cfg = small_config(tiny_teacher_dir, small_corpus, out, tokenizer=str(other))
    with pytest.raises(ConfigError, match=r"does not map ids as the teacher's own tokenizer "
                                          r".*id 150 is .*--allow-tokenizer-mismatch"):
        cache_teacher(cfg)
    assert not out.exists()
    # An explicit flag says the user means it: cached, with a warning.
    with caplog.at_level(logging.WARNING):
        manifest = cache_teacher(small_config(tiny_teacher_dir, small_corpus, out,
                                              tokenizer=str(other),
                                              allow_tokenizer_mismatch=True, progress=False))
    assert manifest.complete and "--allow-tokenizer-mismatch" in caplog.text


def test_a_tokenizer_with_more_ids_than_the_teachers_is_refused(
        model_family: Callable[[str], Family], small_corpus: Path, tmp_path: Path) -> None:
    """The teacher's head is padded (448 rows, 400 ids): two extra ids in --tokenizer would
    put two untrained padding rows into the cached softmax."""
    family = model_family("qwen2")
    more = AutoTokenizer.from_pretrained(family.tokenizer)
    more.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|think|>"]})
    more.save_pretrained(tmp_path / "more")
    out = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"does not map ids as the teacher's own tokenizer .*"
                                          r"\(it has 402 ids, the teacher's own 400\)"):
        cache_teacher(small_config(family.teacher, small_corpus, out,
                                   tokenizer=str(tmp_path / "more")))
    assert not out.exists()


def test_the_cache_keeps_its_tokenizer(tiny_teacher_dir: Path, small_corpus: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """A student run needs nothing but the cache; `verify` checks the saved tokenizer too."""
    out = tmp_path / "cache"
    manifest = cache_teacher(small_config(tiny_teacher_dir, small_corpus, out, progress=False))
    cache = open_cache(out)
    assert cache.tokenizer_dir is not None and manifest.tokenizer.vocab_fingerprint
    assert run_cli(["verify", str(out)], capsys)[0] == 0
    vocab = json.loads((cache.tokenizer_dir / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {t: (i + 1) % 320 for t, i in vocab["model"]["vocab"].items()}
    (cache.tokenizer_dir / "tokenizer.json").write_text(json.dumps(vocab))
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 1 and "does not map ids as the manifest records" in err


def overflowing_teacher(source: Path, out: Path, token_id: int) -> Path:
    """A copy of `source` whose embedding of `token_id` overflows float16 (finite in float32):
    every sequence holding that token gets non-finite float16 logits from there on."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = 1e5  # float16 max: 65504
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((source / name).read_bytes())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{}, {"cache_mode": "sampled", "samples": 4}],
                         ids=["topk", "sampled"])
def test_nonfinite_teacher_output_stops_the_cache(mode: dict[str, object],
                                                  tiny_teacher_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    teacher = overflowing_teacher(tiny_teacher_dir, tmp_path / "teacher", token_id=1)
    corpus = tmp_path / "corpus.jsonl"
    texts = [(STDLIB / n).read_text(encoding="utf-8")[:400]
             for n in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py")]
    texts.append("x = 1 <|pad|> y = 2")  # the last document holds the overflowing token
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "cache"
    cfg = small_config(teacher, corpus, out, dtype="float16", device="cpu", shard_size=2,
                       max_length=64, progress=False, **mode)
    cache_teacher(small_config(teacher, corpus, tmp_path / "float32", dtype="float32",
                               device="cpu", shard_size=2, max_length=64, progress=False, **mode))
    with pytest.raises(NonFiniteError) as caught:
        cache_teacher(cfg)
    message = str(caught.value)
    assert "not finite" in message and "computed in float16" in message
    assert "--dtype bfloat16 --overwrite" in message and "target position" in message
    sample = int(message.split("at sample ")[1].split(",")[0])
    manifest = read_manifest(out)
    assert not manifest.complete  # no shard claims the cache is done
    assert all(not s.first_sample_id <= sample <= s.last_sample_id for s in manifest.shards)
    assert manifest.shards  # the shards before the faulty one are kept for a resume
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == [s.file for s in
                                                                   manifest.shards]
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 1 and "incomplete" in err and "nan" not in err.lower()


def test_a_tokenizer_without_the_teachers_bos_is_named_in_the_warning(
        model_family: Callable[[str], Family], small_corpus: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Same mapping, but no BOS post-processor: cached (the ids mean the same), with a warning
    that says what differs in words, not only "post_processor"."""
    family = model_family("llama")
    bare = AutoTokenizer.from_pretrained(family.tokenizer)
    bare.backend_tokenizer.post_processor = None
    bare.save_pretrained(tmp_path / "bare")
    with caplog.at_level(logging.WARNING):
        cache_teacher(small_config(family.teacher, small_corpus, tmp_path / "cache",
                                   tokenizer=str(tmp_path / "bare"), progress=False))
    assert (f"it adds [] before and [] after each text where the teacher's own adds "
            f"[{family.bos_id}] and []") in caplog.text
