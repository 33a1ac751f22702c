"""Benchmark the output head and loss alone: the fused path against the checkpointed one.

    python benchmarks/fused_head.py --tokens 2040 --hidden 128 --vocab 4096

Times forward + backward of `chunked_distill_loss` on random hidden states, a random linear
head and a random top-k teacher, for CE, forward KL at τ = 1 and τ = 2, and the sampled loss,
on the fused path and on the checkpointed autograd path (forced by a neutral logit transform,
which the fused path does not take), and records the peak of live tensor bytes each creates
(the TensorMemoryTracker of train_student.py). With --teachers J > 1 the KD losses are also
measured against J teachers (equal weights; several --cache). CPU: thread time with one
torch thread, best of --repeats; CUDA: wall time after synchronising, and
max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer.chunked_loss import TeacherTargets, chunked_distill_loss
from kdpipe.trainer.loss_config import SAMPLED, LossConfig

sys.path.insert(0, str(Path(__file__).parent))
from train_student import TensorMemoryTracker  # noqa: E402

MIB = 2**20


def inputs(args: argparse.Namespace, device: torch.device, sampled: bool
           ) -> tuple[torch.Tensor, nn.Linear, torch.Tensor, TeacherTargets, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    head = nn.Linear(h, v, bias=False).to(device)
    hidden = torch.randn(n, h, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, head, labels, teacher(args, device, sampled, gen), torch.full(
        (n,), 0.5, device=device)


def teacher(args: argparse.Namespace, device: torch.device, sampled: bool,
            gen: torch.Generator) -> TeacherTargets:
    """A random teacher's cached targets for --tokens tokens."""
    n, v, k = args.tokens, args.vocab, args.top_k
    logp = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    vals, ids = logp.topk(k, -1)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6))
    if sampled:
        drawn = torch.multinomial(logp.exp(), 16, replacement=False, generator=gen)  # (n, 16)
        weights = torch.full(drawn.shape, 1 / 16)
        return TeacherTargets(drawn[:, :1].to(device), vals[:, :1].half().to(device),
                              tail.to(device), None, drawn.to(device), weights.to(device))
    return TeacherTargets(ids.to(device), vals.half().to(device), tail.to(device),
                          tail.to(device))


def measure(args: argparse.Namespace, device: torch.device, cfg: LossConfig, fused: bool,
            teachers: int = 1) -> dict[str, float]:
    hidden, head, labels, first, lam = inputs(args, device, cfg.kind == SAMPLED)
    gen = torch.Generator().manual_seed(1)
    others = [teacher(args, device, cfg.kind == SAMPLED, gen) for _ in range(teachers - 1)]
    transform = None if fused else (lambda z: z)

    def step() -> None:
        sums = chunked_distill_loss(hidden, head, labels, lam, cfg, first, args.vocab,
                                    transform, other_teachers=others)
        sums.total.backward()
        hidden.grad = head.weight.grad = None

    step()  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
        else:
            started = time.thread_time()
            step()
            best = min(best, time.thread_time() - started)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        tracker = TensorMemoryTracker()
        for t in (hidden, head.weight, labels, lam,
                  *(t for tg in (first, *others) for t in vars(tg).values()
                    if t is not None)):
            tracker.track(t)
        base = tracker.live
        with tracker:
            step()
        peak = tracker.peak - base
    return {"seconds": best, "tokens_per_s": args.tokens / best, "peak_extra_mib": peak / MIB}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2040)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--teachers", type=int, default=1,
                   help="Also measure the KD losses against this many teachers.")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cases = {"ce": LossConfig(mode="ce", chunk_size=args.chunk_size),
             "forward τ=1": LossConfig(chunk_size=args.chunk_size),
             "forward τ=2": LossConfig(temperature=2.0, chunk_size=args.chunk_size),
             "sampled": LossConfig(kind=SAMPLED, chunk_size=args.chunk_size)}
    results: dict[str, Any] = {}
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`python benchmarks/fused_head.py {command}` ({device.type})", "",
             "| loss | fused tokens/s | checkpointed tokens/s | fused / checkpointed "
             "| fused peak MiB | checkpointed peak MiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, cfg in cases.items():
        fused, plain = measure(args, device, cfg, True), measure(args, device, cfg, False)
        results[name] = {"fused": fused, "checkpointed": plain}
        lines.append(f"| {name} | {fused['tokens_per_s']:.0f} | {plain['tokens_per_s']:.0f} "
                     f"| {fused['tokens_per_s'] / plain['tokens_per_s']:.2f} "
                     f"| {fused['peak_extra_mib']:.1f} | {plain['peak_extra_mib']:.1f} |")
    ce = results["ce"]["fused"]["tokens_per_s"]
    lines += ["", "fused KD / fused CE tokens/s: " + ", ".join(
        f"{name} {r['fused']['tokens_per_s'] / ce:.3f}" for name, r in results.items()
        if name != "ce")]
    if args.teachers > 1:
        j = args.teachers
        lines += ["", f"| {j} teachers | fused tokens/s | checkpointed tokens/s | fused / one "
                  "teacher fused | fused peak MiB | checkpointed peak MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, cfg in cases.items():
            if cfg.mode == "ce":
                continue
            fused = measure(args, device, cfg, True, j)
            plain = measure(args, device, cfg, False, j)
            results[f"{name}, {j} teachers"] = {"fused": fused, "checkpointed": plain}
            one = results[name]["fused"]["tokens_per_s"]
            lines.append(f"| {name} | {fused['tokens_per_s']:.0f} "
                         f"| {plain['tokens_per_s']:.0f} | {fused['tokens_per_s'] / one:.2f} "
                         f"| {fused['peak_extra_mib']:.1f} | {plain['peak_extra_mib']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_head.json").write_text(json.dumps(
            {"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1),
            encoding="utf-8")
        (args.out / "fused_head.md").write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
