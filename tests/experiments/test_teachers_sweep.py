"""Experiments with several teachers and a capacity-gap sweep: config, planning, statistics,
the report's capacity-gap panel, and experiments/seed-motivations.yaml."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdpipe.experiments.config import load_experiment, parse_experiment
from kdpipe.experiments.plan import Inputs, arm_caches, plan_runs
from kdpipe.experiments.report import render_report
from kdpipe.experiments.stats import adjust_p_values, difference_interval, p_value
from kdpipe.options import flags, option
from kdpipe.schemas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# The train-student options of several teachers (issue 18, items 1 and 2): name -> (type,
# default). Where this kdpipe lacks one, `multi_teacher` stands in a TrainConfig that has it.
SHARED_OPTIONS: dict[str, tuple[Any, Any]] = {
    "teacher_weight": (tuple[float, ...], ()),
    "teacher_reliance": (str, "fixed"),
    "teacher_reliance_level": (str, "sample"),
    "teacher_reliance_temperature": (float, 1.0),
    "teacher_reliance_control": (str, "none"),
}


@pytest.fixture
def multi_teacher(monkeypatch: pytest.MonkeyPatch) -> type:
    """TrainConfig with --cache / --eval-cache lists and the options above: the real one when
    it has them all, else a subclass declaring the missing ones."""
    from kdpipe.trainer.config import TrainConfig

    declared = {f.name: f for f in flags(TrainConfig)}
    missing = [(name, hint, option(default, "(stand-in)"))
               for name, (hint, default) in SHARED_OPTIONS.items() if name not in declared]
    one_cache = typing.get_origin(declared["cache"].hint) is not tuple
    if one_cache:
        missing += [("cache", tuple[str, ...], option(help="(stand-in)")),
                    ("eval_cache", tuple[str, ...], option((), "(stand-in)"))]
    if not missing:
        return TrainConfig
    namespace = {"with_cache_defaults": lambda self: self} if one_cache else {}
    stand_in = dataclasses.make_dataclass("SharedTrainConfig", missing, bases=(TrainConfig,),
                                          frozen=True, namespace=namespace)
    monkeypatch.setattr("kdpipe.trainer.config.TrainConfig", stand_in)
    return stand_in


STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "setup": {"caches": {"a": "/fake/a", "b": "/fake/b"},
                  "eval_caches": {"a": "/fake/ha", "b": "/fake/hb"}},
        "seeds": 2, "train": {"student_config": STUDENT, "epochs": 1},
        "arms": {"a-alone": {}, "b-alone": {"teachers": ["b"]},
                 "mix": {"teachers": ["b", "a"], "teacher_weight": [0.25, 0.75]}},
        "sweep": {"sizes": {"xs": {**STUDENT, "hidden_size": 8},
                            "s": {**STUDENT, "hidden_size": 32}},
                  "arms": {"ce": {"mode": "ce"}, "kd": {}, "kd-b": {"teachers": ["b"]}},
                  "comparisons": [["kd", "ce"]]},
        "comparisons": [["mix", "a-alone"]],
        "correction": "holm",
    }
    spec.update(overrides)
    return spec


def _problems(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(spec, "bad.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix("invalid experiment bad.yaml: ").split("; ")


def test_teachers_by_name_and_the_sweep_expanded(multi_teacher: type) -> None:
    exp = parse_experiment(_spec(), "x.yaml")
    assert exp.setup.teachers() == ("a", "b")
    assert [a.name for a in exp.arms] == ["a-alone", "b-alone", "mix", "ce-xs", "ce-s",
                                          "kd-xs", "kd-s", "kd-b-xs", "kd-b-s"]
    assert [exp.arm_teachers(a) for a in exp.arms[:3]] == [("a",), ("b",), ("b", "a")]
    assert exp.arm("mix").options["teacher_weight"] == (0.25, 0.75)
    kd_b = exp.arm("kd-b-xs")
    assert (kd_b.family, kd_b.size, kd_b.teachers) == ("kd-b", "xs", ("b",))
    assert kd_b.options["student_config"]["hidden_size"] == 8
    assert exp.arm("ce-s").options == {"mode": "ce", "student_config": {**STUDENT,
                                                                         "hidden_size": 32}}
    assert exp.sweep is not None and exp.sweep.sizes == ("xs", "s")
    assert exp.sweep.families == ("ce", "kd", "kd-b")
    # the file's comparisons, then each sweep comparison at every size
    assert exp.comparisons == (("mix", "a-alone"), ("kd-xs", "ce-xs"), ("kd-s", "ce-s"))
    assert exp.correction == "holm"
    embedded = parse_experiment({"setup": {"embedded": "tiny", "second_teacher": "half"},
                                 "arms": {"kd": {"teachers": ["a", "b"]}}}, "e.yaml")
    assert embedded.setup.teachers() == ("a", "b")
    single = parse_experiment({"setup": {"cache": "/c", "eval_cache": "/e"}, "arms": {"kd": {}}},
                              "s.yaml")
    assert single.setup.teachers() == ("a",) and single.arm_teachers(single.arms[0]) == ("a",)
    assert single.setup.teacher_caches() == {"a": "/c"}
    assert single.setup.teacher_eval_caches() == {"a": "/e"}


def test_teacher_names_and_weights_are_refused_one_line_each(multi_teacher: type) -> None:
    problems = _problems(_spec(comparisons=[], arms={
        "ghost": {"teachers": ["a", "c"]},
        "twice": {"teachers": ["a", "a"]},
        "counts": {"teachers": ["a", "b"], "teacher_weight": [1, 2, 3]},
        "default": {"teacher_weight": [0.5, 0.5]},
        "shape": {"teachers": "a"},
        "none": {"teachers": []}}))
    assert problems == [
        "arms.shape.teachers: expected a list of teacher names, e.g. [a, b]",
        "arms.none.teachers: at least one teacher is needed, e.g. [a] (leave teachers out for "
        "the setup's first teacher)",
        "arms.ghost.teachers: 'c' is not a teacher of the setup (a, b)",
        "arms.twice.teachers: a teacher is named twice",
        "arms.counts.teacher_weight: 3 weight(s) for 2 teacher(s) (a, b): give one per teacher, "
        "in the order of teachers",
        "arms.default.teacher_weight: 2 weight(s) for 1 teacher(s) (a): give one per teacher, "
        "in the order of teachers"]
    # a sweep family's problem is reported once, not once per size
    sweep = _spec()
    sweep["sweep"]["arms"]["kd-c"] = {"teachers": ["c"]}
    assert _problems(sweep) == [
        "sweep.arms.kd-c.teachers: 'c' is not a teacher of the setup (a, b)"]


def test_setup_problems(multi_teacher: type) -> None:
    cases = {
        "exactly one of embedded": {"cache": "/c", "caches": {"a": "/c"}},
        "setup.second_teacher comes with setup.embedded": {"cache": "/c",
                                                           "second_teacher": "half"},
        "setup.second_teacher 'twin' is not one of half, small": {"embedded": "tiny",
                                                                   "second_teacher": "twin"},
        "setup.eval_caches names teachers a but setup.caches a, b": {
            "caches": {"a": "/a", "b": "/b"}, "eval_caches": {"a": "/ha"}},
        "setup.eval_cache comes with setup.cache (setup.caches takes setup.eval_caches": {
            "caches": {"a": "/a"}, "eval_cache": "/h"},
        "setup.caches must map teacher names to cache folders": {"caches": ["/a", "/b"]},
    }
    for expected, setup in cases.items():
        message = " ".join(_problems({"setup": setup, "arms": {"kd": {}}}))
        assert expected in message, (expected, message)


def test_held_out_caches_are_matched_by_name(multi_teacher: type) -> None:
    spec = _spec()
    spec["setup"]["eval_caches"] = {"b": "/fake/hb", "a": "/fake/ha"}
    exp = parse_experiment(spec, "x.yaml")
    assert exp.setup.teacher_eval_caches() == {"a": "/fake/ha", "b": "/fake/hb"}
    inputs = Inputs(cache="/fake/a", eval_cache="/fake/ha",
                    caches=exp.setup.teacher_caches(), eval_caches=exp.setup.teacher_eval_caches())
    assert arm_caches(exp, inputs, exp.arm("mix")) == (("/fake/b", "/fake/a"),
                                                       ("/fake/hb", "/fake/ha"))


def test_an_unknown_sweep_family_is_reported_once(multi_teacher: type) -> None:
    spec = _spec(comparisons=[])
    spec["sweep"]["comparisons"] = [["ce", "ghost"]]
    assert _problems(spec) == [
        "sweep.comparisons [ce, ghost]: 'ghost' is not a family under sweep.arms (ce, kd, kd-b)"]


def test_sweep_problems(multi_teacher: type) -> None:
    spec = _spec(correction="sidak")
    spec["arms"]["kd-s"] = {}
    spec["sweep"]["arms"]["student"] = {"student_config": STUDENT}
    spec["sweep"]["comparisons"] = [["kd", "ghost"]]
    spec["sweep"]["size"] = 1
    problems = " ".join(_problems(spec))
    for expected in ("sweep.size: unknown key (did you mean 'sizes'?",
                     "sweep: arm kd-s (family kd, size s) is also under arms",
                     "sweep.arms.student: the student is the size's",
                     "sweep.comparisons [kd, ghost]: 'ghost' is not a family under sweep.arms",
                     "correction 'sidak'"):
        assert expected in problems, expected
    one = _spec()
    one["sweep"]["sizes"] = {"xs": STUDENT}
    assert "sweep.sizes must map at least two size names" in " ".join(_problems(one))


def test_planning_gives_each_arm_its_teachers_caches(
        multi_teacher: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kdpipe.experiments.plan.default_shuffle_window", lambda cache: None)
    exp = parse_experiment(_spec(), "x.yaml")
    inputs = Inputs(cache="/fake/a", eval_cache="/fake/ha",
                    caches={"a": "/fake/a", "b": "/fake/b"},
                    eval_caches={"a": "/fake/ha", "b": "/fake/hb"})
    runs = plan_runs(exp, inputs, tmp_path, "cpu", False)
    assert len(runs) == len(exp.arms) * 2
    by_arm = {r.arm: r.config for r in runs if r.seed == 1}
    assert by_arm["a-alone"].cache == ("/fake/a",)
    assert by_arm["a-alone"].eval_cache == ("/fake/ha",)
    assert by_arm["b-alone"].cache == ("/fake/b",)
    assert by_arm["mix"].cache == ("/fake/b", "/fake/a")
    assert by_arm["mix"].eval_cache == ("/fake/hb", "/fake/ha")
    assert by_arm["kd-b-s"].cache == ("/fake/b",) and by_arm["ce-xs"].cache == ("/fake/a",)
    assert by_arm["mix"].out == str(tmp_path / "runs" / "mix" / "seed-1")
    # each size's student is its own file, named after the arm
    for arm, width in (("kd-xs", 8), ("kd-s", 32)):
        written = json.loads(Path(by_arm[arm].student_config).read_text())
        assert Path(by_arm[arm].student_config).name == f"{arm}.json"
        assert written["hidden_size"] == width
    # no held-out caches: no --eval-cache; a teacher the inputs lack: one line
    bare = Inputs(cache="/fake/a", eval_cache=None, caches={"a": "/fake/a", "b": "/fake/b"})
    assert arm_caches(exp, bare, exp.arm("mix")) == (("/fake/b", "/fake/a"), None)
    with pytest.raises(ConfigError, match="arm b-alone: no cache for teacher.s. b"):
        arm_caches(exp, Inputs(cache="/fake/a", eval_cache=None), exp.arm("b-alone"))


def test_p_values_and_their_corrections() -> None:
    from scipy import stats

    arm = {0: 5.1, 1: 5.3, 2: 5.0, 3: 5.25, 4: 5.2}
    base = {0: 5.2, 1: 5.35, 2: 5.2, 3: 5.3, 4: 5.22}
    paired = difference_interval(arm, base)
    assert p_value(paired) == pytest.approx(
        stats.ttest_rel(list(arm.values()), list(base.values())).pvalue, rel=1e-9)
    welch = difference_interval(arm, {5: 5.2, 6: 5.4, 7: 5.3})
    assert p_value(welch) == pytest.approx(stats.ttest_ind(
        list(arm.values()), [5.2, 5.4, 5.3], equal_var=False).pvalue, rel=1e-9)
    # p < 0.05 exactly when the 95% interval excludes 0
    assert (p_value(paired) < 0.05) == paired.excludes_zero()
    assert math.isnan(p_value(difference_interval({0: 1.0}, {0: 2.0})))
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    holm = adjust_p_values(p, "holm")  # m = 4: 0.005·4, 0.01·3, 0.03·2, max(0.04·1, 0.06)
    assert holm[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(holm[4])
    assert adjust_p_values(p, "bonferroni")[:4] == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust_p_values(p, "none")[:4] == p[:4]
    with pytest.raises(ValueError, match="correction 'sidak'"):
        adjust_p_values(p, "sidak")


def _synthetic_experiment(root: Path) -> None:
    """experiment.json and results.json of a sweep (ce, kd × xs, s, m) and 5 seeds, no runs:
    held-out CE falls with size, KD's gain grows with it."""
    sizes = {"xs": 10_000, "s": 40_000, "m": 160_000}
    arms = [{"name": f"{f}-{s}", "family": f, "size": s, "options": {}, "teachers": []}
            for f in ("ce", "kd") for s in sizes]
    records = []
    for i, (size, params) in enumerate(sizes.items()):
        for seed in range(5):
            noise = 0.01 * ((seed * 7) % 5 - 2)
            for family, gain, own in (("ce", 0.0, 0.0), ("kd", 0.02 * (i + 1), 0.004)):
                records.append({"arm": f"{family}-{size}", "seed": seed, "status": "ran",
                                "run_dir": str(root / "runs" / f"{family}-{size}"),
                                "eval_ce": 5.5 - 0.2 * i - gain + noise + own * (seed % 2),
                                "student_parameters": params})
    sweep = {"sizes": list(sizes), "families": ["ce", "kd"], "comparisons": [["kd", "ce"]]}
    comparisons = [[f"kd-{s}", f"ce-{s}"] for s in sizes]
    (root / "experiment.json").write_text(json.dumps({
        "name": "gap", "arms": arms, "seeds": list(range(5)), "baseline": None,
        "metric": "eval_ce", "comparisons": comparisons, "correction": "holm",
        "sweep": sweep, "inputs": {"cache": "/c/a", "caches": {"a": "/c/a", "b": "/c/b"}}}))
    (root / "results.json").write_text(json.dumps(records))


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed (kdpipe[report])")
def test_capacity_gap_panel_from_a_synthetic_results_table(tmp_path: Path) -> None:
    _synthetic_experiment(tmp_path)
    text = render_report(tmp_path, plots=True, out=tmp_path / "report").read_text()
    png = tmp_path / "report" / "capacity_gap.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "## Capacity gap: student size" in text and "(capacity_gap.png)" in text
    assert "| kd | m | 160,000 |" in text and "| kd − ce | xs | 10,000 |" in text
    assert "p (holm)" in text and "Holm's step-down method over the 3" in text


