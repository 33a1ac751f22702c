"""The memory plan (`train-student --dry-run`) against the measured peak of a training step.

    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --out runs/bench-memory-plan

Builds what it needs under --out (once): the stdlib corpus, a 512-id tokenizer, a randomly
initialised tiny teacher and two packed caches of it (sequences of --short and --long tokens),
and a pretrained-style Llama student folder (--hidden, --layers, --heads; random weights).
For each configuration it plans the run from configs alone (`memory_plan.dry_run`: the meta
student, the manifest) and measures one step of the trainer's own run (`train.setup`,
`train_step`, after a first step so that the optimizer state exists) with
`TensorMemoryTracker` (benchmarks/train_student.py): the peak of live tensor storage bytes on
CPU, and apart from it

* the *activations*: the peak, over forward and backward, of the live bytes less what was
  held before the step and less the parameter gradients alive at that moment;
* the optimizer step's peak.

Goals (issue 15): the planned peak within 15% of the measured one; LoRA r = 16 at most 35%
of the full fine-tune's peak; gradient checkpointing cuts the activations at least 3× at
--long tokens. Writes memory_plan.json and memory_plan.md (the table) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from kdpipe.embedded.corpus import write_corpus
from kdpipe.embedded.models import ModelSize, init_model
from kdpipe.embedded.tokenizer import train_tokenizer
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.manifest import manifest_path
from kdpipe.schemas.shard_reader import columns_for
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.memory_plan import dry_run
from kdpipe.trainer.precision import MasterWeightOptimizer
from kdpipe.trainer.reliance import StepLambdas
from kdpipe.trainer.train import Run, setup, train_step

sys.path.insert(0, str(Path(__file__).parent))
from train_student import TensorMemoryTracker, batch_tensors  # noqa: E402

VOCAB = 512
TEACHER = ModelSize(64, 2, 2)
GOAL_ERROR = 0.15
GOAL_LORA = 0.35
GOAL_CHECKPOINTING = 3.0
# (name, which cache, options): every configuration trains the same student.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("full fp32 AdamW", "short", {}),
    ("LoRA r 16", "short", {"lora_r": 16}),
    ("SGD", "short", {"optimizer": "sgd"}),
    ("Adafactor", "short", {"optimizer": "adafactor", "lr": 1e-2}),
    ("full fp32 AdamW", "long", {}),
    ("gradient checkpointing", "long", {"gradient_checkpointing": True}),
    ("LoRA r 16", "long", {"lora_r": 16}),
    ("LoRA r 16 + checkpointing", "long", {"lora_r": 16, "gradient_checkpointing": True}),
    ("bf16-mixed", "short", {"precision": "bf16-mixed"}),
    ("bf16-master", "short", {"precision": "bf16-master"}),
    ("bf16-mixed", "long", {"precision": "bf16-mixed"}),
    ("bf16-mixed + checkpointing", "long", {"precision": "bf16-mixed",
                                            "gradient_checkpointing": True}),
]


class PhaseTracker(TensorMemoryTracker):
    """Also the peak, over forward and backward, of the bytes that are neither held before
    the step nor parameter gradients (the activations and the head's buffers), and the
    optimizer step's own peak (split at a pre-step hook: `begin_optimizer_step`)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = params
        self.held = 0
        self.activation_peak = 0
        self.forward_backward_peak: int | None = None

    def track(self, tensor: torch.Tensor) -> None:
        super().track(tensor)
        if self.forward_backward_peak is None and self.held:
            grads = sum(p.grad.untyped_storage().nbytes() for p in self.params
                        if p.grad is not None)
            self.activation_peak = max(self.activation_peak, self.live - self.held - grads)

    def begin_optimizer_step(self, *_: Any) -> None:
        if self.forward_backward_peak is None:
            self.forward_backward_peak = self.peak
            self.peak = self.live


def prepare(out: Path, lengths: dict[str, int], student: ModelSize) -> tuple[dict[str, Path],
                                                                               Path]:
    """The caches (by name) and the student folder, made once under `out`."""
    train_jsonl, _ = write_corpus(out / "corpus", 240_000, 2_000)
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer(train_jsonl, tokenizer, VOCAB)
    longest = max(lengths.values())
    teacher = init_model(tokenizer, out / "teacher", TEACHER, longest)
    caches = {}
    for name, length in lengths.items():
        caches[name] = out / f"cache-{length}"
        if not manifest_path(caches[name]).is_file():
            cache_teacher(CacheTeacherConfig(
                teacher=str(teacher), data=(str(train_jsonl),), out=str(caches[name]), top_k=8,
                pack=True, max_length=length, batch_size=8, shard_size=64, device="cpu",
                progress=False))
    return caches, init_model(tokenizer, out / "student", student, longest)


def measure(run: Run) -> dict[str, int]:
    """Bytes of the second step of `run`: held before it, the forward/backward peak, the
    activations' own peak (gradients left out) and the optimizer step's peak."""
    model = run.student.model
    params = [p for p in model.parameters() if p.requires_grad]
    order = run.index.sample_ids[:2 * run.cfg.batch_size]
    columns = columns_for(run.cache, teacher=True, temperature=1.0)
    with BatchLoader(run.index, order, columns, run.cfg.batch_size, 1, run.pad_id) as loader:
        batches = iter(loader)
        first = next(batches)
        train_step(run, first, StepLambdas.constant(0.5, first.sample_ids.size), None, 1)
        second = next(batches)
        masters = ([m for _, m in run.optimizer.pairs]
                   if isinstance(run.optimizer, MasterWeightOptimizer) else [])
        tracker = PhaseTracker(params + masters)  # bf16-master: gradients move onto masters
        state = [t for s in run.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        for tensor in [*model.parameters(), *model.buffers(), *masters, *state,
                       *batch_tensors(second)]:
            tracker.track(tensor)
        held = tracker.held = tracker.live
        hook = run.optimizer.register_step_pre_hook(tracker.begin_optimizer_step)
        try:
            with tracker:
                train_step(run, second, StepLambdas.constant(0.5, second.sample_ids.size),
                           None, 2)
        finally:
            hook.remove()
    assert tracker.forward_backward_peak is not None
    return {"held": held, "forward_backward_peak": tracker.forward_backward_peak,
            "step_peak": tracker.peak, "peak": max(tracker.forward_backward_peak, tracker.peak),
            "activations": tracker.activation_peak}


def one(args: argparse.Namespace, name: str, cache: Path, student: Path,
        options: dict[str, Any]) -> dict[str, Any]:
    slug = "-".join(name.lower().replace("+", "").split()) + f"-{cache.name}"
    cfg = TrainConfig.from_options(
        cache=str(cache), out=str(Path(args.out) / "runs" / slug), student=str(student),
        device="cpu", threads=1, batch_size=args.batch_size, max_steps=2, snapshots=False,
        progress=False, **options)
    plan = dry_run(cfg)
    run = setup(cfg.with_cache_defaults())
    measured = measure(run)
    planned_activations = plan.forward_backward
    return {"config": name, "cache": cache.name, "options": options,
            "tokens": plan.tokens_per_step, "params": plan.total_params,
            "trainable": plan.trainable_params, "planned_peak": plan.peak,
            "planned_held": plan.held_bytes, "planned_activations": planned_activations,
            "planned_optimizer_step": plan.optimizer_step, **measured,
            "error": plan.peak / measured["peak"] - 1}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    mib = 1024**2
    rows = ["| configuration | tokens | trainable | planned peak | measured peak | error | "
            "planned activations | measured activations |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['config']} | {r['tokens']:,} | {r['trainable']:,} | "
                    f"{r['planned_peak'] / mib:.1f} MiB | {r['peak'] / mib:.1f} MiB | "
                    f"{100 * r['error']:+.1f}% | {r['planned_activations'] / mib:.1f} MiB | "
                    f"{r['activations'] / mib:.1f} MiB |")
    by = {(r["config"], r["cache"]): r for r in results}
    short, long = (f"cache-{args.short}", f"cache-{args.long}")
    lora = by[("LoRA r 16", short)]["peak"] / by[("full fp32 AdamW", short)]["peak"]
    checkpointing = (by[("full fp32 AdamW", long)]["activations"]
                     / by[("gradient checkpointing", long)]["activations"])
    worst = max(abs(r["error"]) for r in results)
    goals = [(f"planned peak within {100 * GOAL_ERROR:.0f}% (worst)", f"{100 * worst:.1f}%",
              worst <= GOAL_ERROR),
             (f"LoRA r 16 peak / full peak at {args.short} tokens ≤ {GOAL_LORA}",
              f"{lora:.3f}", lora <= GOAL_LORA),
             (f"checkpointing cuts activations at {args.long} tokens ≥ {GOAL_CHECKPOINTING}×",
              f"{checkpointing:.2f}×", checkpointing >= GOAL_CHECKPOINTING)]
    rows += ["", "| goal | measured | met |", "|---|---:|---|"]
    rows += [f"| {goal} | {value} | {'yes' if met else 'NO'} |" for goal, value, met in goals]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-memory-plan")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--short", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--long", type=int, default=1024, help="Tokens per sequence.")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--only", default="", help="Run configurations whose name has this.")
    parser.add_argument("--prepare-only", action="store_true",
                        help="Build the caches and the student, measure nothing (a cache to "
                        "point `train-student --dry-run` at).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    caches, student = prepare(out, {"short": args.short, "long": args.long},
                              ModelSize(args.hidden, args.layers, args.heads))
    if args.prepare_only:
        print("\n".join(f"{name}: {path}" for name, path in caches.items()))
        return
    results = []
    for name, which, options in CONFIGS:
        if args.only and args.only not in name:
            continue
        results.append(one(args, name, caches[which], student, options))
        r = results[-1]
        print(f"{name} @ {r['tokens']}: planned {r['planned_peak']:,} measured {r['peak']:,} "
              f"({100 * r['error']:+.1f}%); activations planned {r['planned_activations']:,} "
              f"measured {r['activations']:,}; step {r['planned_optimizer_step']:,} / "
              f"{r['step_peak'] - r['held']:,}", flush=True)
    (out / "memory_plan.json").write_text(json.dumps(results, indent=1))
    if not args.only:
        table = markdown(results, args)
        (out / "memory_plan.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
