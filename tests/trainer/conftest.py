"""Trainer fixtures: one tiny teacher cache (made once per session) and tiny students."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdpipe.curriculum.build import build_curriculum
from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.trainer.config import TrainConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_MODULES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py",
                  "glob.py", "keyword.py", "heapq.py", "string.py", "abc.py"]
TAIL_TEMPERATURE = 2.0  # stored exactly in the test cache


@pytest.fixture(scope="session")
def trainer_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trainer-corpus") / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for name in CORPUS_MODULES:
            f.write(json.dumps({"text": (STDLIB / name).read_text(encoding="utf-8")[:700]})
                    + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path,
               trainer_corpus: Path) -> Path:
    """~80 sequences of <= 64 tokens, top-8, in shards of 16 (several shards), τ=2 tails."""
    out = tmp_path_factory.mktemp("cache")
    cache_teacher(CacheTeacherConfig(
        teacher=str(tiny_teacher_dir), data=(str(trainer_corpus),), out=out, device="cpu",
        batch_size=16, top_k=8, max_length=64, shard_size=16,
        tail_temperatures=(TAIL_TEMPERATURE,)))
    return out


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
                     ) -> Path:
    """A pretrained-style tiny Llama student saved with the teacher's tokenizer."""
    out = tmp_path_factory.mktemp("student")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def student_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A from-scratch student spec (vocab size comes from the cache)."""
    path = tmp_path_factory.mktemp("student-config") / "student.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "num_key_value_heads": 4,
                                "max_position_embeddings": 128}))
    return path


@pytest.fixture(scope="session")
def teacher_curriculum(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """The teacher-NLL curriculum of `tiny_cache`."""
    out = tmp_path_factory.mktemp("curricula") / "teacher-nll.parquet"
    build_curriculum(BuildCurriculumConfig(cache=str(tiny_cache), out=str(out), source="teacher",
                                           metric="nll", progress=False))
    return out


def small_config(cache: Path, out: Path, **overrides: object) -> TrainConfig:
    """A TrainConfig that trains in well under a second on CPU."""
    values: dict[str, object] = dict(cache=str(cache), out=str(out), device="cpu", batch_size=4,
                                     lr=3e-3, max_steps=6, log_every=1, progress=False,
                                     chunk_size=64, warmup_steps=1)
    values.update(overrides)
    return TrainConfig.from_options(**values)
