"""kdpipe on one GPU, in one call: the figures a GPU machine lent for a few minutes must give.

    benchmarks/gpu/run.sh                  # on the GPU machine: writes $OUT (or --out)
    benchmarks/gpu/run.sh --cpu-smoke      # anywhere: the same steps at toy sizes, on CPU

Builds, with random weights and V = 128,256 (Llama 3's vocabulary, a WordLevel tokenizer of
that many tokens over a Zipf-distributed synthetic corpus):
a Llama-style teacher of ~1.1B parameters and a student of ~155M (the student is
benchmarks/train_student.py's, `--hidden 768 --layers 8`). Then, in bf16 on CUDA:

* P1: `cache-teacher` tokens/s against a bare `model(...)` forward over the same batches
  (the stage's time includes loading the teacher and writing shards: conservative);
* P3, P4: train-student KD against CE-only, tokens/s and `torch.cuda.max_memory_allocated`
  (benchmarks/train_student.py's ce and kd arms, each in its own process);
* the loader alone at 32 sequences per step with `--loader-workers`, against the 262,144
  tokens/s a GPU consumes at 32 × 4,096 tokens per step and 2 steps/s;
* the fused KD head against the checkpointed autograd path (benchmarks/fused_head.py);
* the GPU-marked tests (`pytest -m gpu`).

Writes gpu_bench.json and gpu_bench.md to --out, and each step's own files beside them.
A step that fails is recorded with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.pipeline.corpus import iter_documents, resolve_sources
from kdpipe.pipeline.sequences import iter_sequences
from kdpipe.pipeline.teacher_hf import load_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.tokenizer_identity import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
GPU_STEP_TOKENS_PER_S = 32 * 4096 * 2  # what one GPU consumes (issue's reference rate)


@dataclass(frozen=True)
class Sizes:
    vocab: int
    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    seq_len: int
    sequences: int
    cache_batch: int
    train_batch: int
    train_steps: int
    top_k: int


SIZES = {
    "gpu": Sizes(vocab=128_256, teacher_hidden=2048, teacher_layers=12, student_hidden=768,
                 student_layers=8, seq_len=2048, sequences=512, cache_batch=16,
                 train_batch=16, train_steps=30, top_k=64),
    "cpu-smoke": Sizes(vocab=512, teacher_hidden=64, teacher_layers=2, student_hidden=64,
                       student_layers=1, seq_len=64, sequences=48, cache_batch=8,
                       train_batch=4, train_steps=2, top_k=8),
}


def build_tokenizer(vocab: int, out: Path) -> Path:
    """A WordLevel tokenizer of exactly `vocab` ids, tokens `t0`…: the cache's vocabulary is
    then that of a real 128k-token teacher, with no tokenizer training."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0",
                                   eos_token="t1")
    fast.save_pretrained(out)
    return out


def write_corpus(sizes: Sizes, out: Path) -> Path:
    """Documents of `seq_len` tokens drawn from a Zipf law (a real LM's token frequencies)."""
    rng = np.random.default_rng(0)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(sizes.sequences):
            ids = (rng.zipf(1.2, size=sizes.seq_len) - 1) % sizes.vocab
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")
    return out


