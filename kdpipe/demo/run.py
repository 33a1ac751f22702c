"""`kdpipe demo`: the whole pipeline on the standard library's source, with a comparison table.

prepare (corpus → tokenizer → teacher → caches, `prepare.py`) → a teacher curriculum
(`build-curriculum --source teacher`) → the CE-only student, whose per-sample losses give the
student curriculum (`--source snapshot`) → students KD, KD-CL (teacher curriculum), KD-CL
(student curriculum), KD-CL-SR → OUT/demo.md and OUT/demo.json: held-out perplexity, top-1
agreement with the teacher, train tokens/s and wall time per stage.

A chat preset (`--preset chat`) prepares conversations cached with assistant-only targets and
trains only the CE-only and KD students (`CHAT_ARMS`): the question there is whether the
teacher helps on the assistant's replies; its held-out numbers count assistant tokens only.

With `--second-teacher half|small` the setup also makes a teacher B (`embedded/second_teacher.py`)
cached over the same sequences, and two more students with the `kd` arm's options: KD from
teacher B alone, and from teachers A and B with equal weights (`ARMS_B`). The table gains
rows for teacher B and those students, and how much the two teachers disagree on the held-out
split (`embedded/teacher_agreement.py`). Top-1 agreement is with teacher A, except for the
student of B alone (evaluated on B's held-out cache, so with B).

The students are one `kdpipe experiment` (one seed) run by the same runner, so
`kdpipe report OUT` draws the plots. One seed measures nothing about which arm is better; the
table says so, and `experiments/seed-question.yaml` asks the question with seeds and intervals.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from kdpipe.embedded.prepare import PRESET_NAME, TEACHER_B, Prepared, check_preset, prepare
from kdpipe.embedded.presets import Preset, get_preset
from kdpipe.embedded.second_teacher import RECORD_NAME as SECOND_RECORD
from kdpipe.embedded.second_teacher import SecondTeacher, second_teacher_spec
from kdpipe.embedded.teacher_agreement import compare_teachers
from kdpipe.embedded.timing import StageClock
from kdpipe.experiments.config import ArmSpec, CurriculumSpec, ExperimentConfig, Setup
from kdpipe.experiments.runner import Inputs, run_experiment
from kdpipe.progress import bars_shown, library_bars
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json, atomic_write_text
from kdpipe.torch_runtime import resolve_threads, torch_threads

log = logging.getLogger(__name__)

TABLE_MD, TABLE_JSON = "demo.md", "demo.json"
ARM_LABELS = {"ce": "CE only", "kd": "KD", "kd-cl": "KD-CL (teacher curriculum)",
              "kd-cl-student": "KD-CL (student curriculum)",
              "kd-cl-sr-student": "KD-CL-SR (student curriculum)"}

CURRICULA = (CurriculumSpec("teacher-nll", {"source": "teacher", "metric": "nll"}),
             CurriculumSpec("ce-snapshot", {"source": "snapshot", "metric": "nll"},
                            from_arm="ce"))
ARMS = (ArmSpec("ce", {"mode": "ce"}),
        ArmSpec("kd", {}),
        ArmSpec("kd-cl", {"curriculum": "teacher-nll"}),
        ArmSpec("kd-cl-student", {"curriculum": "ce-snapshot"}),
        # Not experiments/seed-question.yaml's `kd-cl-sr`, which follows the teacher's ranking.
        ArmSpec("kd-cl-sr-student", {"curriculum": "ce-snapshot", "reliance": "threshold"}))
CHAT_ARMS = ARMS[:2]
TEACHERS = ("a", "b")  # the experiment's names of teachers A and B
ARMS_B = (ArmSpec("kd-teacher-b", {}, teachers=("b",)), ArmSpec("kd-ab", {}, teachers=TEACHERS))
LABELS_B = {"kd-teacher-b": "KD from teacher B", "kd-ab": "KD from teachers A and B"}


def demo_arms(preset: Preset) -> tuple[tuple[ArmSpec, ...], tuple[CurriculumSpec, ...]]:
    """The students of a preset and the curricula they need."""
    return (CHAT_ARMS, ()) if preset.corpus == "chat" else (ARMS, CURRICULA)


def _train_options(preset: Preset, prepared: Prepared) -> dict[str, Any]:
    """Options every demo student shares: one seed, the same token budget for every arm."""
    from kdpipe.schemas.cache import open_cache

    sequences = open_cache(prepared.cache).manifest.num_sequences
    steps = preset.student_epochs * -(-sequences // preset.student_batch_size)
    return {"epochs": preset.student_epochs, "batch_size": preset.student_batch_size,
            "lr": preset.student_lr, "warmup_steps": max(1, steps // 20),
            "eval_every": max(1, steps // preset.evals_per_run), "log_every": 5,
            "student_config": str(prepared.student_config)}


def demo_caches(prepared: Prepared) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) caches by teacher name: A's, and B's when prepared."""
    a, b = TEACHERS
    caches, held = {a: str(prepared.cache)}, {a: str(prepared.heldout_cache)}
    if prepared.cache_b is not None and prepared.heldout_b is not None:
        caches[b], held[b] = str(prepared.cache_b), str(prepared.heldout_b)
    return caches, held


