"""Benchmark `kdpipe train-student`: cached KD vs CE-only vs online KD, and the loader alone.

    python benchmarks/train_student.py --cache runs/stdlib/cache \
        --teacher runs/stdlib/teacher-run/final --out runs/bench-train-student

Every arm trains the same student (a Llama built from --hidden/--layers, vocab = the cache's,
the same seeded initialisation) on the same batches (the trainer's seeded shuffle, same seed)
and runs in its own Python subprocess, so its peak RSS is its own:

* ce      the trainer's `train_step` with `--mode ce` (CE on the cached tokens, no teacher);
* kd      the trainer's `train_step` with `--mode kd --loss forward` on the cached top-k + tail;
* online  what the cache removes: the teacher held in memory, its forward per batch under
          no_grad, dense KL against the student's full logits (benchmark code only: the trainer
          can never load a teacher);
* dense-ce  a reference, not a goal: plain CE on the model's own full (B, T, V) logits, the
          way an ordinary Hugging Face training step computes it (what the chunked head of
          `ce` and `kd` is compared with);
* loader  `BatchLoader` over the cache with the KD columns, no model: its tokens/s against the
          rate kd training consumes.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU, whose allocator torch does not
instrument, (a) the peak of live tensor storage bytes, tracked by a TorchDispatchMode over a
few extra steps (parameters, gradients, optimizer state, the batch in use and every tensor the
step creates, forward and backward), and (b) the process's peak RSS over the timed steps
(VmHWM reset just before them). Ratios are within one run, on one machine. Writes
`train_student.json` and `train_student.md` (the results table) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.shard_reader import build_index, columns_for
from kdpipe.torch_runtime import resolve_device
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.data import BatchLoader, GlobalBatch
from kdpipe.trainer.model import autocast
from kdpipe.trainer.reliance import StepLambdas
from kdpipe.trainer.sampler import ShuffleSampler
from kdpipe.trainer.train import setup, train_step

ARMS = ("ce", "kd", "online", "dense-ce", "loader")
TRAINER_ARMS = ("ce", "kd")  # the trainer's own train_step
MIB = 2**20


# --- memory accounting on CPU -----------------------------------------------------------------

class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages: each storage counted once, from creation to free.

    Sees every aten op of this thread (autograd's backward and checkpoint recomputation too);
    tensors made elsewhere (parameters, the loader thread's batches) are added with `track`.
    Relies on torch keeping a storage's Python object alive as long as the storage itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.keys: set[int] = set()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.keys:
            return
        self.keys.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self.keys.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out


def batch_tensors(batch: GlobalBatch) -> list[torch.Tensor]:
    found = []
    for mb in batch.micro:
        found += [mb.input_ids, mb.attention_mask, mb.target_mask, mb.labels, mb.target_row]
        if mb.teacher is not None:
            found += [t for t in vars(mb.teacher).values() if isinstance(t, torch.Tensor)]
    return found


def rss_status() -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS since the last reset) of this process, in MiB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- steps on full logits: online KD (what the cache replaces) and plain CE ------------------

def dense_step(student: torch.nn.Module, teacher: torch.nn.Module | None,
               optimizer: torch.optim.Optimizer, scheduler: Any, batch: GlobalBatch,
               kd_weight: float, temperature: float, device: torch.device,
               amp_dtype: torch.dtype | None, max_grad_norm: float) -> dict[str, float]:
    """Ordinary training on the model's full (B, T, V) logits, normalised like the trainer.

    With a teacher: online KD, (1-λ)·CE + λ·τ²·KL(p_T || q_S) over the whole vocabulary, the
    teacher's forward run per batch under no_grad. Without: plain CE (the `dense-ce` arm).
    """
    tokens = max(batch.num_targets, 1)
    sums = torch.zeros(3, dtype=torch.float64)  # total, ce, kd
    for cpu_batch in batch.micro:
        mb = cpu_batch.to(device)
        with autocast(device, amp_dtype):
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                       use_cache=False).logits  # (B, T, V)
            s_logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                               use_cache=False).logits  # (B, T, V)
        s = s_logits[mb.target_mask].float()  # (N, V)
        ce = F.cross_entropy(s, mb.labels, reduction="none")  # (N,)
        if teacher is not None:
            t = t_logits[mb.target_mask].float()  # (N, V)
            log_q = F.log_softmax(s / temperature, dim=-1)  # (N, V)
            log_p = F.log_softmax(t / temperature, dim=-1)  # (N, V)
            kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (N,)
            total = ((1 - kd_weight) * ce + kd_weight * temperature**2 * kd).sum()
        else:
            kd = torch.zeros_like(ce)
            total = ce.sum()
        (total / tokens).backward()
        sums += torch.stack([total.detach(), ce.detach().sum(), kd.detach().sum()]).double().cpu()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(),
                                          max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total, ce_sum, kd_sum = (s / tokens for s in sums.tolist())
    return {"loss": total, "ce": ce_sum, "kd": kd_sum, "grad_norm": float(norm)}


# --- one arm, in its own process --------------------------------------------------------------

def sample_order(index: Any, seed: int, window: int, samples: int,
                 ids: np.ndarray | None = None) -> np.ndarray:
    """The trainer's seeded shuffle of `ids` (default: all), epoch after epoch, cut to
    `samples` ids."""
    sampler = ShuffleSampler(index, index.sample_ids if ids is None else ids, seed,
                             window=window)
    orders, have, epoch = [], 0, 0
    while have < samples:
        orders.append(sampler.epoch_order(epoch))
        have += orders[-1].size
        epoch += 1
    return np.concatenate(orders)[:samples]


def run_loader(args: argparse.Namespace) -> dict[str, Any]:
    cache = open_cache(args.cache)
    index = build_index(cache)
    columns = columns_for(cache, teacher=True, temperature=args.temperature)
    order = sample_order(index, args.seed, args.shuffle_window, len(index) * args.loader_epochs)
    pad_id = cache.manifest.tokenizer.pad_token_id or 0
    tokens, batches = 0, 0
    rss_before = rss_status()
    hwm_reset = reset_peak_rss()
    started, process_started = time.perf_counter(), time.process_time()
    with BatchLoader(index, order, columns, args.batch_size, args.grad_accum, pad_id,
                     prefetch=args.prefetch, cached_groups=args.shuffle_window,
                     workers=args.loader_workers) as loader:
        for batch in loader:
            tokens += batch.num_targets
            batches += 1
    seconds = time.perf_counter() - started
    process_seconds = time.process_time() - process_started  # mostly the loader thread
    # The loader's own host memory: decoded row groups (LRU) and the prefetch queue.
    return {"arm": "loader", "tokens": tokens, "batches": batches, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "process_seconds": process_seconds,
            "tokens_per_process_s": tokens / process_seconds,
            "rss_before_mib": rss_before["VmRSS"],
            "peak_rss_mib": rss_status()["VmHWM"], "peak_rss_loop_only": hwm_reset}


def run_training(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    memory_steps = args.memory_steps if resolve_device(args.device).type == "cpu" else 0
    total_steps = args.warmup + args.steps + memory_steps + args.profile_steps
    cfg = TrainConfig.from_options(
        cache=args.cache, out=args.out, student_config=str(Path(args.out) / "student_config.json"),
        tokenizer=args.tokenizer, mode=arm if arm in TRAINER_ARMS else "kd", loss=args.loss,
        kd_weight=args.kd_weight, temperature=args.temperature, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, chunk_size=args.chunk_size,
        seed=args.seed, max_steps=total_steps, snapshots=args.snapshots, device=args.device,
        progress=False).with_cache_defaults()
    cfg.validate()
    run = setup(cfg)  # the trainer's own parts, as `kdpipe train-student` builds them
    model, device, manifest = run.student.model, run.device, run.cache.manifest
    teacher: torch.nn.Module | None = None
    if arm == "online":
        from transformers import AutoModelForCausalLM

        teacher = cast(torch.nn.Module, AutoModelForCausalLM.from_pretrained(
            args.teacher, dtype=torch.float32))
        if teacher.get_output_embeddings().weight.shape[0] != manifest.vocab_size:  # type: ignore[operator]
            raise SystemExit(f"--teacher {args.teacher}: its vocabulary is not the cache's")
        teacher.to(device)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    order = sample_order(run.index, args.seed, args.shuffle_window, total_steps * run.per_step)
    columns = columns_for(run.cache, teacher=arm == "kd", temperature=args.temperature)

    def step(batch: GlobalBatch, number: int) -> dict[str, float]:
        if arm not in TRAINER_ARMS:
            return dense_step(model, teacher, run.optimizer, run.scheduler, batch,
                              args.kd_weight, args.temperature, device, run.amp_dtype,
                              cfg.max_grad_norm)
        lam = StepLambdas.constant(args.kd_weight, batch.sample_ids.size)
        return train_step(run, batch, lam, None, number)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    first_steps: list[dict[str, float]] = []
    times: list[float] = []
    tokens = 0
    rss: dict[str, float] = {}
    tracker = TensorMemoryTracker()
    profile_rows = ""
    with BatchLoader(run.index, order, columns, args.batch_size, args.grad_accum, run.pad_id,
                     prefetch=args.prefetch, cached_groups=args.shuffle_window,
                     workers=args.loader_workers) as loader:
        batches = iter(loader)
        for number in range(1, args.warmup + 1):
            first_steps.append(step(next(batches), number))
        sync()
        rss_before = rss_status()
        hwm_reset = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        last = time.perf_counter()
        cpu_started, process_started = time.thread_time(), time.process_time()
        for number in range(args.warmup + 1, args.warmup + args.steps + 1):
            batch = next(batches)  # waiting for the loader counts as training time
            result = step(batch, number)
            sync()
            now = time.perf_counter()
            times.append(now - last)
            last = now
            tokens += batch.num_targets
            if len(first_steps) < 3:
                first_steps.append(result)
        thread_seconds = time.thread_time() - cpu_started
        process_seconds = time.process_time() - process_started
        # Without the reset (not Linux >= 4.0) VmHWM is the whole process's peak.
        rss = {"rss_before_mib": rss_before["VmRSS"], "peak_rss_mib": rss_status()["VmHWM"],
               "peak_rss_loop_only": hwm_reset}
        if device.type == "cuda":
            rss["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        number = args.warmup + args.steps
        if memory_steps:  # after the timed steps: the tracker slows every op down
            for tensor in [*model.parameters(), *model.buffers(),
                           *(teacher.parameters() if teacher is not None else ()),
                           *(t for s in run.optimizer.state.values() for t in s.values()
                             if isinstance(t, torch.Tensor))]:
                tracker.track(tensor)
            baseline = tracker.live
            for _ in range(memory_steps):
                batch = next(batches)
                number += 1
                for tensor in batch_tensors(batch):
                    tracker.track(tensor)
                with tracker:
                    step(batch, number)
                del batch
            rss["tracked_peak_mib"] = tracker.peak / MIB
            rss["tracked_static_mib"] = baseline / MIB
        if args.profile_steps:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    number += 1
                    step(next(batches), number)
            profile_rows = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                     row_limit=25)
    if profile_rows:
        (Path(args.out) / f"profile-{arm}.txt").write_text(profile_rows, encoding="utf-8")
    seconds = sum(times)
    return {"arm": arm, "steps": args.steps, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "median_step_s": statistics.median(times),
            # CPU time of training, robust to other processes competing for the cores: the
            # main thread's with one torch thread (all compute runs there), else the whole
            # process's (loader thread included). Meaningless on CUDA (asynchronous kernels).
            "thread_seconds": thread_seconds, "process_seconds": process_seconds,
            "tokens_per_cpu_s": None if device.type == "cuda" else tokens / (
                thread_seconds if torch.get_num_threads() == 1 else process_seconds),
            "first_steps": first_steps[:3], **rss,
            "student_parameters": sum(p.numel() for p in model.parameters()),
            "teacher_parameters": (sum(p.numel() for p in teacher.parameters())
                                   if teacher is not None else None)}


# --- the parent: run every arm, compare, report -----------------------------------------------

def environment(device: str) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = resolve_device(device).type == "cuda"
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg(),
            "accelerator": torch.cuda.get_device_name() if cuda else "CPU only"}


def write_student_config(args: argparse.Namespace) -> None:
    heads = max(args.hidden // 64, 1)
    spec = {"model_type": "llama", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": open_cache(args.cache).manifest.max_length,
            "tie_word_embeddings": True}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "student_config.json").write_text(json.dumps(spec, indent=1) + "\n",
                                                        encoding="utf-8")


def run_arm_subprocess(arm: str, round_: int, args: argparse.Namespace) -> dict[str, Any]:
    result_path = Path(args.out) / f"arm-{arm}-{round_}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", arm,
               "--worker-result", str(result_path)]
    print(f"[round {round_}] {arm} ...", flush=True)
    subprocess.run(command, check=True)
    return json.loads(result_path.read_text(encoding="utf-8"))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median tokens/s over rounds, largest peak memory, ratios to the ce arm."""
    summary: dict[str, Any] = {}
    for arm, results in runs.items():
        row: dict[str, Any] = {"tokens_per_s": statistics.median(r["tokens_per_s"]
                                                                 for r in results),
                               "tokens_per_s_rounds": [r["tokens_per_s"] for r in results]}
        if results[0].get("tokens_per_cpu_s") is not None:
            row["tokens_per_cpu_s"] = statistics.median(r["tokens_per_cpu_s"] for r in results)
        for key in ("tracked_peak_mib", "peak_rss_mib", "peak_allocated_mib", "rss_before_mib",
                    "tracked_static_mib"):
            if results[0].get(key) is not None:
                row[key] = max(r[key] for r in results)
        if "first_steps" in results[0]:
            row["step1"] = results[0]["first_steps"][0]
        summary[arm] = row
    ce = summary.get("ce", {})
    for row in summary.values():
        for key in ("tokens_per_s", "tokens_per_cpu_s", "tracked_peak_mib", "peak_rss_mib",
                    "peak_allocated_mib"):
            if key in row:
                row[f"{key}_vs_ce"] = ratio(row[key], ce.get(key))
    if "loader" in summary and "kd" in summary:
        summary["loader"]["vs_kd_training"] = ratio(summary["loader"]["tokens_per_s"],
                                                    summary["kd"]["tokens_per_s"])
    return summary


