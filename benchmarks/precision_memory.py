"""Memory of a train-student step per --precision, --optimizer and --gradient-checkpointing.

    python benchmarks/precision_memory.py --cache runs/stdlib/cache --out runs/bench-precision

Each configuration builds the trainer's own run (`train.setup`: the student, precision,
optimizer) for a Llama student built from --hidden/--layers (vocab = the cache's), takes one
step (so the optimizer state exists), then counts, in bytes per trainable parameter:

* held between steps: the weights, the float32 masters (bf16-master) and the optimizer
  state, summed over their tensors' storages;
* the peak of one step: live tensor storage bytes over a second step, tracked by
  `TensorMemoryTracker` (benchmarks/train_student.py): everything held plus gradients,
  activations, autocast's bfloat16 weight copies and the optimizer's temporaries.

No timings: CPU only, one torch thread. Writes `precision_memory.json` and
`precision_memory.md` (the table) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdpipe.schemas.shard_reader import columns_for
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.precision import MasterWeightOptimizer
from kdpipe.trainer.reliance import StepLambdas
from kdpipe.trainer.train import setup, train_step

sys.path.insert(0, str(Path(__file__).parent))
from train_student import TensorMemoryTracker, batch_tensors  # noqa: E402

# (precision, optimizer, momentum, gradient checkpointing)
CONFIGS = [("fp32", "adamw", 0.0, False), ("bf16-mixed", "adamw", 0.0, False),
           ("bf16-master", "adamw", 0.0, False), ("fp32", "adamw-8bit", 0.0, False),
           ("bf16-master", "adamw-8bit", 0.0, False), ("fp32", "adafactor", 0.0, False),
           ("fp32", "sgd", 0.0, False), ("fp32", "sgd", 0.9, False),
           ("fp32", "adamw", 0.0, True), ("bf16-mixed", "adamw", 0.0, True)]


def storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(args: argparse.Namespace, precision: str, optimizer: str, momentum: float,
            checkpointing: bool) -> dict[str, Any]:
    name = f"{precision}-{optimizer}{'-m' if momentum else ''}{'-gc' if checkpointing else ''}"
    cfg = TrainConfig.from_options(
        cache=args.cache, out=str(Path(args.out) / name),
        student_config=str(Path(args.out) / "student.json"), device="cpu", threads=1,
        precision=precision, optimizer=optimizer, momentum=momentum,
        gradient_checkpointing=checkpointing, batch_size=args.batch_size, max_steps=2,
        snapshots=False, progress=False).with_cache_defaults()
    cfg.validate()
    run = setup(cfg)
    model = run.student.model
    columns = columns_for(run.cache, teacher=True, temperature=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    tracker = TensorMemoryTracker()
    with BatchLoader(run.index, run.index.sample_ids[:2 * args.batch_size], columns,
                     args.batch_size, 1, run.pad_id) as loader:
        batches = iter(loader)
        first = next(batches)
        train_step(run, first, StepLambdas.constant(0.5, first.sample_ids.size), None, 1)
        masters = ([m for _, m in run.optimizer.pairs]
                   if isinstance(run.optimizer, MasterWeightOptimizer) else [])
        state = [t for s in run.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        held = {"weights": storage_bytes(params), "masters": storage_bytes(masters),
                "optimizer_state": storage_bytes(state)}
        for tensor in [*model.parameters(), *model.buffers(), *masters, *state]:
            tracker.track(tensor)
        second = next(batches)
        for tensor in batch_tensors(second):
            tracker.track(tensor)
        with tracker:
            train_step(run, second, StepLambdas.constant(0.5, second.sample_ids.size), None, 2)
    per_param = {key: value / count for key, value in held.items()}
    return {"config": name, "precision": precision, "optimizer": optimizer,
            "momentum": momentum, "gradient_checkpointing": checkpointing, "params": count,
            "held_bytes_per_param": per_param,
            "held_total_per_param": sum(per_param.values()),
            "step_peak_bytes_per_param": tracker.peak / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 688 *
        args.hidden // 256, "num_hidden_layers": args.layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 512}))
    results = [measure(args, *config) for config in CONFIGS]
    (out / "precision_memory.json").write_text(json.dumps(results, indent=1))
    rows = ["| precision | optimizer | checkpointing | weights | masters | optimizer state | "
            "held | step peak |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        held = r["held_bytes_per_param"]
        optimizer = r["optimizer"] + (f" (momentum {r['momentum']})" if r["momentum"] else "")
        rows.append(f"| {r['precision']} | {optimizer} | "
                    f"{'yes' if r['gradient_checkpointing'] else 'no'} | "
                    f"{held['weights']:.2f} | {held['masters']:.2f} | "
                    f"{held['optimizer_state']:.2f} | {r['held_total_per_param']:.2f} | "
                    f"{r['step_peak_bytes_per_param']:.2f} |")
    table = "\n".join(rows) + f"\n\nBytes per trainable parameter ({results[0]['params']:,}).\n"
    (out / "precision_memory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