def test_capacity_gap_table_without_matplotlib(tmp_path: Path) -> None:
    _synthetic_experiment(tmp_path)
    text = render_report(tmp_path, plots=False, out=tmp_path / "md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| kd − ce | m |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # KD's gain at the largest size: −0.06, and 0.004 on seeds 1 and 3
    assert float(cells[3]) == pytest.approx(-0.06 + 0.004 * 2 / 5, abs=1e-4)
    assert cells[5] == "5"
    assert "teachers' caches: a `/c/a`, b `/c/b`" in text
    assert not list((tmp_path / "md").glob("*.png"))


def test_seed_motivations_yaml(multi_teacher: type) -> None:
    """The experiment answering issue 18's two questions loads and has what it promises."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = REPO / "experiments" / "seed-motivations.yaml"
    exp = load_experiment(path)
    assert exp.setup.embedded == "small" and exp.setup.second_teacher == "half"
    assert len(exp.seeds) >= 5 and exp.correction == "holm" and exp.sweep is not None
    assert set(exp.sweep.families) == {"ce", "kd", "kd-sr-sample", "kd-sr-token",
                                       "sr-token-matched"}
    raw = yaml.safe_load(path.read_text())
    weights = []
    for size in exp.sweep.sizes:
        spec = dict(raw["sweep"]["sizes"][size])
        spec.pop("model_type")
        with torch.device("meta"):
            weights.append(sum(p.numel() for p in LlamaForCausalLM(
                LlamaConfig(vocab_size=2048, **spec)).parameters()))
    assert len(weights) == 3 and max(weights) / min(weights) >= 8
    assert weights == [77_408, 228_672, 651_904]  # as the file's comments say
    teachers = {a.name: exp.arm_teachers(a) for a in exp.arms if a.family is None}
    assert teachers == {"b-alone": ("b",), "mix": ("a", "b"), "reliance": ("a", "b"),
                        "reliance-shuffled": ("a", "b"), "reliance-matched": ("a", "b")}
    assert all(exp.arm_teachers(a) == ("a",) for a in exp.arms if a.family is not None)
    assert exp.arm("reliance-matched").options["teacher_reliance_control"] == "matched"
    assert len(exp.comparisons) == 14
    for a, b in exp.comparisons:  # every comparison is paired: same seeds on both sides
        assert exp.arm(a) and exp.arm(b)
    # (b)'s teacher-A arm is the sweep's kd at the preset's student size
    assert ("b-alone", "kd-h64") in exp.comparisons


def test_each_curriculum_is_built_on_its_arms_first_teachers_cache(
        multi_teacher: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A curriculum is ranked on one cache and the trainer takes it only for that first
    cache: an arm whose first teacher is b gets the build on b's cache (NAME@b)."""
    from kdpipe.embedded.timing import StageClock
    from kdpipe.experiments.plan import build_curricula

    monkeypatch.setattr("kdpipe.experiments.plan.default_shuffle_window", lambda cache: None)
    built: list[tuple[str, str, str | None]] = []
    monkeypatch.setattr("kdpipe.curriculum.build.build_curriculum", lambda cfg: built.append(
        (Path(cfg.out).relative_to(tmp_path).as_posix(), cfg.cache, cfg.run)))
    exp = parse_experiment(_spec(
        comparisons=[], sweep=None,
        curricula={"tn": {"source": "teacher", "metric": "nll"},
                   "snap": {"source": "snapshot", "from_arm": "b-alone"}},
        arms={"kd": {}, "b-alone": {"teachers": ["b"]},
              "y": {"teachers": ["b"], "curriculum": "tn"},
              "z": {"teachers": ["b", "a"], "curriculum": "tn"},
              "w": {"curriculum": "tn"},
              "x": {"teachers": ["b"], "curriculum": "snap"}}), "x.yaml")
    inputs = Inputs(cache="/fake/a", eval_cache="/fake/ha",
                    caches={"a": "/fake/a", "b": "/fake/b"},
                    eval_caches={"a": "/fake/ha", "b": "/fake/hb"})
    runs = {r.arm: r.config for r in plan_runs(exp, inputs, tmp_path, "cpu", False)
            if r.seed == 0}
    curricula = tmp_path / "curricula"
    assert runs["y"].curriculum.file == str(curricula / "tn@b.parquet")
    assert runs["z"].curriculum.file == str(curricula / "tn@b.parquet")
    assert runs["w"].curriculum.file == str(curricula / "tn.parquet")
    assert runs["x"].curriculum.file == str(curricula / "snap@b" / "seed-0.parquet")
    clock = StageClock(tmp_path)
    build_curricula(exp, inputs, tmp_path, clock, None, "cpu", False)
    assert built == [("curricula/tn@b.parquet", "/fake/b", None),
                     ("curricula/tn.parquet", "/fake/a", None)]
    built.clear()
    build_curricula(exp, inputs, tmp_path, clock, (0,), "cpu", False)
    assert built == [("curricula/snap@b/seed-0.parquet", "/fake/b",
                      str(tmp_path / "runs" / "b-alone" / "seed-0"))]


def test_a_snapshot_curriculum_of_another_first_teacher_is_refused(multi_teacher: type) -> None:
    spec = _spec(comparisons=[], sweep=None,
                 curricula={"snap": {"source": "snapshot", "from_arm": "b-alone"}},
                 arms={"b-alone": {"teachers": ["b"]}, "x": {"curriculum": "snap"},
                       "ok": {"teachers": ["b", "a"], "curriculum": "snap"}})
    assert _problems(spec) == [
        "arms.x.curriculum snap: ranks the snapshots of arm b-alone, made on teacher b's cache, "
        "but this arm's first teacher is a: give both arms the same first teacher (a curriculum "
        "follows the first teacher's cache)"]


def test_teachers_that_do_not_align_stop_the_experiment_before_anything_trains(
        tmp_path: Path, exp_caches: tuple[Path, Path]) -> None:
    """The held-out cache holds other sequences than the train cache: as teachers a and b
    of one arm they cannot train together, and the experiment says so before any run."""
    from kdpipe.experiments.plan import check_teachers_aligned
    from kdpipe.experiments.runner import run_experiment

    train, heldout = map(str, exp_caches)
    spec = {"out": str(tmp_path / "out"), "setup": {"caches": {"a": train, "b": heldout}},
            "train": {"student_config": STUDENT, "max_steps": 1, "device": "cpu"},
            "arms": {"kd": {}, "b-alone": {"teachers": ["b"]}, "mix": {"teachers": ["a", "b"]},
                     "mix2": {"teachers": ["a", "b"], "teacher_weight": [0.7, 0.3]}}}
    exp = parse_experiment(spec, "x.yaml")
    with pytest.raises(ConfigError) as info:
        run_experiment(exp, threads=1, device="cpu", progress=False)
    message = str(info.value)
    assert message.startswith(f"experiment cannot start: arms mix, mix2 (teachers a, b): "
                              f"teacher b's train cache {heldout} does not cover the same "
                              f"sequences as teacher a's train cache {train}: ")
    assert "\n" not in message
    assert not (tmp_path / "out" / "runs").exists()
    # the same cache under two names aligns; one teacher per arm needs no check
    same = parse_experiment({**spec, "setup": {"caches": {"a": train, "b": train}}}, "y.yaml")
    inputs = Inputs(cache=train, eval_cache=None, caches={"a": train, "b": train})
    check_teachers_aligned(same, inputs)
    alone = parse_experiment({**spec, "arms": {"kd": {}, "b": {"teachers": ["b"]}}}, "z.yaml")
    check_teachers_aligned(alone, Inputs(cache=train, eval_cache=None,
                                         caches={"a": train, "b": heldout}))


def test_the_summary_names_each_arms_teacher_and_keeps_per_teacher_metrics(
        multi_teacher: type, tmp_path: Path) -> None:
    """b-alone's agreement is with b, the others' with a: the tables say so, and results.json
    keeps every eval_* metric of a run (KL to each teacher of a mix)."""
    from types import SimpleNamespace

    from kdpipe.experiments.plan import PlannedRun
    from kdpipe.experiments.runner import run_record, write_summary

    exp = parse_experiment(_spec(sweep=None, comparisons=[], seeds=1), "x.yaml")
    metrics = {"eval_ce": 5.0, "eval_top1_agreement": 0.3, "eval_kd": 0.5,
               "eval_kd_teacher_1": 0.4, "eval_kd_teacher_2": 0.7, "train_loss": 5.1, "step": 3}
    records = [run_record(PlannedRun(arm.name, 0, SimpleNamespace(out=str(tmp_path / arm.name))),
                          "ran", metrics, 1.0, 1.0) for arm in exp.arms]
    assert records[2]["eval_kd_teacher_2"] == 0.7 and records[2]["step"] == 3
    write_summary(exp, records, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    note = ("Top-1 agreement is with each arm's first teacher: teacher a for a-alone; teacher b "
            "for b-alone, mix.")
    assert "top-1 agreement with the (first) teacher" in text and note in text
    record = {**exp.to_json_dict(), "inputs": {}, "labels": {}}
    (tmp_path / "experiment.json").write_text(json.dumps(record))
    (tmp_path / "results.json").write_text(json.dumps(records))
    report = render_report(tmp_path, plots=False, out=tmp_path / "report").read_text()
    assert note in report
    # one teacher for every arm: no note
    single = parse_experiment({"setup": {"cache": "/c"}, "arms": {"kd": {}, "ce": {"mode": "ce"}},
                               "train": {"student_config": STUDENT}}, "s.yaml")
    write_summary(single, records[:1], tmp_path)
    assert "first teacher:" not in (tmp_path / "summary.md").read_text()