def demo_experiment(preset: Preset, out: Path, prepared: Prepared) -> ExperimentConfig:
    """The demo's students as an experiment: one seed, the same token budget for every arm;
    with a teacher B, its students too (`ARMS_B`)."""
    arms, curricula = demo_arms(preset)
    setup = Setup(cache=str(prepared.cache), eval_cache=str(prepared.heldout_cache))
    if prepared.cache_b is not None:
        caches, held = demo_caches(prepared)
        setup, arms = Setup(caches=tuple(caches.items()), eval_caches=tuple(held.items())), \
            arms + ARMS_B
    return ExperimentConfig(name=f"demo-{preset.name}", out=str(out), setup=setup,
                            seeds=(0,), arms=arms, curricula=curricula,
                            train=_train_options(preset, prepared), baseline="kd",
                            metric="eval_ce", description=f"kdpipe demo --preset {preset.name}")


def _check_out(out: Path, preset: Preset, overwrite: bool, second: SecondTeacher | None
               ) -> None:
    """One demo per folder: a different preset or second teacher into an existing demo is
    refused, and so is none into a demo with a teacher B."""
    recorded = out / PRESET_NAME
    if overwrite and out.exists():
        if not recorded.is_file():
            raise ConfigError(f"--overwrite: {out} is not a kdpipe demo folder (no "
                              f"{PRESET_NAME}); refusing to delete it")
        shutil.rmtree(out)
    if out.is_dir() and any(out.iterdir()) and not recorded.is_file():
        raise ConfigError(f"--out {out} exists and is not a kdpipe demo folder; choose a new "
                          "or empty folder")
    try:
        check_preset(out, preset, second)
    except ConfigError as exc:
        raise ConfigError(f"--out {exc}; or pass --overwrite to replace it") from exc
    record = out / SECOND_RECORD
    if second is None and record.is_file():  # its runs, and so its table, hold B's students
        choice = json.loads(record.read_text(encoding="utf-8")).get("choice")
        raise ConfigError(f"--out {out} was prepared with --second-teacher {choice}; pass "
                          f"--second-teacher {choice} to re-run it, or choose another folder, "
                          "or pass --overwrite to replace it")


def teacher_row(prepared: Prepared) -> dict[str, Any]:
    """The teacher's own held-out perplexity (from the held-out cache's target log-probs)."""
    from kdpipe.schemas.cache import open_cache, summarize

    nll = float(summarize(open_cache(prepared.heldout_cache))["teacher_nll"])  # type: ignore[arg-type]
    return {"arm": "teacher", "eval_ce": nll, "eval_ppl": math.exp(nll),
            "eval_top1_agreement": 1.0}