def goals(summary: dict[str, Any]) -> list[tuple[str, float | None, bool | None]]:
    kd = summary.get("kd", {})
    memory_key = "peak_allocated_mib" if "peak_allocated_mib" in kd else "tracked_peak_mib"
    dense = summary.get("dense-ce", {})
    speed_key = "tokens_per_s" if dense.get("tokens_per_cpu_s") is None else "tokens_per_cpu_s"
    checks = [("throughput kd / ce >= 0.95 (wall clock)", kd.get("tokens_per_s_vs_ce"), 0.95,
               True),
              ("throughput kd / ce >= 0.95 (CPU time)", kd.get("tokens_per_cpu_s_vs_ce"), 0.95,
               True),
              (f"peak memory kd / ce <= 1.05 ({memory_key})", kd.get(f"{memory_key}_vs_ce"),
               1.05, False),
              (f"chunked CE head: ce / dense-ce >= 1.0 ({speed_key})",
               ratio(summary.get("ce", {}).get(speed_key), dense.get(speed_key)), 1.0, True),
              ("loader / kd training >= 20", summary.get("loader", {}).get("vs_kd_training"),
               20.0, True)]
    return [(name, value, None if value is None else (value >= bound if at_least
                                                      else value <= bound))
            for name, value, bound, at_least in checks]


