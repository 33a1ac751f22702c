"""`kdpipe verify` checks every field of the manifest against the shards and the saved
tokenizer: each edit below, alone, makes it fail and name the field."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.schemas.manifest import CacheManifest
from kdpipe.schemas.records import from_dict

from ..families import FAMILIES, Family
from .conftest import STDLIB, run_cli, small_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify-corpus") / "corpus.jsonl"
    texts = [(STDLIB / n).read_text(encoding="utf-8")[:700]
             for n in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py")]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path,
               corpus: Path) -> Path:
    """Top-8, tempered tails at τ = 2, shards of 5 sequences."""
    out = tmp_path_factory.mktemp("verify") / "cache"
    cache_teacher(small_config(tiny_teacher_dir, corpus, out, tail_temperatures=(2.0,),
                               progress=False))
    return out


def edited(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the cache at `source` whose manifest went through `edit`, its settings
    fingerprint recomputed: a careful edit (or a faulty writer) that validation cannot see."""
    shutil.copytree(source, target)
    path = target / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    data["settings_fingerprint"] = from_dict(CacheManifest, data, "x").with_fingerprint(
        ).settings_fingerprint
    path.write_text(json.dumps(data))
    return target


def setting(*keys: str, value: Any = None, change: Callable[[Any], Any] | None = None
            ) -> Callable[[dict[str, Any]], None]:
    """An edit of data[keys[0]][keys[1]]...: set to `value`, or to `change(old)`."""
    def edit(data: dict[str, Any]) -> None:
        node: Any = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = change(node[keys[-1]]) if change is not None else value
    return edit


def both(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for one in edits:
            one(data)
    return edit


def plus_one(value: int) -> int:
    return value + 1


SHARD = ("shards", 1)
EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # per shard
    "rows": (setting(*SHARD, "rows", change=plus_one), "rows"),
    "tokens": (setting(*SHARD, "tokens", change=plus_one), "tokens"),
    "targets": (setting(*SHARD, "targets", change=plus_one), "targets"),
    "first_sample_id": (setting(*SHARD, "first_sample_id", change=plus_one), "first_sample_id"),
    "last_sample_id": (setting(*SHARD, "last_sample_id", change=plus_one), "last_sample_id"),
    "bytes": (setting(*SHARD, "bytes", change=plus_one), "bytes"),
    "sha256": (setting(*SHARD, "sha256", value="0" * 64), "sha256"),
    "tokens_sha256": (setting(*SHARD, "tokens_sha256", value="0" * 64), "tokens_sha256"),
    "file": (setting(*SHARD, "file", value="shard-00099.parquet"), "missing"),
    # the whole cache
    "vocab_size": (setting("vocab_size", value=100), "vocab_size"),
    "top_k": (setting("top_k", value=4), "top_k"),
    "max_length": (setting("max_length", value=20), "max_length"),
    "shard_size": (setting("shard_size", value=4), "shard_size"),
    "layout": (setting("layout", value="packed"), "layout"),
    "tail_temperatures": (setting("tail_temperatures", value=[2.0, 4.0]), "tail_temperatures"),
    "no tail_temperatures": (setting("tail_temperatures", value=[]), "tail_temperatures"),
    "encoding": (setting("encoding", value="compact"), "encoding"),
    "id_dtype": (setting("id_dtype", value="uint32"), "id_dtype"),
    "logprob_dtype": (setting("logprob_dtype", value="float32"), "logprob_dtype"),
    "cache_mode": (both(setting("cache_mode", value="sampled"), setting("samples", value=20)),
                   "cache_mode"),
    "samples": (setting("samples", value=5), "samples"),
    "sample_seed": (setting("sample_seed", value=3), "sample_seed"),
    "capture_temperature": (setting("capture_temperature", value=2.0), "capture_temperature"),
    "tail_mode": (setting("tail_mode", value="uniform"), "tail_mode"),
    "entropy_mode": (setting("entropy_mode", value="topk_lower_bound"), "entropy_mode"),
    "teacher.backend": (setting("teacher", "backend", value="vllm"), "teacher.backend"),
    "tokenizer.size": (setting("tokenizer", "size", change=plus_one), "tokenizer.size"),
    "tokenizer.bos_token_id": (setting("tokenizer", "bos_token_id", value=5),
                               "tokenizer.bos_token_id"),
    "tokenizer.eos_token_id": (setting("tokenizer", "eos_token_id", value=5),
                               "tokenizer.eos_token_id"),
    "tokenizer.pad_token_id": (setting("tokenizer", "pad_token_id", value=5),
                               "tokenizer.pad_token_id"),
    "tokenizer.vocab_fingerprint": (setting("tokenizer", "vocab_fingerprint", value="0" * 64),
                                    "tokenizer.vocab_fingerprint"),
    "complete": (setting("complete", value=False), "incomplete"),
}


