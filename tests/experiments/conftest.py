"""Experiment fixtures: a tiny cache and held-out cache, and one small finished experiment."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_MODULES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py",
                 "glob.py", "keyword.py", "heapq.py"]
HELDOUT_MODULES = ["string.py", "abc.py"]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads (see tests/trainer/conftest.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _corpus(path: Path, modules: list[str], chars: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for name in modules:
            f.write(json.dumps({"text": (STDLIB / name).read_text(encoding="utf-8")[:chars]})
                    + "\n")
    return path


@pytest.fixture(scope="session")
def exp_caches(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path
               ) -> tuple[Path, Path]:
    """(train cache, held-out cache): ~40 and ~12 sequences of <= 48 tokens, top-4."""
    root = tmp_path_factory.mktemp("exp-caches")
    caches = []
    for name, modules, chars in (("train", TRAIN_MODULES, 900), ("heldout", HELDOUT_MODULES, 600)):
        corpus = _corpus(root / f"{name}.jsonl", modules, chars)
        out = root / name
        cache_teacher(CacheTeacherConfig(teacher=str(tiny_teacher_dir), data=(str(corpus),),
                                         out=out, device="cpu", batch_size=16, top_k=4,
                                         max_length=48, pack=True, shard_size=16))
        caches.append(out)
    return caches[0], caches[1]


STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 64}


def experiment_yaml(path: Path, caches: tuple[Path, Path], out: Path) -> Path:
    """Four arms (one with a per-seed curriculum from another arm's runs) × two seeds."""
    import yaml

    spec = {
        "name": "tiny-question",
        "description": "Four arms on a tiny cache.",
        "out": str(out),
        "setup": {"cache": str(caches[0]), "eval_cache": str(caches[1])},
        "seeds": [0, 1],
        "baseline": "kd",
        "comparisons": [["kd-cl-sr-student", "kd-cl"]],
        "train": {"student-config": STUDENT, "epochs": 1, "batch-size": 8, "lr": "3e-3",
                  "eval-every": 2, "log-every": 1, "device": "cpu"},
        "curricula": {"teacher-nll": {"source": "teacher", "metric": "nll", "buckets": 4},
                      "ce-snapshot": {"source": "snapshot", "from_arm": "ce"}},
        "arms": {"ce": {"mode": "ce"},
                 "kd": None,
                 "kd-cl": {"curriculum": "teacher-nll", "pacing": "linear"},
                 "kd-cl-sr-student": {"curriculum": "ce-snapshot", "reliance": "threshold"}},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory, exp_caches: tuple[Path, Path]
                    ) -> tuple[Path, Path]:
    """(experiment YAML, finished experiment folder)."""
    from kdpipe.experiments.config import load_experiment
    from kdpipe.experiments.runner import run_experiment

    root = tmp_path_factory.mktemp("experiment")
    config = experiment_yaml(root / "tiny.yaml", exp_caches, root / "out")
    torch.set_num_threads(1)
    run_experiment(load_experiment(config), threads=1, device="cpu", progress=False)
    return config, root / "out"