def fmt_load(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def markdown(summary: dict[str, Any], env: dict[str, Any], command: str) -> str:
    def fmt(value: Any, spec: str = ".0f") -> str:
        return "–" if value is None else format(value, spec)

    lines = [f"`{command}`", "",
             f"Machine: {env['nproc']} cores ({env['cpu']}), {env['accelerator']}, torch "
             f"{env['torch']} ({env['torch_threads']} threads), transformers "
             f"{env['transformers']}, Python {env['python']}. Load average (1, 5, 15 min) "
             f"before {fmt_load(env['load_average_before'])}, after "
             f"{fmt_load(env['load_average_after'])}.", "",
             "| arm | tokens/s | vs ce | tokens/CPU-s | vs ce | peak tensors MiB | vs ce "
             "| peak RSS MiB | vs ce | step-1 CE | step-1 KD |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ("ce", "kd", "online", "dense-ce"):
        if arm not in summary:
            continue
        r = summary[arm]
        peak = r.get("peak_allocated_mib", r.get("tracked_peak_mib"))
        peak_ratio = r.get("peak_allocated_mib_vs_ce", r.get("tracked_peak_mib_vs_ce"))
        step1 = r.get("step1", {})
        lines.append(f"| {arm} | {fmt(r['tokens_per_s'])} | {fmt(r['tokens_per_s_vs_ce'], '.3f')}"
                     f" | {fmt(r.get('tokens_per_cpu_s'))}"
                     f" | {fmt(r.get('tokens_per_cpu_s_vs_ce'), '.3f')}"
                     f" | {fmt(peak, '.1f')} | {fmt(peak_ratio, '.3f')}"
                     f" | {fmt(r.get('peak_rss_mib'))} | {fmt(r.get('peak_rss_mib_vs_ce'), '.3f')}"
                     f" | {fmt(step1.get('ce'), '.4f')}"
                     f" | {fmt(step1.get('kd') if arm in ('kd', 'online') else None, '.4f')} |")
    if "loader" in summary:
        r = summary["loader"]
        lines.append(f"| loader (no model) | {fmt(r['tokens_per_s'])} | – | – | – | – | – "
                     f"| {fmt(r.get('peak_rss_mib'))} | – | – | – |")
    lines += ["", "tokens/s: real target tokens per second over the timed steps (loader waits "
              "included), median over rounds. tokens/CPU-s: the same over training's CPU time "
              "(the main thread's with --threads 1, else the process's), which other processes "
              "competing for the cores do not inflate. Peak tensors: "
              + ("torch.cuda.max_memory_allocated." if "peak_allocated_mib" in summary.get(
                  "ce", {}) else "peak of live tensor storage bytes (TorchDispatchMode "
                 "tracker) over the memory steps.")
              + " Peak RSS: the arm's own process over the timed steps. Step-1 CE/KD: the "
              "first step's per-token means (same init and batch in every arm).",
              "", "| goal | measured | met |", "|---|---:|---|"]
    for name, value, met in goals(summary):
        lines.append(f"| {name} | {fmt(value, '.3f')} | "
                     f"{'–' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="Teacher cache (kdpipe cache-teacher).")
    p.add_argument("--teacher", help="The cache's teacher, for the online arm (omit: skip it).")
    p.add_argument("--tokenizer", help="Default: the cache manifest's tokenizer.")
    p.add_argument("--out", default="runs/bench-train-student")
    p.add_argument("--arms", default=",".join(ARMS), help=f"Subset of {','.join(ARMS)}.")
    p.add_argument("--rounds", type=int, default=1,
                   help="Run every arm this many times, interleaved (median tokens/s).")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--loss", default="forward")
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--shuffle-window", type=int, default=16,
                   help="As train-student's: row groups shuffled together and kept decoded.")
    p.add_argument("--prefetch", type=int, default=4, help="As train-student's.")
    p.add_argument("--loader-workers", type=int, default=0, help="As train-student's.")
    p.add_argument("--snapshots", action=argparse.BooleanOptionalAction, default=True,
                   help="Per-sample statistics as train-student collects them by default.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    p.add_argument("--steps", type=int, default=30, help="Timed optimizer steps per arm.")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="CPU: extra steps under the tensor-memory tracker (0: skip).")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="Extra steps under torch.profiler; top ops to OUT/profile-ARM.txt.")
    p.add_argument("--loader-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = run_loader(args) if args.worker == "loader" else run_training(args, args.worker)
        Path(args.worker_result).write_text(json.dumps(result, indent=1), encoding="utf-8")
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if "online" in arms and not args.teacher:
        print("no --teacher: skipping the online arm")
        arms.remove("online")
    write_student_config(args)
    env = environment(args.device)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        for arm in arms:
            runs[arm].append(run_arm_subprocess(arm, round_, args))
    env["load_average_after"] = os.getloadavg()  # other processes compete for the cores
    summary = summarise(runs)
    command = "python benchmarks/train_student.py " + " ".join(sys.argv[1:])
    table = markdown(summary, env, command)
    out = Path(args.out)
    (out / "train_student.json").write_text(json.dumps(
        {"command": command, "environment": env, "args": vars(args), "summary": summary,
         "goals": goals(summary), "runs": runs}, indent=1), encoding="utf-8")
    (out / "train_student.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
