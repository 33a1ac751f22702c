"""A second embedded teacher: teacher B's caches align with A's, B disagrees with A, every
stage skips when done, and a folder keeps the second teacher it was prepared with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdpipe.demo.run import ARMS_B, LABELS_B, run_demo
from kdpipe.embedded.prepare import Prepared, prepare
from kdpipe.embedded.presets import PRESETS, SMALL_TEACHERS, get_preset
from kdpipe.embedded.second_teacher import (
    RECORD_NAME,
    check_second_teacher,
    leading_documents,
    second_teacher_spec,
)
from kdpipe.embedded.teacher_agreement import compare_teachers
from kdpipe.embedded.timing import StageClock
from kdpipe.experiments.config import ArmSpec
from kdpipe.schemas import shard as cols
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError


def sequences(cache_dir: Path) -> tuple[list[int], list[list[int]]]:
    """(sample ids, input ids) of every sequence of a cache, in order."""
    cache = open_cache(cache_dir)
    ids: list[int] = []
    tokens: list[list[int]] = []
    for table in cache.iter_row_groups([cols.SAMPLE_ID, cols.INPUT_IDS]):
        ids += table.column(cols.SAMPLE_ID).to_pylist()
        tokens += table.column(cols.INPUT_IDS).to_pylist()
    return ids, tokens


def test_leading_documents_keep_the_first_lines_holding_the_share(tmp_path: Path) -> None:
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"text": "x" * n}) + "\n" for n in (30, 10, 40, 20)))
    out = leading_documents(src, tmp_path / "half.jsonl", 0.5)
    kept = [len(json.loads(line)["text"]) for line in out.read_text().splitlines()]
    assert kept == [30, 10, 40]  # 30 + 10 lines' characters fall short of half; 40 passes it
    assert leading_documents(src, tmp_path / "all-of-it.jsonl", 1.0).read_text() == \
        src.read_text()
    with pytest.raises(ValueError, match="share 0"):
        leading_documents(src, tmp_path / "none.jsonl", 0)


def test_every_preset_has_a_small_teacher_between_its_student_and_teacher() -> None:
    assert set(SMALL_TEACHERS) == set(PRESETS)
    for name, preset in PRESETS.items():
        size = SMALL_TEACHERS[name]
        params = [s.parameters(preset.vocab_size) for s in (preset.student, size,
                                                            preset.teacher)]
        assert params == sorted(params) and len(set(params)) == 3, name
        assert size.hidden % size.heads == 0
    assert second_teacher_spec(PRESETS["tiny"], "half").shape == PRESETS["tiny"].teacher
    with pytest.raises(ConfigError, match="--second-teacher 'big' is not one of half, small"):
        second_teacher_spec(PRESETS["tiny"], "big")


def test_a_folder_keeps_its_second_teacher(tmp_path: Path) -> None:
    tiny = PRESETS["tiny"]
    check_second_teacher(tmp_path, second_teacher_spec(tiny, "half"))
    check_second_teacher(tmp_path, second_teacher_spec(tiny, "half"))  # the same: accepted
    with pytest.raises(ConfigError, match=r"prepared with --second-teacher half \(other"):
        check_second_teacher(tmp_path, second_teacher_spec(tiny, "small"))
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    assert record["choice"] == "half" and record["train_share"] == 0.5


def test_a_demo_with_teacher_b_is_not_rerun_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its runs, and so its table, hold teacher B's students: without --second-teacher the
    demo would show them without teacher B's row and notes. Refused before any work."""
    from kdpipe.embedded.prepare import check_preset

    check_preset(tmp_path, PRESETS["tiny"], second_teacher_spec(PRESETS["tiny"], "half"))

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started")

    monkeypatch.setattr("kdpipe.demo.run.prepare", no_work)
    with pytest.raises(ConfigError) as info:
        run_demo(tmp_path, "tiny", threads=1, device="cpu", progress=False)
    assert str(info.value) == (
        f"--out {tmp_path} was prepared with --second-teacher half; pass --second-teacher half "
        "to re-run it, or choose another folder, or pass --overwrite to replace it")


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The tiny preset with teacher B trained on the leading half (about 10 s of CPU)."""
    return prepare(get_preset("tiny"), tmp_path_factory.mktemp("half") / "setup",
                   device="cpu", progress=False, second_teacher="half")


@pytest.mark.slow
def test_teacher_b_is_cached_over_teacher_a_sequences(half: Prepared) -> None:
    assert half.cache_b is not None and half.heldout_b is not None and half.teacher_b
    for a, b in ((half.cache, half.cache_b), (half.heldout_cache, half.heldout_b)):
        assert sequences(a) == sequences(b)
        ma, mb = open_cache(a).manifest, open_cache(b).manifest
        assert (ma.top_k, ma.num_targets) == (mb.top_k, mb.num_targets)
        assert ma.teacher.name_or_path != mb.teacher.name_or_path
    # B learnt from A's leading train sequences: all but the last, shorter block of its own
    # token cache, where the leading documents end.
    _, all_tokens = sequences(half.root / "token-cache")
    _, leading = sequences(half.root / "teacher-b" / "token-cache")
    assert leading[:-1] == all_tokens[:len(leading) - 1]
    assert 0.4 < len(leading) / len(all_tokens) < 0.65


@pytest.mark.slow
def test_teacher_b_disagrees_with_a_where_only_a_learnt(half: Prepared) -> None:
    assert half.cache_b is not None and half.heldout_b is not None
    same = compare_teachers(half.heldout_cache, half.heldout_cache)
    assert same.top1_agreement == 1 and abs(same.kl_a_b) < 1e-6
    heldout = compare_teachers(half.heldout_cache, half.heldout_b)
    assert heldout.top1_agreement < 0.9 and heldout.kl_a_b > 0.01
    assert math.isfinite(heldout.nll_b) and heldout.nll_a == pytest.approx(same.nll_a)
    seen = len(sequences(half.root / "teacher-b" / "token-cache")[0]) - 1
    first = compare_teachers(half.cache, half.cache_b, (0, seen))
    second = compare_teachers(half.cache, half.cache_b, (seen + 1, 1 << 30))
    assert second.nll_b > second.nll_a + 0.2  # the half only A was trained on
    assert first.top1_agreement > second.top1_agreement
    with pytest.raises(ConfigError, match="different sequences|same data"):
        compare_teachers(half.heldout_cache, half.cache)


@pytest.mark.slow
def test_finished_stages_are_skipped_and_the_choice_is_kept(
        half: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished teacher was trained again")

    monkeypatch.setattr("kdpipe.trainer.train.train", no_training)
    tiny, clock = get_preset("tiny"), StageClock(half.root)
    assert prepare(tiny, half.root, clock, device="cpu", progress=False,
                   second_teacher="half") == half
    assert clock.fresh == set()  # every stage, the caches' too, found its output done
    only_a = prepare(tiny, half.root, device="cpu", progress=False)
    assert only_a.cache_b is None and only_a.cache == half.cache
    with pytest.raises(ConfigError, match="was prepared with --second-teacher half"):
        prepare(tiny, half.root, device="cpu", progress=False, second_teacher="small")


@pytest.mark.slow
def test_demo_with_a_second_teacher(half: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo over the prepared folder, with only the KD arm besides teacher B's students."""
    monkeypatch.setattr("kdpipe.demo.run.demo_arms",
                        lambda preset: ((ArmSpec("kd", {}),), ()))
    table = run_demo(half.root, "tiny", threads=1, device="cpu", progress=False,
                     second_teacher="half")
    rows = {row["arm"]: row for row in table["rows"]}
    assert set(rows) == {"teacher", "teacher-b", "kd", *(arm.name for arm in ARMS_B)}
    for arm, row in rows.items():
        assert math.isfinite(row["eval_ce"]) and 0 < row["eval_top1_agreement"] <= 1, arm
    pair = table["second_teacher"]["heldout_agreement"]
    assert rows["teacher-b"]["eval_top1_agreement"] == pair["top1_agreement"]
    markdown = (half.root / "demo.md").read_text()
    assert "| teacher B (reference) |" in markdown
    assert all(f"| {label} |" in markdown for label in LABELS_B.values())
    runs = half.root / "runs"
    caches = [json.loads((runs / arm / "seed-0" / "config.json").read_text())["cache"]
              for arm in ("kd", "kd-teacher-b", "kd-ab")]
    assert caches == [[str(half.cache)], [str(half.cache_b)], [str(half.cache),
                                                               str(half.cache_b)]]
    assert "--second-teacher half" in markdown
    with pytest.raises(ConfigError, match="--out .* --second-teacher half"):
        run_demo(half.root, "tiny", threads=1, device="cpu", progress=False,
                 second_teacher="small")