def build_teacher(sizes: Sizes, tokenizer: Path, out: Path, device: torch.device,
                  dtype: torch.dtype) -> int:
    """A random Llama-style teacher saved as safetensors; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden = sizes.teacher_hidden
    config = LlamaConfig(vocab_size=sizes.vocab, hidden_size=hidden,
                         intermediate_size=int(hidden * 8 / 3) // 256 * 256 or 4 * hidden,
                         num_hidden_layers=sizes.teacher_layers,
                         num_attention_heads=max(hidden // 128, 2),
                         num_key_value_heads=max(hidden // 256, 1),
                         max_position_embeddings=sizes.seq_len + 8, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if dtype == torch.bfloat16:
        model.bfloat16()
    with torch.no_grad():  # a random head is near-uniform: widen it so top-k and tails matter
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def bare_forward_seconds(cfg: CacheTeacherConfig, device: torch.device, dtype: torch.dtype
                         ) -> tuple[float, int]:
    """The teacher's forward alone over the stage's own batches (same order, same sizes)."""
    tokenizer = load_tokenizer(cfg.teacher_model, False, "--teacher")
    seqs = [s.ids for s in iter_sequences(iter_documents(resolve_sources(cfg.data)), tokenizer,
                                          cfg.max_length, cfg.layout)]
    model = load_teacher(cfg.teacher_model, device, dtype, False)
    elapsed, tokens = 0.0, 0
    for start in range(0, len(seqs), cfg.shard_size):
        shard = sorted(seqs[start:start + cfg.shard_size], key=len, reverse=True)
        for b in range(0, len(shard), cfg.batch_size):
            batch = shard[b:b + cfg.batch_size]
            ids = torch.zeros((len(batch), len(batch[0])), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            _sync(device)
            began = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().item()
            _sync(device)
            elapsed += time.perf_counter() - began
            tokens += int(mask.sum())
    del model
    return elapsed, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_step(sizes: Sizes, work: Path, device: torch.device, dtype: torch.dtype,
               teacher: Path, corpus: Path) -> dict[str, Any]:
    cfg = CacheTeacherConfig.from_options(
        teacher=str(teacher), data=[str(corpus)], out=work / "cache", max_length=sizes.seq_len,
        top_k=sizes.top_k, batch_size=sizes.cache_batch, device=device.type,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32", progress=False,
        overwrite=True)
    forward_s, tokens = bare_forward_seconds(cfg, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    cache_teacher(cfg)
    stage_s = time.perf_counter() - began
    shards = open_cache(cfg.out).manifest.shards
    cached = sum(s.tokens for s in shards)
    result = {"tokens": tokens, "bare_forward_s": forward_s, "stage_s": stage_s,
              "bare_forward_tokens_per_s": tokens / forward_s,
              "stage_tokens_per_s": cached / stage_s,
              "P1_stage_over_forward": (cached / stage_s) / (tokens / forward_s),
              "bytes_per_token": sum(s.bytes for s in shards) / cached}
    if device.type == "cuda":
        result["stage_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def train_student_step(sizes: Sizes, work: Path, device: torch.device, arms: str,
                       extra: list[str]) -> dict[str, Any]:
    """benchmarks/train_student.py's arms, each in its own process; its summary back."""
    out = work / f"train-{arms.replace(',', '-')}"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_student.py"),
               "--cache", str(work / "cache"), "--out", str(out), "--arms", arms,
               "--hidden", str(sizes.student_hidden), "--layers", str(sizes.student_layers),
               "--batch-size", str(sizes.train_batch), "--steps", str(sizes.train_steps),
               "--warmup", "2", "--device", device.type, *extra]
    subprocess.run(command, check=True, cwd=ROOT)
    report = json.loads((out / "train_student.json").read_text(encoding="utf-8"))
    return {"command": " ".join(command[1:]), "summary": report["summary"],
            "goals": report["goals"]}


