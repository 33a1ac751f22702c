"""`kdpipe demo --preset tiny` end to end: every stage, a row per arm with finite numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdpipe.demo.run import ARM_LABELS, ARMS, CURRICULA, run_demo
from kdpipe.embedded.corpus import is_heldout, write_corpus
from kdpipe.experiments.config import ArmSpec, CurriculumSpec, load_experiment
from kdpipe.schemas.errors import ConfigError


def test_corpus_split_is_by_file_and_stable(tmp_path: Path) -> None:
    train, heldout = write_corpus(tmp_path / "c", train_chars=40_000, heldout_chars=10_000)
    train_paths = [json.loads(line)["path"] for line in train.open()]
    heldout_paths = [json.loads(line)["path"] for line in heldout.open()]
    assert train_paths and heldout_paths
    assert not set(train_paths) & set(heldout_paths)
    assert all(is_heldout(p) for p in heldout_paths)
    assert not any(is_heldout(p) for p in train_paths)
    assert not any(p.startswith("test/") for p in train_paths)
    mtime = train.stat().st_mtime_ns
    assert write_corpus(tmp_path / "c", 40_000, 10_000) == (train, heldout)
    assert train.stat().st_mtime_ns == mtime  # finished: not rewritten


def test_an_arm_named_in_the_demo_and_the_experiment_follows_one_curriculum() -> None:
    """The demo's table and docs/results.md (experiments/seed-question.yaml) share arm names;
    a shared name must mean the same curriculum, or the two compare different things."""
    def curriculum_of(arms: tuple[ArmSpec, ...], curricula: tuple[CurriculumSpec, ...]
                      ) -> dict[str, object]:
        specs = {c.name: (c.options, c.from_arm) for c in curricula}
        return {arm.name: specs.get(arm.options.get("curriculum", "")) for arm in arms}

    exp = load_experiment(Path(__file__).parents[2] / "experiments" / "seed-question.yaml")
    demo, experiment = curriculum_of(ARMS, CURRICULA), curriculum_of(exp.arms, exp.curricula)
    shared = demo.keys() & experiment.keys()
    assert {"ce", "kd", "kd-cl-student"} <= shared
    assert {name for name in shared if demo[name] != experiment[name]} == set()
    assert set(ARM_LABELS) == set(demo)


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    table = run_demo(out, "tiny", threads=1, device="cpu", progress=False)
    rows = {row["arm"]: row for row in table["rows"]}
    assert set(rows) == {"teacher", *ARM_LABELS}
    for arm, row in rows.items():
        for key in ("eval_ppl", "eval_top1_agreement"):
            assert math.isfinite(row[key]) and row[key] > 0, (arm, key)
        if arm != "teacher":
            assert math.isfinite(row["train_tokens_per_s"]) and row["wall_s"] > 0
    assert rows["teacher"]["eval_ppl"] < rows["ce"]["eval_ppl"] * 1.5  # a trained teacher
    markdown = (out / "demo.md").read_text()
    for label in ARM_LABELS.values():
        assert f"| {label} |" in markdown
    for stage in ("corpus", "tokenizer", "token cache", "teacher training",
                  "teacher cache (train)", "teacher cache (held-out)"):
        assert f"| {stage} |" in markdown
    for artifact in ("tokenizer/tokenizer.json", "teacher-run/final/config.json",
                     "cache/manifest.json", "heldout-cache/manifest.json",
                     "curricula/teacher-nll.parquet", "curricula/ce-snapshot/seed-0.parquet",
                     "runs/kd-cl-sr-student/seed-0/final_metrics.json", "demo.json", "summary.md"):
        assert (out / artifact).is_file(), artifact

    # A re-run finds every stage done and trains nothing.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr("kdpipe.trainer.train.train", no_training)
    again = run_demo(out, "tiny", threads=1, device="cpu", progress=False)
    assert again["rows"] == table["rows"]
    with pytest.raises(ConfigError, match="--preset tiny"):
        run_demo(out, "small", threads=1, device="cpu", progress=False)
