"""`AdapterConfig`: the LoRA / DoRA options of `train-student`, and what is an adapter folder.

Nested in `TrainConfig` (its `adapter` field): the options appear as train-student's flat
flags (axolotl's names: `--lora-r`, `--lora-alpha`, `--lora-dropout`, `--lora-target-modules`),
a run folder's `config.json` records them and `--resume` refuses to change them. This module
only declares and checks the options, without importing peft; `adapters.py` builds the
adapters. docs/training.md ("LoRA and DoRA students") describes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdpipe import extras
from kdpipe.options import option, path_problems

ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's file: a folder holding it is an adapter
PEFT_PURPOSE = "LoRA/DoRA adapters"
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


def is_adapter_folder(path: str | Path | None) -> bool:
    """Whether `path` is a local folder of peft adapters (it holds adapter_config.json)."""
    return path is not None and (Path(path) / ADAPTER_CONFIG_NAME).is_file()


@dataclass(frozen=True)
class AdapterConfig:
    """Every adapter option of train-student; `lora_r` 0 and no `peft_config`: no adapters."""

    lora_r: int = option(
        0, "LoRA rank: train low-rank adapters on the frozen --student instead of all its "
        "weights (0: no adapters, every weight trains). Needs `pip install 'kdpipe[peft]'`.",
        ge=0)
    lora_alpha: int | None = option(
        None, "LoRA α: the adapters' update is scaled by α / r. Default: 2 × --lora-r.", gt=0)
    lora_dropout: float = option(0.0, "Dropout on the adapters' input.", ge=0, lt=1)
    lora_target_modules: tuple[str, ...] = option(
        (), "Modules to adapt, comma-separated leaf names (q_proj,v_proj), or all-linear "
        "(every linear layer but the output head); add lm_head to adapt the head too. "
        "Default: every attention and MLP projection (table in docs/training.md).",
        comma_separated=True)
    use_dora: bool = option(
        False, "DoRA: adapt each weight's direction with LoRA and learn its magnitude apart.")
    peft_config: str | None = option(
        None, "A peft LoraConfig as JSON (an adapter_config.json will do) instead of the "
        "--lora-* flags.")
    merge_adapter: bool = option(
        False, "Also write the student with its adapters merged in, a plain model, to "
        "final/merged/.")

    @property
    def enabled(self) -> bool:
        """Whether the run trains adapters (rather than every weight of the student)."""
        return self.lora_r > 0 or self.peft_config is not None

    @property
    def alpha(self) -> int:
        """α of the --lora-* flags: --lora-alpha, else 2 × --lora-r."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r

    def _flags_given(self) -> list[str]:
        given = [("--lora-r", self.lora_r > 0), ("--lora-alpha", self.lora_alpha is not None),
                 ("--lora-dropout", self.lora_dropout != 0.0),
                 ("--lora-target-modules", bool(self.lora_target_modules)),
                 ("--use-dora", self.use_dora)]
        return [flag for flag, is_given in given if is_given]

    def problems(self, student: str | None, student_config: str | None) -> list[str]:
        """Checks across options: the flags or a file, adapters on a pretrained student."""
        found = path_problems("--peft-config", self.peft_config, "file")
        flags = self._flags_given()
        if self.peft_config is not None and flags:
            found.append(f"give --peft-config or the --lora-* flags, not both ({', '.join(flags)}"
                         f" with --peft-config {self.peft_config}, which sets them)")
        elif self.peft_config is None and self.lora_r == 0 and flags:
            found.append(f"{', '.join(flags)} shape(s) LoRA adapters: add --lora-r N (N > 0) "
                         "to train them, or drop the flag(s)")
        if self.peft_config is not None and not found:
            found += peft_file_problems(self.peft_config)
        if self.merge_adapter and not self.enabled:
            found.append("--merge-adapter merges LoRA adapters into the student: it needs "
                         "--lora-r N or --peft-config FILE")
        if not self.enabled:
            return found
        which = "--peft-config" if self.peft_config is not None else "--lora-r"
        if student_config is not None:
            found.append(f"{which} adapts a pretrained --student, but --student-config starts "
                         "from random weights: train every weight of a new student (drop "
                         f"{which}), or give a pretrained --student")
        if is_adapter_folder(student):
            found.append(f"--student {student} is a folder of adapters; {which} puts new "
                         "adapters on a plain model: merge those first (train them with "
                         "--merge-adapter and give RUN/final/merged) or continue their run "
                         "with --resume")
        missing = extras.missing("peft", "peft", PEFT_PURPOSE)
        if missing is not None:
            found.append(missing)
        return found


def peft_file_problems(path: str) -> list[str]:
    """A --peft-config file must be a JSON object of a LoRA config (peft_type LORA or none).
    Its fields are checked against peft's LoraConfig when the adapters are built."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"--peft-config {path}: not a JSON file ({exc})"]
    if not isinstance(data, dict):
        return [f"--peft-config {path}: expected a JSON object of LoraConfig fields (r, "
                "lora_alpha, target_modules, ...)"]
    kind = data.get("peft_type", "LORA")
    if kind != "LORA":
        return [f"--peft-config {path}: peft_type {kind!r}; kdpipe trains LoRA and DoRA "
                "adapters only (peft_type LORA; DoRA is use_dora: true)"]
    return []
