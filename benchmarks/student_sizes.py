"""CPU time of one seed-motivations run per student size, and with two teachers, as ratios.

    python benchmarks/student_sizes.py --out runs/bench-student-sizes

experiments/seed-motivations.yaml sizes its runs from seed-question's measured CPU time of the
preset's student (h64); this measures how the other students and a two-teacher run compare.
Each case is a `train-student` run shaped like the experiment's (100 steps of 16 sequences of
128 tokens, an evaluation every 25 steps, one torch thread) on a random-teacher top-32 cache
of 2,048 ids (`random_teacher_cache.py`: cost depends on the shapes, not on what the teacher
knows), after one warm-up run. The two-teacher case reads the same cache twice
(`--cache C --cache C --teacher-weight 0.5 --teacher-weight 0.5`). Ratios are within one run,
on one machine; writes `student_sizes.json` and `student_sizes.md` to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdpipe.embedded.models import ModelSize, write_spec
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.train import train

sys.path.insert(0, str(Path(__file__).parent))
import random_teacher_cache  # noqa: E402

SIZES = {"h32": ModelSize(32, 1, 1), "h64": ModelSize(64, 2, 1), "h128": ModelSize(128, 2, 2)}
MAX_LENGTH = 128


def _run(out: Path, cache: Path, size: str, caches: int, extra: dict[str, Any]) -> float:
    """CPU seconds of one run (the process's user + system time)."""
    student = write_spec(out / "students" / f"{size}.json", SIZES[size], MAX_LENGTH)
    paths = tuple(str(cache) for _ in range(caches))
    cfg = TrainConfig.from_options(
        cache=paths, eval_cache=paths, out=str(out / "runs" / f"{size}-{caches}"),
        student_config=str(student), batch_size=16, max_steps=100, lr=3e-3, eval_every=25,
        log_every=10, device="cpu", progress=False, overwrite=True, **extra
    ).with_cache_defaults()
    start = time.process_time()
    train(cfg)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    random_teacher_cache.main(["--out", str(args.out / "setup"), "--vocab", "2048",
                               "--chars", "120000", "--tokenizer-chars", "400000",
                               "--max-length", str(MAX_LENGTH), "--top-k", "32",
                               "--device", "cpu"])
    cache = args.out / "setup" / "cache"
    torch.set_num_threads(1)
    _run(args.out, cache, "h32", 1, {})  # warm-up: imports, first model build
    cases: dict[str, tuple[str, int, dict[str, Any]]] = {
        f"{size}, KD": (size, 1, {}) for size in SIZES}
    cases["h64, CE"] = ("h64", 1, {"mode": "ce"})
    cases["h64, KD from two caches"] = ("h64", 2, {"teacher_weight": (0.5, 0.5)})
    cpu = {name: _run(args.out, cache, *case) for name, case in cases.items()}
    base = cpu["h64, KD"]
    lines = ["| run | CPU s | relative to h64, KD |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / base:.2f} |" for name, seconds in cpu.items()]
    (args.out / "student_sizes.json").write_text(json.dumps(cpu, indent=2) + "\n")
    (args.out / "student_sizes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