def test_the_unedited_cache_verifies(topk_cache: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    code, out, err = run_cli(["verify", str(topk_cache)], capsys)
    assert code == 0 and out.startswith("ok:"), err


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edited_manifest_field_fails_verify_naming_it(
        name: str, topk_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    edit, named = EDITS[name]
    cache = edited(topk_cache, tmp_path / "cache", edit)
    code, _, err = run_cli(["verify", str(cache)], capsys)
    assert code == 1, err
    assert named in err, err
    assert all(line.startswith("FAULT ") for line in err.splitlines()), err


def test_a_missing_tokenizer_folder_fails_verify(topk_cache: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(topk_cache, cache)
    shutil.rmtree(cache / "tokenizer")
    code, _, err = run_cli(["verify", str(cache)], capsys)
    assert code == 1 and f"{cache / 'tokenizer'}: missing" in err


def test_sampled_and_packed_caches_verify_and_their_fields_are_checked(
        tiny_teacher_dir: Path, corpus: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    sampled = tmp_path / "sampled"
    cache_teacher(small_config(tiny_teacher_dir, corpus, sampled, cache_mode="sampled",
                               samples=20, progress=False))
    packed = tmp_path / "packed"
    cache_teacher(small_config(tiny_teacher_dir, corpus, packed, pack=True, progress=False))
    for cache in (sampled, packed):
        assert run_cli(["verify", str(cache)], capsys)[0] == 0
    wrong = edited(sampled, tmp_path / "wrong-samples", setting("samples", value=19))
    code, _, err = run_cli(["verify", str(wrong)], capsys)
    assert code == 1 and "samples (19)" in err
    short = edited(packed, tmp_path / "wrong-length", setting("max_length", value=64))
    code, _, err = run_cli(["verify", str(short)], capsys)
    assert code == 1 and "layout 'packed'" in err


def test_inspect_shows_what_compatibility_depends_on(topk_cache: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    code, out, _ = run_cli(["inspect", str(topk_cache), "--json"], capsys)
    summary = json.loads(out)
    assert code == 0
    assert summary["tokenizer_vocab_fingerprint"] == \
        manifest["tokenizer"]["vocab_fingerprint"][:16]
    for role in ("bos", "eos", "pad"):
        assert summary[f"{role}_token_id"] == manifest["tokenizer"][f"{role}_token_id"]
    code, out, _ = run_cli(["inspect", str(topk_cache)], capsys)
    assert "bos_token_id" in out and manifest["tokenizer"]["vocab_fingerprint"][:16] in out


@pytest.mark.parametrize("name", FAMILIES)
def test_caches_of_every_model_family_verify(name: str, model_family: Callable[[str], Family],
                                             corpus: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The saved tokenizer's size and BOS/EOS/PAD ids survive its round trip through
    save_pretrained for tokenizers that add a BOS (Llama, Gemma) and those that do not."""
    family = model_family(name)
    out = tmp_path / "cache"
    overrides = {"tokenizer": str(family.tokenizer)} if name == "qwen2" else {}
    cache_teacher(small_config(family.teacher, corpus, out, top_k=4, progress=False,
                               **overrides))
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 0, err
