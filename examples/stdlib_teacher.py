"""Build a small real teacher and its caches from the Python standard library's own source.

    python examples/stdlib_teacher.py --out runs/stdlib [--preset full]

The teacher side of `kdpipe demo` alone (kdpipe/demo/prepare.py): corpus split by file,
byte-level BPE tokenizer, a Llama teacher trained by `train-student --mode ce`, then
`cache-teacher` over the train and held-out splits. Each stage is skipped when its output
exists, so a re-run resumes. `--preset full` (the default here) is a 4.2M-parameter teacher at
k = 64, the one docs/benchmarks.md measures; `kdpipe demo` adds curricula and students.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdpipe.embedded.prepare import prepare
from kdpipe.embedded.presets import PRESETS, get_preset
from kdpipe.torch_runtime import auto_threads, torch_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stdlib"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with torch_threads(auto_threads(1)):
        prepared = prepare(get_preset(args.preset), args.out, device=args.device)
    print(f"teacher: {prepared.teacher}")
    print(f"caches: {prepared.cache} (train), {prepared.heldout_cache} (held-out); try "
          f"`kdpipe inspect {prepared.cache}`")


if __name__ == "__main__":
    main()
