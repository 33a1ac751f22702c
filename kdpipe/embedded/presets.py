"""Sizes of the demo: `tiny` (CI, < 3 minutes), `small` (the default, < 10 minutes on 2 CPU
cores) and `full` (a 4.2M-parameter teacher; about an hour on 2 cores) on the stdlib's source;
`chat` (< 10 minutes on 2 cores) and `chat-tiny` (CI) on conversations about it (`chat.py`).

Measured times are in docs/experiments.md. Every size is a frozen record, so the folder a demo
prepares says exactly what made it (OUT/preset.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdpipe.embedded.models import ModelSize
from kdpipe.schemas.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """Corpus budget, tokenizer, teacher and student shapes and their training lengths."""

    name: str
    train_chars: int  # characters of stdlib source in the train split
    heldout_chars: int
    vocab_size: int
    max_length: int  # tokens per packed sequence
    top_k: int  # teacher log-probs cached per position
    teacher: ModelSize
    teacher_steps: int
    teacher_batch_size: int
    teacher_lr: float
    student: ModelSize
    student_epochs: int  # the same token budget for every arm: epochs of the train split
    student_batch_size: int
    student_lr: float
    evals_per_run: int  # held-out evaluations during each student run (the curves)
    # "source": the stdlib's .py files as text (`corpus.py`); "chat": conversations answered by
    # its docstrings (`chat.py`), cached with assistant-only targets. Last, with a default, so
    # a folder prepared before the field existed still matches its preset (`check_preset`).
    corpus: str = "source"


PRESETS = {
    "tiny": Preset(name="tiny", train_chars=60_000, heldout_chars=12_000, vocab_size=512,
                   max_length=64, top_k=8, teacher=ModelSize(64, 2, 2), teacher_steps=150,
                   teacher_batch_size=8, teacher_lr=3e-3, student=ModelSize(32, 1, 1),
                   student_epochs=1, student_batch_size=8, student_lr=3e-3, evals_per_run=2),
    "small": Preset(name="small", train_chars=600_000, heldout_chars=40_000, vocab_size=2048,
                    max_length=128, top_k=32, teacher=ModelSize(160, 4, 2), teacher_steps=300,
                    teacher_batch_size=16, teacher_lr=2e-3, student=ModelSize(64, 2, 1),
                    student_epochs=1, student_batch_size=16, student_lr=3e-3,
                    evals_per_run=3),
    "full": Preset(name="full", train_chars=1_500_000, heldout_chars=100_000, vocab_size=4096,
                   max_length=256, top_k=64, teacher=ModelSize(256, 4, 4), teacher_steps=600,
                   teacher_batch_size=16, teacher_lr=1.5e-3, student=ModelSize(128, 2, 2),
                   student_epochs=1, student_batch_size=16, student_lr=2e-3, evals_per_run=6),
    # Chat: budgets count message contents; conversations are at most ~300 tokens,
    # packed in sequences of 320 so that none is cut.
    "chat": Preset(name="chat", train_chars=600_000, heldout_chars=40_000, vocab_size=2048,
                   max_length=320, top_k=32, teacher=ModelSize(160, 4, 2), teacher_steps=300,
                   teacher_batch_size=8, teacher_lr=2e-3, student=ModelSize(64, 2, 1),
                   student_epochs=2, student_batch_size=8, student_lr=3e-3, evals_per_run=3,
                   corpus="chat"),
    "chat-tiny": Preset(name="chat-tiny", train_chars=40_000, heldout_chars=8_000,
                        vocab_size=512, max_length=320, top_k=8, teacher=ModelSize(64, 2, 2),
                        teacher_steps=100, teacher_batch_size=4, teacher_lr=3e-3,
                        student=ModelSize(32, 1, 1), student_epochs=1, student_batch_size=4,
                        student_lr=3e-3, evals_per_run=2, corpus="chat"),
}
DEFAULT_PRESET = "small"

# The `--second-teacher small` shape of each preset: between the student and teacher A, so it is
# clearly weaker than A and still stronger than the students (docs/experiments.md measures
# both). Kept apart from `Preset` so that folders prepared before it existed keep their
# preset.json; the second teacher's own record (`second_teacher.py`) holds it.
# (On `small`, 96 × 2 came within 0.08 nats/token of A on held-out; 80 × 2 is 0.15 behind.)
SMALL_TEACHERS = {"tiny": ModelSize(48, 1, 2), "small": ModelSize(80, 2, 2),
                  "full": ModelSize(160, 2, 2), "chat": ModelSize(80, 2, 2),
                  "chat-tiny": ModelSize(48, 1, 2)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]
