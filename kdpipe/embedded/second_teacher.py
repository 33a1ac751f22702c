"""Teacher B of the embedded setup (`prepare(..., second_teacher=CHOICE)`): its shape and data.

Both choices are cached over exactly teacher A's train and held-out sequences (the same
corpus files, tokenizer and cache options, so the same `sample_id` → `input_ids`) at A's k, so
the two teachers' caches align sample for sample, as `train-student --cache A --cache B` needs:

* `half`: A's shape, initialisation, steps, batch and learning rate, trained only on the
  leading half of the train split. The two teachers differ in their data alone: both have
  seen the first half, only A the second, and neither the held-out split.
* `small`: a smaller shape (`presets.SMALL_TEACHERS`) trained like A on all of it.

How B learns from half the data without a new trainer option: the teacher trainer reads a
token cache, so B gets its own, made by the same 1-layer reader from the leading documents of
the train split (`leading_documents`). The packed layout joins documents in order and cuts
fixed blocks, so that cache holds exactly A's leading train sequences, all but its last,
shorter block (where the leading documents end). The reader's pass costs a small fraction of
B's training. B trains for as many steps as A, so it sees each of its sequences twice as often.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kdpipe.embedded.models import ModelSize
from kdpipe.embedded.presets import SMALL_TEACHERS, Preset
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json, atomic_write_text

SECOND_TEACHERS = ("half", "small")
RECORD_NAME = "second-teacher.json"  # the second teacher a folder was prepared with
HALF_SHARE = 0.5


@dataclass(frozen=True)
class SecondTeacher:
    """What makes teacher B: the choice, its shape and the share of the train split it sees."""

    choice: str
    shape: ModelSize
    train_share: float  # leading share of the train split (its JSON lines' characters; 1: all)


def second_teacher_spec(preset: Preset, choice: str) -> SecondTeacher:
    """Teacher B of `preset` for `choice` ("half" or "small"); ConfigError for another."""
    if choice not in SECOND_TEACHERS:
        raise ConfigError(f"--second-teacher {choice!r} is not one of "
                          f"{', '.join(SECOND_TEACHERS)}")
    if choice == "half":
        return SecondTeacher(choice, preset.teacher, HALF_SHARE)
    return SecondTeacher(choice, SMALL_TEACHERS[preset.name], 1.0)


def check_second_teacher(root: Path, spec: SecondTeacher) -> None:
    """One second teacher per folder: its stages skip work whose output exists, so a folder
    holding one choice's teacher B must not be taken for another's. Records `spec` in a folder
    without one (a folder prepared with teacher A only may gain a teacher B)."""
    record = root / RECORD_NAME
    if record.is_file():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if previous != asdict(spec):
            raise ConfigError(f"{root} was prepared with --second-teacher "
                              f"{previous.get('choice')} (other settings); choose another "
                              "folder or delete it")
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, asdict(spec))


def leading_documents(src: Path, out: Path, share: float) -> Path:
    """Write OUT, the first lines of the JSON-lines file SRC holding at least `share` of its
    characters (so at most one document more than the share); skipped when OUT exists.

    Raises ValueError when `share` is not in (0, 1] or SRC has no line.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share {share} is not in (0, 1]")
    if out.is_file():
        return out
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines:
        raise ValueError(f"{src} holds no document")
    wanted, taken, kept = share * sum(len(line) for line in lines), 0, 0
    while taken < wanted:
        taken += len(lines[kept])
        kept += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(lines[:kept]))
    return out
