"""`kdpipe demo`: the whole pipeline on the standard library's source, with a comparison table.

prepare (corpus → tokenizer → teacher → caches, `prepare.py`) → a teacher curriculum
(`build-curriculum --source teacher`) → the CE-only student, whose per-sample losses give the
student curriculum (`--source snapshot`) → students KD, KD-CL (teacher curriculum), KD-CL
(student curriculum), KD-CL-SR → OUT/demo.md and OUT/demo.json: held-out perplexity, top-1
agreement with the teacher, train tokens/s and wall time per stage.

A chat preset (`--preset chat`) prepares conversations cached with assistant-only targets and
trains only the CE-only and KD students (`CHAT_ARMS`): the question there is whether the
teacher helps on the assistant's replies; its held-out numbers count assistant tokens only.

The students are one `kdpipe experiment` (one seed) run by the same runner, so
`kdpipe report OUT` draws the plots. One seed measures nothing about which arm is better; the
table says so, and `experiments/seed-question.yaml` asks the question with seeds and intervals.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdpipe.embedded.prepare import PRESET_NAME, Prepared, check_preset, prepare
from kdpipe.embedded.presets import Preset, get_preset
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


def demo_arms(preset: Preset) -> tuple[tuple[ArmSpec, ...], tuple[CurriculumSpec, ...]]:
    """The students of a preset and the curricula they need."""
    return (CHAT_ARMS, ()) if preset.corpus == "chat" else (ARMS, CURRICULA)


def demo_experiment(preset: Preset, out: Path, prepared: Prepared) -> ExperimentConfig:
    """The demo's students as an experiment: one seed, the same token budget for every arm."""
    from kdpipe.schemas.cache import open_cache

    sequences = open_cache(prepared.cache).manifest.num_sequences
    steps = preset.student_epochs * -(-sequences // preset.student_batch_size)
    train = {"epochs": preset.student_epochs, "batch_size": preset.student_batch_size,
             "lr": preset.student_lr, "warmup_steps": max(1, steps // 20),
             "eval_every": max(1, steps // preset.evals_per_run), "log_every": 5,
             "student_config": str(prepared.student_config)}
    arms, curricula = demo_arms(preset)
    return ExperimentConfig(name=f"demo-{preset.name}", out=str(out),
                            setup=Setup(cache=str(prepared.cache),
                                        eval_cache=str(prepared.heldout_cache)),
                            seeds=(0,), arms=arms, curricula=curricula, train=train,
                            baseline="kd", metric="eval_ce",
                            description=f"kdpipe demo --preset {preset.name}")


def _check_out(out: Path, preset: Preset, overwrite: bool) -> None:
    """One demo per folder: a different preset into an existing demo is refused."""
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
        check_preset(out, preset)
    except ConfigError as exc:
        raise ConfigError(f"--out {exc}; or pass --overwrite to replace it") from exc


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
               threads: int) -> dict[str, Any]:
    """OUT/demo.md + OUT/demo.json from the results; returns the JSON object."""
    from kdpipe.experiments.runner import RESULTS_NAME
    from kdpipe.schemas.cache import open_cache

    records = json.loads((out / RESULTS_NAME).read_text(encoding="utf-8"))
    vocab = open_cache(prepared.cache).manifest.vocab_size
    rows = [teacher_row(prepared)] + [
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
             f"{_num(rows[1].get('tokens_seen'), 0)}{targets} tokens.", ""]
    if chat:
        lines += ["Chat data: questions about the standard library answered by its docstrings, "
                  "cached with assistant-only targets. Students train on, and held-out "
                  "numbers count, the assistant's reply tokens only (CE in nats/token).", ""]
    lines += ["| model | held-out CE | held-out ppl | top-1 agreement | train tokens/s | wall s "
              "| CPU s |", "|---|---|---|---|---|---|---|"]
    teacher_time = stages.get("teacher training", {})
    for row in rows:
        label = "teacher (reference)" if row["arm"] == "teacher" else \
            ARM_LABELS.get(row["arm"], row["arm"])
        wall = teacher_time.get("wall_s") if row["arm"] == "teacher" else row.get("wall_s")
        cpu = teacher_time.get("cpu_s") if row["arm"] == "teacher" else row.get("cpu_s")
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
        ("runs/" if chat else "curricula/, runs/")
    lines += [f"| **total** | {_num(total, 1)} | |", "",
              f"Artifacts: `{out}` ({folders}). Plots: `kdpipe report {out}`.", ""]
    table = {"preset": asdict(preset), "threads": threads, "rows": rows, "stages": stages,
             "total_wall_s": total}
    atomic_write_json(out / TABLE_JSON, table)
    atomic_write_text(out / TABLE_MD, "\n".join(lines))
    return table


def run_demo(out: Path, preset_name: str = "small", threads: int | None = None,
             device: str = "auto", progress: bool = True, overwrite: bool = False
             ) -> dict[str, Any]:
    """Everything `kdpipe demo` does; returns the table (also OUT/demo.json and demo.md).

    Bars only with `progress` on a terminal: a captured log gets each stage's periodic
    status lines instead (`kdpipe.progress`), not thousands of redraws."""
    preset = get_preset(preset_name)
    threads = resolve_threads(threads or 0)
    _check_out(out, preset, overwrite)
    clock = StageClock(out)
    bars = bars_shown(progress)
    with library_bars(bars):
        with torch_threads(threads):
            prepared = prepare(preset, out, clock, device, bars)
        exp = demo_experiment(preset, out, prepared)
        inputs = Inputs(cache=str(prepared.cache), eval_cache=str(prepared.heldout_cache),
                        student_config=str(prepared.student_config),
                        teacher=str(prepared.teacher), setup_dir=str(out))
        run_experiment(exp, parallel=1, threads=threads, device=device, progress=bars,
                       inputs=inputs, clock=clock, labels=ARM_LABELS)
    return demo_table(preset, prepared, out, clock, threads)