def fused_step(sizes: Sizes, work: Path, device: torch.device) -> dict[str, Any]:
    """benchmarks/fused_head.py: the head and loss alone, fused against the checkpointed
    autograd path, at the student's width and the cache's vocabulary."""
    out = work / "fused"
    tokens = 16 * sizes.seq_len if device.type == "cuda" else 4 * sizes.seq_len
    command = [sys.executable, str(ROOT / "benchmarks" / "fused_head.py"),
               "--device", device.type, "--vocab", str(sizes.vocab),
               "--hidden", str(sizes.student_hidden), "--top-k", str(sizes.top_k),
               "--tokens", str(tokens), "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT)
    results = json.loads((out / "fused_head.json").read_text(encoding="utf-8"))["results"]
    return {"command": " ".join(command[1:]), "results": results,
            "speedup": {loss: r["fused"]["tokens_per_s"] / r["checkpointed"]["tokens_per_s"]
                        for loss, r in results.items()}}


def gpu_tests(work: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "--basetemp", str(work / "pytest"), "tests/test_packing.py",
               "tests/pipeline/test_vllm_gpu.py"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "",
            "tail": lines[-15:]}


def run_step(results: dict[str, Any], name: str, step: Callable[[], Any]) -> None:
    """Run one step; record its result, or its error, and go on."""
    began = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = step()
    except Exception as exc:  # every other step still runs: GPU minutes are scarce
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
    results[name + "_seconds"] = round(time.perf_counter() - began, 1)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def markdown(results: dict[str, Any]) -> str:
    def get(step: str, *keys: str) -> Any:
        value: Any = results.get(step, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def show(value: Any, fmt: str = "{:,.3g}") -> str:
        return "–" if value is None else fmt.format(value) if isinstance(value, float) \
            else str(value)

    rows = [
        ("P1 cache-teacher / bare forward (tokens/s)", get("cache", "P1_stage_over_forward")),
        ("cache-teacher tokens/s", get("cache", "stage_tokens_per_s")),
        ("bare forward tokens/s", get("cache", "bare_forward_tokens_per_s")),
        ("P3 KD / CE tokens/s", get("train", "summary", "kd", "tokens_per_s_vs_ce")),
        ("P4 KD / CE peak memory (max_memory_allocated; CPU: tracked tensors)",
         get("train", "summary", "kd", "peak_allocated_mib_vs_ce")
         or get("train", "summary", "kd", "tracked_peak_mib_vs_ce")),
        ("loader target tokens/s", get("loader", "summary", "loader", "tokens_per_s")),
        ("loader / GPU rate (goal ≥ 5)", get("loader_vs_gpu_rate")),
        ("fused / checkpointed head, forward KL τ=1 (tokens/s)",
         get("fused", "speedup", "forward τ=1")),
        ("fused / checkpointed head, CE (tokens/s)", get("fused", "speedup", "ce")),
        ("GPU-marked tests", get("gpu_tests", "summary")),
    ]
    env = results["environment"]
    lines = [f"kdpipe GPU benchmark, {env.get('date')}, {env.get('gpu', 'CPU (smoke)')}, torch "
             f"{env['torch']}; sizes {results['mode']}.", "", "| figure | value |",
             "|---|---:|"]
    lines += [f"| {name} | {show(value)} |" for name, value in rows]
    errors = [f"* {name}: {value['error']}" for name, value in results.items()
              if isinstance(value, dict) and "error" in value]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="toy sizes on CPU in float32: checks every step runs (CI)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    sizes = SIZES[mode]
    if mode == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu bench: no CUDA device here; run with --cpu-smoke to check the steps")
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    dtype = torch.bfloat16 if mode == "gpu" else torch.float32
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"mode": mode, "sizes": asdict(sizes),
                               "environment": environment(device)}
    tokenizer = build_tokenizer(sizes.vocab, work / "tokenizer")
    corpus = write_corpus(sizes, work / "corpus.jsonl")
    teacher = work / "teacher"
    run_step(results, "teacher_params",
             lambda: build_teacher(sizes, tokenizer, teacher, device, dtype))
    run_step(results, "cache", lambda: cache_step(sizes, work, device, dtype, teacher, corpus))
    run_step(results, "train", lambda: train_student_step(sizes, work, device, "ce,kd", []))
    run_step(results, "loader", lambda: train_student_step(
        sizes, work, device, "loader",
        ["--loader-workers", "4" if mode == "gpu" else "1", "--loader-epochs", "2"]))
    rate = results.get("loader", {}).get("summary", {}).get("loader", {}).get("tokens_per_s")
    results["loader_vs_gpu_rate"] = rate / GPU_STEP_TOKENS_PER_S if rate else None
    run_step(results, "fused", lambda: fused_step(sizes, work, device))
    run_step(results, "gpu_tests", lambda: gpu_tests(work))
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str) + "\n",
                                        encoding="utf-8")
    table = markdown(results)
    (out / "gpu_bench.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
