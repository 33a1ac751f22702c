"""Peak memory and speed of the teacher's reduction: the head a chunk of positions at a time
against the whole (B, T, V) logits at once.

    python benchmarks/teacher_head_memory.py --out runs/bench-teacher-head

A random Llama teacher with V = 128,256 (Llama 3's vocabulary; hidden and layers small, so the
head dominates, as it does for the reduction of a real teacher) reduces batches of random
sequences to top-k + tail with `teacher_targets`, for each batch size, once run whole (the
model's own forward: (B, T, V) logits) and once through `teacher_parts` (body, then the head on
`CHUNK_ELEMENTS // V` positions at a time). For each it records:

* the peak of live tensor storage over one batch (`TensorMemoryTracker`, in
  benchmarks/train_student.py), weights included;
* positions per CPU-second (one torch thread): the fastest of three untracked runs of it;
* that both give the same bits (every column compared).

The batch size each path allows follows from the peaks: peak = weights + B × (bytes per
sequence), fitted over the batch sizes, then solved for --budget-gib. No GPU: CPU, float32.
Writes `teacher_head_memory.json` and `.md` to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdpipe.pipeline.teacher_hf import CHUNK_ELEMENTS, teacher_parts, teacher_targets

sys.path.insert(0, str(Path(__file__).parent))
from train_student import TensorMemoryTracker  # noqa: E402

GIB = 2**30
REPEATS = 3


def build_teacher(vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a random init is near-uniform: widen the head as training would
        model.lm_head.weight.mul_(8.0)
    return model


def run(teacher: Any, seqs: list[list[int]], k: int) -> list[Any]:
    return teacher_targets(teacher, seqs, k, temperatures=[], pad_id=0)


def measure(teacher: Any, model: torch.nn.Module, seqs: list[list[int]], k: int
            ) -> tuple[int, float, list[Any]]:
    """(peak bytes, positions per CPU-second, outputs) of one batch."""
    tracker = TensorMemoryTracker()
    for tensor in [*model.parameters(), *model.buffers()]:
        tracker.track(tensor)
    with tracker:
        outputs = run(teacher, seqs, k)
    seconds = float("inf")
    for _ in range(REPEATS):  # the fastest of a few: other jobs share this machine
        began = time.process_time()
        run(teacher, seqs, k)
        seconds = min(seconds, time.process_time() - began)
    positions = sum(len(s) - 1 for s in seqs)
    return tracker.peak, positions / seconds, outputs


def same_bits(a: list[Any], b: list[Any]) -> bool:
    names = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob")
    return all(np.array_equal(getattr(x, n), getattr(y, n))
               for x, y in zip(a, b, strict=True) for n in names)


def allowed_batch(batches: list[int], peaks: list[int], budget: float) -> int:
    """Largest B with fitted peak(B) = a + b·B within `budget` bytes."""
    slope, intercept = np.polyfit(batches, peaks, 1)
    return int((budget - intercept) // slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--budget-gib", type=float, default=16.0,
                        help="memory for which to solve the allowed batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_teacher(args.vocab, args.hidden, args.layers)
    parts = teacher_parts(model, "benchmark")
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batches.split(",")):
        seqs = [rng.integers(0, args.vocab, size=args.length).tolist() for _ in range(batch)]
        whole_peak, whole_rate, whole_out = measure(model, model, seqs, args.top_k)
        chunk_peak, chunk_rate, chunk_out = measure(parts, model, seqs, args.top_k)
        rows.append({"batch": batch, "whole_peak": whole_peak, "chunked_peak": chunk_peak,
                     "whole_positions_per_cpu_s": whole_rate,
                     "chunked_positions_per_cpu_s": chunk_rate,
                     "same_bits": same_bits(whole_out, chunk_out)})
        print(json.dumps(rows[-1]), flush=True)
    batches = [r["batch"] for r in rows]
    budget = args.budget_gib * GIB
    summary = {"allowed_batch_whole": allowed_batch(batches, [r["whole_peak"] for r in rows],
                                                    budget),
               "allowed_batch_chunked": allowed_batch(
                   batches, [r["chunked_peak"] for r in rows], budget),
               "chunk_positions": max(1, CHUNK_ELEMENTS // args.vocab)}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"args": vars(args), "rows": rows, "summary": summary, "weights_bytes": weights}
    (out / "teacher_head_memory.json").write_text(json.dumps(result, indent=1))
    lines = [f"V = {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, "
             f"{args.length} tokens per sequence, k = {args.top_k}, float32, one thread; "
             f"weights {weights / GIB:.2f} GiB.", "",
             "| batch | peak, whole (GiB) | peak, chunked (GiB) | positions/CPU-s, whole | "
             "positions/CPU-s, chunked | same bits |", "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['whole_peak'] / GIB:.2f} | "
                     f"{r['chunked_peak'] / GIB:.2f} | {r['whole_positions_per_cpu_s']:,.0f} | "
                     f"{r['chunked_positions_per_cpu_s']:,.0f} | {r['same_bits']} |")
    lines += ["", f"Batch size within {args.budget_gib:g} GiB (linear fit of the peaks): "
              f"whole {summary['allowed_batch_whole']}, chunked "
              f"{summary['allowed_batch_chunked']}."]
    (out / "teacher_head_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
