"""`kdpipe experiment`: config checks, a grid of arms × seeds, skipping finished runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kdpipe.experiments.config import load_experiment, parse_experiment
from kdpipe.experiments.runner import RESULTS_NAME, SUMMARY_NAME, run_experiment
from kdpipe.experiments.stats import difference_interval, mean_interval
from kdpipe.schemas.errors import ConfigError


def test_config_converts_values_and_reports_every_problem(tmp_path: Path) -> None:
    exp = parse_experiment({"setup": {"cache": "c"}, "seeds": 3,
                            "train": {"lr": "2e-3", "kd-weight": 1, "max_steps": "5"},
                            "arms": {"a": {"eval_every": 2}}}, "x.yaml")
    assert exp.seeds == (0, 1, 2) and exp.name == "x"
    assert exp.train == {"lr": 0.002, "kd_weight": 1.0, "max_steps": 5}
    inline = parse_experiment({"setup": {"cache": "c"}, "arms": {
        "ce": {"mode": "ce"}, "cl": {"curriculum": {"source": "snapshot", "from_arm": "ce"}}}},
        "y.yaml")
    assert inline.arm("cl").options["curriculum"] == "cl"
    assert inline.curriculum("cl") is not None and inline.curriculum("cl").from_arm == "ce"
    with pytest.raises(ConfigError) as info:
        parse_experiment({"setup": {"embedded": "small", "cache": "c"}, "seeds": [1, 1],
                          "baseline": "nope", "colour": "red",
                          "comparisons": [["a", "ghost"], ["a", "a"], "a - b"],
                          "train": {"lr": "fast", "seed": 3, "bogus": 1},
                          "curricula": {"s": {"source": "teacher", "from_arm": "ghost"}},
                          "arms": {"a": {"curriculum": "missing"}}}, "bad.yaml")
    message = str(info.value)
    for expected in ("unknown key 'colour'", "exactly one of embedded", "distinct integers",
                     "train.lr: expected a number", "train.seed: set by the experiment runner",
                     "train.bogus: unknown option", "baseline 'nope'", "'ghost' is not an arm",
                     "from_arm needs source snapshot or student",
                     "arms.a.curriculum 'missing'",
                     "comparisons [a, ghost]: 'ghost' is not an arm",
                     "comparisons: ['a', 'a'] is not a pair of two different arm names",
                     "comparisons: 'a - b' is not a pair"):
        assert expected in message


def test_misspelled_keys_get_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        parse_experiment({"setup": {"cache": "c", "eval_cach": "e"}, "seed": [0],
                          "train": {"kd-wieght": 1, "threads": 2},
                          "curricula": {"t": {"sorce": "teacher", "from-arm": "a"}},
                          "arms": {"a": {"lamda": 1}}}, "typo.yaml")
    message = str(info.value)
    assert "\n" not in message
    for expected in ("unknown key 'seed' (did you mean 'seeds'?)",
                     "setup.eval_cach: unknown key (did you mean 'eval_cache'?)",
                     "train.kd-wieght: unknown option (did you mean 'kd-weight'?)",
                     "train.threads: set by the experiment runner",
                     "curricula.t.sorce: unknown option (did you mean 'source'?)",
                     "arms.a.lamda: unknown option"):
        assert expected in message, message


def test_grid_runs_every_arm_and_seed(tiny_experiment: tuple[Path, Path]) -> None:
    _, out = tiny_experiment
    records = json.loads((out / RESULTS_NAME).read_text())
    assert sorted((r["arm"], r["seed"]) for r in records) == sorted(
        (arm, seed) for arm in ("ce", "kd", "kd-cl", "kd-cl-sr-student") for seed in (0, 1))
    for r in records:
        assert r["status"] == "ran"
        assert math.isfinite(r["eval_ce"]) and math.isfinite(r["eval_top1_agreement"])
        assert (Path(r["run_dir"]) / "final_metrics.json").is_file()
    # every arm trained on as many sequences; the per-seed curricula came from the `ce` runs
    assert len({r["samples_seen"] for r in records}) == 1
    for seed in (0, 1):
        assert (out / "curricula" / "ce-snapshot" / f"seed-{seed}.parquet").is_file()
        config = json.loads((out / "runs" / "kd-cl-sr-student" / f"seed-{seed}" / "config.json")
                            .read_text())
        curriculum = config["curriculum"]
        assert curriculum["file"].endswith(f"ce-snapshot/seed-{seed}.parquet")
        assert config["seed"] == seed and curriculum["reliance"] == "threshold"


def test_summary_intervals_match_an_independent_computation(
        tiny_experiment: tuple[Path, Path]) -> None:
    _, out = tiny_experiment
    records = json.loads((out / RESULTS_NAME).read_text())
    summary = json.loads((out / SUMMARY_NAME).read_text())
    values = {arm: {r["seed"]: r["eval_ce"] for r in records if r["arm"] == arm}
              for arm in ("kd", "kd-cl")}
    arm = summary["arms"]["kd-cl"]["eval_ce"]
    expected = mean_interval([values["kd-cl"][0], values["kd-cl"][1]])
    assert arm["estimate"] == pytest.approx(expected.estimate)
    # n = 2: half-width = t_{0.975,1} · |x0 − x1| / 2 with t_{0.975,1} = 12.7062
    half = 12.7062 * abs(values["kd-cl"][0] - values["kd-cl"][1]) / 2
    assert (arm["high"] - arm["low"]) / 2 == pytest.approx(half, rel=1e-4)
    diff = summary["differences"]["kd-cl"]["eval_ce"]
    assert diff["method"] == "paired"
    d = [values["kd-cl"][s] - values["kd"][s] for s in (0, 1)]
    assert diff["estimate"] == pytest.approx(sum(d) / 2)
    assert (diff["high"] - diff["low"]) / 2 == pytest.approx(12.7062 * abs(d[0] - d[1]) / 2,
                                                             rel=1e-4)
    assert difference_interval(values["kd-cl"], values["kd"]).estimate == \
        pytest.approx(diff["estimate"])
    assert "kd" not in summary["differences"]  # the baseline itself
    assert "± " in (out / "summary.md").read_text()
    # `comparisons: [[kd-cl-sr-student, kd-cl]]`: A − B paired by seed (summary.json and .md)
    sr = {r["seed"]: r["eval_ce"] for r in records if r["arm"] == "kd-cl-sr-student"}
    (pair,) = summary["comparisons"]
    assert (pair["a"], pair["b"]) == ("kd-cl-sr-student", "kd-cl")
    assert pair["eval_ce"]["method"] == "paired"
    assert pair["eval_ce"]["estimate"] == pytest.approx(
        sum(sr[s] - values["kd-cl"][s] for s in (0, 1)) / 2)
    assert "| kd-cl-sr-student − kd-cl | " in (out / "summary.md").read_text()


def test_rerun_skips_finished_runs(tiny_experiment: tuple[Path, Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config, out = tiny_experiment
    before = {p: p.stat().st_mtime_ns for p in out.rglob("final_metrics.json")}
    walls = {(r["arm"], r["seed"]): r["wall_s"]
             for r in json.loads((out / RESULTS_NAME).read_text())}

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("kdpipe.trainer.train.train", no_training)
    run_experiment(load_experiment(config), threads=1, device="cpu", progress=False)
    records = json.loads((out / RESULTS_NAME).read_text())
    assert {r["status"] for r in records} == {"skipped"}
    assert {(r["arm"], r["seed"]): r["wall_s"] for r in records} == walls  # kept from the run
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final_metrics.json")} == before


def test_changed_settings_stop_the_experiment_before_training(
        tiny_experiment: tuple[Path, Path], tmp_path: Path) -> None:
    config, out = tiny_experiment
    spec = yaml.safe_load(config.read_text())
    spec["train"]["lr"] = 0.01
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="holds a run with other lr"):
        run_experiment(load_experiment(changed), threads=1, device="cpu", progress=False)