def _num(value: Any, digits: int = 2) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def demo_table(preset: Preset, prepared: Prepared, out: Path, clock: StageClock,
               threads: int, second: SecondTeacher | None = None) -> dict[str, Any]:
    """OUT/demo.md + OUT/demo.json from the results; returns the JSON object."""
    from kdpipe.experiments.runner import RESULTS_NAME
    from kdpipe.schemas.cache import open_cache

    records = json.loads((out / RESULTS_NAME).read_text(encoding="utf-8"))
    teachers = [teacher_row(prepared)]
    pair: dict[str, Any] | None = None
    if second is not None:
        assert prepared.heldout_b is not None
        pair = asdict(compare_teachers(prepared.heldout_cache, prepared.heldout_b))
        teachers.append({"arm": "teacher-b", "eval_ce": pair["nll_b"],
                         "eval_ppl": math.exp(pair["nll_b"]),
                         "eval_top1_agreement": pair["top1_agreement"]})
    vocab = open_cache(prepared.cache).manifest.vocab_size
    rows = teachers + [
        {"arm": r["arm"], **{k: r.get(k) for k in ("eval_ce", "eval_ppl", "eval_top1_agreement",
                                                   "train_tokens_per_s", "wall_s", "cpu_s",
                                                   "tokens_seen")}} for r in records]
    stages = dict(clock.records)
    params = {"teacher": preset.teacher.parameters(vocab),
              "student": preset.student.parameters(vocab)}
    chat = preset.corpus == "chat"
    targets = " target" if chat else ""
    lines = [f"# kdpipe demo (--preset {preset.name})", "",
             f"Teacher {params['teacher'] / 1e6:.2f}M parameters, students "
             f"{params['student'] / 1e6:.2f}M, vocabulary {vocab}, top-{preset.top_k} cache, "
             f"{threads} torch thread(s). Every student trained on as many sequences: "
             f"{preset.student_epochs} epoch(s) of the train split, about "
             f"{_num(rows[len(teachers)].get('tokens_seen'), 0)}{targets} tokens.", ""]
    if second is not None and pair is not None:
        data = ("the leading half of the train split" if second.train_share < 1 else
                "all of the train split")
        lines += [f"Teacher B (`--second-teacher {second.choice}`): "
                  f"{second.shape.parameters(vocab) / 1e6:.2f}M parameters, trained on {data}, "
                  "cached over the same sequences as teacher A. On the held-out split the two "
                  f"agree on the top-1 token at {pair['top1_agreement']:.3f} of positions, "
                  f"KL(A‖B) {pair['kl_a_b']:.3f} nats/token (A's top-k + tail). Top-1 "
                  "agreement below is with teacher A, except for the student of B alone (with "
                  "B).", ""]
    if chat:
        lines += ["Chat data: questions about the standard library answered by its docstrings, "
                  "cached with assistant-only targets. Students train on, and held-out "
                  "numbers count, the assistant's reply tokens only (CE in nats/token).", ""]
    lines += ["| model | held-out CE | held-out ppl | top-1 agreement | train tokens/s | wall s "
              "| CPU s |", "|---|---|---|---|---|---|---|"]
    teacher_time = stages.get("teacher training", {})
    for row in rows:
        label = {"teacher": "teacher (reference)", "teacher-b": "teacher B (reference)",
                 **LABELS_B}.get(row["arm"]) or ARM_LABELS.get(row["arm"], row["arm"])
        own = {"teacher": teacher_time, "teacher-b": stages.get("teacher B training", {})}.get(
            row["arm"], row)
        wall, cpu = own.get("wall_s"), own.get("cpu_s")
        lines.append(f"| {label} | {_num(row.get('eval_ce'), 3)} | {_num(row.get('eval_ppl'))} | "
                     f"{_num(row.get('eval_top1_agreement'), 3)} | "
                     f"{_num(row.get('train_tokens_per_s'), 0)} | {_num(wall, 1)} | "
                     f"{_num(cpu, 1)} |")
    question = (f"an experiment with `setup: {{embedded: {preset.name}}}` and several seeds "
                "asks the question with confidence intervals" if chat else
                "`kdpipe experiment experiments/seed-question.yaml` runs the arms with several "
                "seeds, controls and confidence intervals")
    lines += ["", f"One seed: differences between the students are not evidence either way; "
              f"{question}.", "",
              "| stage | wall s | CPU s |", "|---|---|---|"]
    total = 0.0
    for name, t in stages.items():
        total += t["wall_s"]
        lines.append(f"| {name} | {_num(t['wall_s'], 1)} | {_num(t.get('cpu_s'), 1)} |")
    for r in records:
        if isinstance(r.get("wall_s"), (int, float)):
            total += r["wall_s"]
            lines.append(f"| student {r['arm']} | {_num(r['wall_s'], 1)} | "
                         f"{_num(r.get('cpu_s'), 1)} |")
    folders = "corpus/, tokenizer/, teacher-run/, cache/, heldout-cache/, " + \
        ("runs/" if chat else "curricula/, runs/") + \
        ("" if second is None else f", {TEACHER_B}/")
    lines += [f"| **total** | {_num(total, 1)} | |", "",
              f"Artifacts: `{out}` ({folders}). Plots: `kdpipe report {out}`.", ""]
    table = {"preset": asdict(preset), "threads": threads, "rows": rows, "stages": stages,
             "total_wall_s": total}
    if second is not None:
        table["second_teacher"] = {**asdict(second), "heldout_agreement": pair}
    atomic_write_json(out / TABLE_JSON, table)
    atomic_write_text(out / TABLE_MD, "\n".join(lines))
    return table


def run_demo(out: Path, preset_name: str = "small", threads: int | None = None,
             device: str = "auto", progress: bool = True, overwrite: bool = False,
             second_teacher: str | None = None) -> dict[str, Any]:
    """Everything `kdpipe demo` does; returns the table (also OUT/demo.json and demo.md).
    `second_teacher` ("half" or "small"): teacher B and its student too (module docstring).

    Bars only with `progress` on a terminal: a captured log gets each stage's periodic
    status lines instead (`kdpipe.progress`), not thousands of redraws."""
    preset = get_preset(preset_name)
    threads = resolve_threads(threads or 0)
    second = None if second_teacher is None else second_teacher_spec(preset, second_teacher)
    _check_out(out, preset, overwrite, second)
    clock = StageClock(out)
    bars = bars_shown(progress)
    with library_bars(bars):
        with torch_threads(threads):
            prepared = prepare(preset, out, clock, device, bars, second_teacher)
        exp = demo_experiment(preset, out, prepared)
        inputs = Inputs(cache=str(prepared.cache), eval_cache=str(prepared.heldout_cache),
                        student_config=str(prepared.student_config),
                        teacher=str(prepared.teacher), setup_dir=str(out))
        labels = ARM_LABELS
        if prepared.cache_b is not None:
            caches, held = demo_caches(prepared)
            inputs = replace(inputs, caches=caches, eval_caches=held)
            labels = {**ARM_LABELS, **LABELS_B}
        run_experiment(exp, parallel=1, threads=threads, device=device, progress=bars,
                       inputs=inputs, clock=clock, labels=labels)
    return demo_table(preset, prepared, out, clock, threads, second)
