"""Stage 1, `kdpipe cache-teacher`: corpus -> teacher -> Parquet shards + manifest.

Idempotent and crash-safe: every shard is written under a temporary name and renamed, the
manifest is replaced atomically after each shard, and re-running the same command resumes
(complete shards whose checksum holds are kept). Different settings into an existing cache are
refused unless `overwrite` is set (`cache_dir`).

Two teacher backends fill the same shards: `hf` (transformers, full logits: exact tails and
entropy) and `vllm` (GPU, top-k prompt log-probs: see `teacher_vllm`). With `num_workers > 1`
this run is one worker of many over the same corpus (see `workers`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdpipe.pipeline import teacher_vllm, workers
from kdpipe.pipeline.cache_dir import (
    prepare_out,
    previous_manifest,
    record_progress,
    resumable_shards,
    reusable_shard,
    shards_intact,
)
from kdpipe.pipeline.corpus import CorpusStats, corpus_fingerprint, iter_documents, resolve_sources
from kdpipe.pipeline.sequences import iter_sequences
from kdpipe.pipeline.shard_stream import in_background, shard_groups
from kdpipe.pipeline.shard_writer import shard_name, write_shard
from kdpipe.pipeline.teacher_hf import (
    SequenceTargets,
    load_teacher,
    resolve_dtype,
    teacher_targets,
)
from kdpipe.pipeline.teacher_info import describe_teacher, teacher_head_width
from kdpipe.schemas.encoding import CACHE_MODES, ENCODINGS, MAX_SAMPLES
from kdpipe.schemas.errors import ConfigError, NonFiniteError, check_finite, choice_problems
from kdpipe.schemas.manifest import CacheManifest, CorpusInfo, ShardInfo, write_manifest
from kdpipe.schemas.shard import LOGPROB_DTYPES, id_dtype_for_vocab
from kdpipe.schemas.vocab import compare_vocab, real_vocab_size
from kdpipe.tokenizer_identity import describe as describe_tokenizer
from kdpipe.tokenizer_identity import load_tokenizer, save_tokenizer
from kdpipe.torch_runtime import resolve_device

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")
# One shard's (sample ids, sequences) -> their targets; updates the progress bar by the tokens
# it computed.
TeacherRunner = Callable[[list[int], list[list[int]], tqdm], list[SequenceTargets]]


@dataclass(frozen=True)
class CacheTeacherConfig:
    """Every option of `kdpipe cache-teacher`, with its default."""

    teacher: str
    data: tuple[str, ...]
    out: Path
    tokenizer: str | None = None
    backend: str = "hf"  # "auto" picks vllm on a GPU machine with vLLM installed
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    top_k: int = 64
    max_length: int = 512
    pack: bool = False
    add_special_tokens: bool = True  # encode as the tokenizer does: a BOS where it adds one
    shard_size: int = 1024
    text_field: str = "text"
    split: str | None = "train"
    tail_temperatures: tuple[float, ...] = field(default_factory=tuple)
    logprob_dtype: str = "float16"
    encoding: str = "plain"  # "compact": quantised log-probs, delta-coded ids (encoding.py)
    cache_mode: str = "topk"  # "sampled": `samples` teacher draws per position (hf only)
    samples: int = 50
    sample_seed: int = 0
    strict: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_tokenizer_mismatch: bool = False  # --tokenizer may map ids unlike the teacher's own
    num_workers: int = 1
    worker_index: int = 0
    gpu_memory_utilization: float = 0.9  # vLLM: share of each GPU for weights + KV cache
    tensor_parallel_size: int = 1  # vLLM: GPUs one teacher is split over
    progress: bool = True

    @property
    def layout(self) -> str:
        return "packed" if self.pack else "document"

    def validate(self) -> None:
        """Raise one ConfigError listing every invalid option."""
        check_finite(self, "cache-teacher")
        problems = []
        if not self.data:
            problems.append("--data is required (a file, folder, glob or dataset name)")
        problems += choice_problems("--backend", self.backend, BACKENDS)
        if self.backend == "vllm" and self.tail_temperatures:
            problems.append("--tail-temperatures needs --backend hf: vLLM returns only top-k "
                            "log-probs, so exact tempered tails cannot be computed (without "
                            "them the trainer uses the uniform-tail approximation)")
        if self.backend == "vllm" and self.device not in ("auto", "cuda"):
            problems.append(f"--device {self.device} with --backend vllm: vLLM uses the GPUs "
                            "CUDA_VISIBLE_DEVICES shows; leave --device at auto")
        if self.num_workers < 1:
            problems.append(f"--num-workers must be >= 1 (got {self.num_workers})")
        elif not 0 <= self.worker_index < self.num_workers:
            problems.append(f"--worker-index must be in 0..{self.num_workers - 1} for "
                            f"--num-workers {self.num_workers} (got {self.worker_index})")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append("--gpu-memory-utilization must be in (0, 1] "
                            f"(got {self.gpu_memory_utilization})")
        if self.tensor_parallel_size < 1:
            problems.append(f"--tensor-parallel-size must be >= 1 (got "
                            f"{self.tensor_parallel_size})")
        if self.top_k < 1:
            problems.append(f"--top-k must be >= 1 (got {self.top_k})")
        if self.max_length < 2:
            problems.append(f"--max-length must be >= 2 so a sequence has a target "
                            f"(got {self.max_length})")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.shard_size < 1:
            problems.append(f"--shard-size must be >= 1 (got {self.shard_size})")
        if any(t <= 0 for t in self.tail_temperatures):
            problems.append(f"--tail-temperatures must be > 0 (got {self.tail_temperatures})")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            problems.append(f"--logprob-dtype must be one of {', '.join(LOGPROB_DTYPES)}")
        if self.encoding not in ENCODINGS:
            problems.append(f"--encoding must be one of {', '.join(ENCODINGS)} "
                            f"(got {self.encoding!r})")
        if self.cache_mode not in CACHE_MODES:
            problems.append(f"--cache-mode must be one of {', '.join(CACHE_MODES)} "
                            f"(got {self.cache_mode!r})")
        if self.cache_mode == "sampled":
            if not 1 <= self.samples <= MAX_SAMPLES:
                problems.append(f"--samples must be in 1..{MAX_SAMPLES} (got {self.samples})")
            if self.backend == "vllm":
                problems.append("--cache-mode sampled needs --backend hf: drawing from the "
                                "teacher's distribution needs its full logits")
            if self.tail_temperatures:
                problems.append("--tail-temperatures applies to top-k caches; drop it with "
                                "--cache-mode sampled")
            if self.encoding != "plain":
                problems.append("--encoding compact applies to top-k caches; drop it with "
                                "--cache-mode sampled")
        if self.out.exists() and not self.out.is_dir():
            problems.append(f"--out {self.out} is a file; give a folder for the cache")
        if problems:
            raise ConfigError("; ".join(problems))


def cache_teacher(cfg: CacheTeacherConfig) -> CacheManifest:
    """Run the whole stage; returns the finished manifest (a worker: its part, or the merge)."""
    cfg.validate()
    backend = resolve_backend(cfg)
    if backend == "hf" and cfg.tensor_parallel_size > 1:
        raise ConfigError("--tensor-parallel-size splits a teacher over GPUs with vLLM only; "
                          "pass --backend vllm on a GPU machine with vLLM installed")
    sources = resolve_sources(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher, cfg.trust_remote_code,
                               flag="--tokenizer" if cfg.tokenizer else "--teacher")
    teacher_info, model_config = describe_teacher(cfg.teacher, backend, cfg.dtype,
                                                  cfg.trust_remote_code)
    if cfg.tokenizer:
        _check_teachers_own_tokenizer(cfg, tokenizer)
    head_width = teacher_head_width(model_config)
    vocab_size = real_vocab_size(tokenizer)  # the support of every cached distribution
    _check_against_model(cfg, vocab_size, head_width, model_config)
    device = torch.device("cuda") if backend == "vllm" else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    teacher_info = replace(teacher_info, dtype=str(dtype).removeprefix("torch."))
    vllm = backend == "vllm"
    draft = CacheManifest(
        teacher=teacher_info,
        tokenizer=describe_tokenizer(cfg.tokenizer or cfg.teacher, tokenizer, vocab_size),
        corpus=CorpusInfo(sources=tuple(sources), text_field=cfg.text_field, split=cfg.split,
                          fingerprint=corpus_fingerprint(sources, cfg.text_field, cfg.split),
                          documents_read=0, documents_skipped=0),
        vocab_size=vocab_size, teacher_head_width=head_width, top_k=cfg.top_k,
        max_length=cfg.max_length, layout=cfg.layout,
        add_special_tokens=cfg.add_special_tokens, shard_size=cfg.shard_size,
        id_dtype=id_dtype_for_vocab(vocab_size),
        logprob_dtype=cfg.logprob_dtype, capture_temperature=1.0,
        tail_temperatures=tuple(cfg.tail_temperatures),
        tail_mode="uniform" if vllm else "exact",
        entropy_mode=teacher_vllm.ENTROPY_MODE if vllm else "exact",
        encoding=cfg.encoding, cache_mode=cfg.cache_mode,
        samples=cfg.samples if cfg.cache_mode == "sampled" else 0,
        sample_seed=cfg.sample_seed if cfg.cache_mode == "sampled" else 0,
        settings_fingerprint="", complete=False,
    ).with_fingerprint()
    previous = previous_manifest(cfg, draft)
    if previous is not None and previous.complete and shards_intact(cfg.out, previous):
        log.info("%s is already a complete cache with these settings; nothing to do", cfg.out)
        return previous
    kept = resumable_shards(cfg, draft, previous)

    # Read up to the first shard before loading the teacher or touching --out, so corpus
    # errors (missing field, empty corpus) cost seconds and leave nothing behind.
    stats = CorpusStats()
    documents = iter_documents(sources, cfg.text_field, cfg.split, cfg.strict, stats)
    sequences = iter_sequences(documents, tokenizer, cfg.max_length, cfg.layout,
                               add_special_tokens=cfg.add_special_tokens)
    shard_stream = in_background(shard_groups(sequences, cfg.shard_size))
    first_shard = next(shard_stream, None)
    if first_shard is None:
        raise ConfigError(f"--data {' '.join(cfg.data)}: no sequence of at least 2 tokens; "
                          "the corpus is empty or every document is too short")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run_teacher = _teacher_runner(cfg, backend, device, dtype, pad_id, vocab_size,
                                  model_config)
    prepare_out(cfg, draft, fresh=kept is None)
    save_tokenizer(tokenizer, cfg.out)
    kept = kept or {}
    manifest = replace(draft, shards=())
    record_progress(cfg, manifest)

    progress = tqdm(desc="cache-teacher", unit="tok", unit_scale=True, dynamic_ncols=True,
                    disable=not cfg.progress)
    started = time.perf_counter()
    computed_tokens = stream_shards = stream_sequences = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        pending: Future[ShardInfo] | None = None
        for index, (sample_ids, seqs) in enumerate(chain([first_shard], shard_stream)):
            stream_shards, stream_sequences = index + 1, stream_sequences + len(seqs)
            if not workers.owns_shard(index, cfg.num_workers, cfg.worker_index):
                continue  # another worker's shard: its sequences only advance the sample ids
            name = shard_name(index)
            reused = reusable_shard(cfg.out, kept.get(name), sample_ids, seqs)
            tokens = sum(len(s) for s in seqs)
            if reused is not None:
                manifest = manifest.with_shard(reused)
                record_progress(cfg, manifest)
                progress.update(tokens)
                continue
            try:
                targets = run_teacher(sample_ids, seqs, progress)
                _refuse_nonfinite(sample_ids, targets, dtype)
            except BaseException:
                if pending is not None:  # the shard before is finished: keep it for a resume
                    record_progress(cfg, manifest.with_shard(pending.result()))
                raise
            computed_tokens += tokens
            if pending is not None:
                manifest = manifest.with_shard(pending.result())
                record_progress(cfg, manifest)
            pending = writer.submit(write_shard, cfg.out / name, draft.shard_layout, sample_ids,
                                    seqs, targets)
        if pending is not None:
            manifest = manifest.with_shard(pending.result())
    progress.close()
    corpus = replace(manifest.corpus, documents_read=stats.documents_read,
                     documents_skipped=stats.documents_skipped)
    manifest = replace(manifest, corpus=corpus, complete=True)
    elapsed = time.perf_counter() - started
    log.info("cached %d sequences, %d tokens in %d shards (%d tokens computed, %.0f tok/s) "
             "-> %s", manifest.num_sequences, manifest.num_tokens, len(manifest.shards),
             computed_tokens, computed_tokens / max(elapsed, 1e-9), cfg.out)
    if cfg.num_workers == 1:
        write_manifest(cfg.out, manifest)
        return manifest
    part = workers.finished_part(manifest, cfg.worker_index, cfg.num_workers, stream_shards,
                                 stream_sequences)
    record_progress(cfg, part)
    merged = workers.try_merge(cfg.out, cfg.num_workers)
    if merged is None:
        log.info("worker %d of %d finished; the last worker to finish merges the manifest",
                 cfg.worker_index, cfg.num_workers)
    return merged if merged is not None else part


def resolve_backend(cfg: CacheTeacherConfig) -> str:
    """The backend this run uses; `auto` is vLLM when it is installed and a GPU is visible.

    `auto` keeps hf when exact tempered tails are asked for (only full logits give them) or a
    device other than the default GPU is named.
    """
    if cfg.backend == "vllm":
        teacher_vllm.require_vllm()
        return "vllm"
    if (cfg.backend == "hf" or cfg.tail_temperatures or cfg.cache_mode == "sampled"
            or cfg.device not in ("auto", "cuda")):
        return "hf"
    if teacher_vllm.vllm_importable() and teacher_vllm.cuda_available():
        log.info("--backend auto: vLLM is installed and a GPU is visible; using vLLM")
        return "vllm"
    return "hf"


def _teacher_runner(cfg: CacheTeacherConfig, backend: str, device: torch.device,
                    dtype: torch.dtype, pad_id: int, vocab_size: int,
                    model_config: Any) -> TeacherRunner:
    """Load the teacher once; the runner turns one shard's sequences into targets."""
    if backend == "vllm":
        text_config = (model_config.get_text_config()
                       if hasattr(model_config, "get_text_config") else model_config)
        limit = getattr(text_config, "max_position_embeddings", None)
        teacher = teacher_vllm.load_vllm_teacher(
            cfg.teacher, top_k=cfg.top_k, vocab_size=vocab_size, max_length=cfg.max_length,
            position_limit=limit if isinstance(limit, int) else None,
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            trust_remote_code=cfg.trust_remote_code)

        def run_vllm(sample_ids: list[int], seqs: list[list[int]], progress: tqdm
                     ) -> list[SequenceTargets]:
            targets = teacher.targets(seqs)  # the whole shard in one generate call
            progress.update(sum(len(s) for s in seqs))
            return targets

        return run_vllm
    model = load_teacher(cfg.teacher, device, dtype, cfg.trust_remote_code)
    return lambda sample_ids, seqs, progress: _run_teacher(model, seqs, cfg, pad_id, progress,
                                                           sample_ids, vocab_size)


def _refuse_nonfinite(sample_ids: list[int], targets: list[SequenceTargets],
                      dtype: torch.dtype) -> None:
    """Stop at the first NaN or infinity a cache must not hold (`schemas.shard.first_invalid`),
    before its shard is written: a NaN teacher log-prob would silently zero the KD term."""
    for sample_id, target in zip(sample_ids, targets, strict=True):
        found = target.first_invalid()
        if found is None:
            continue
        column, position, value = found
        where = f"sample {sample_id}" + (f", target position {position}" if position is not None
                                         else "")
        remedy = {torch.float16: "float16 logits overflow: re-run with --dtype bfloat16 or "
                                 "--dtype float32",
                  torch.bfloat16: "re-run with --dtype float32; if it persists, the teacher's "
                                  "weights hold NaN or infinity"}.get(
            dtype, "the teacher itself computes it: check its weights and config")
        raise NonFiniteError(f"the teacher's output is not finite ({column} = {value} at "
                             f"{where}, computed in {str(dtype).removeprefix('torch.')}); "
                             f"{remedy}. Finished shards are kept; the cache stays incomplete")


def _check_teachers_own_tokenizer(cfg: CacheTeacherConfig, tokenizer: Any) -> None:
    """--tokenizer must map ids as the tokenizer stored with the teacher does, if it has one:
    otherwise the teacher reads scrambled text, and nothing else would notice."""
    try:
        own = load_tokenizer(cfg.teacher, cfg.trust_remote_code, "--teacher")
    except ConfigError:
        return  # no tokenizer with the teacher: --tokenizer is how it gets one
    comparison = compare_vocab(own, tokenizer, real_vocab_size(own),
                               ("the teacher's own tokenizer", f"--tokenizer {cfg.tokenizer}"))
    if comparison.mismatch is None:
        if comparison.cosmetic or comparison.roles:
            log.warning("--tokenizer %s differs from the teacher's own tokenizer in %s (same "
                        "id-to-token mapping)", cfg.tokenizer,
                        ", ".join(comparison.cosmetic + comparison.roles))
        return
    if not cfg.allow_tokenizer_mismatch:
        raise ConfigError(f"--tokenizer {cfg.tokenizer} does not map ids as the teacher's own "
                          f"tokenizer ({cfg.teacher}) does ({comparison.mismatch}), so the "
                          "teacher would read scrambled text; drop --tokenizer, or pass "
                          "--allow-tokenizer-mismatch if the teacher was trained with it")
    log.warning("--allow-tokenizer-mismatch: caching with --tokenizer %s although %s",
                cfg.tokenizer, comparison.mismatch)


def _check_against_model(cfg: CacheTeacherConfig, vocab_size: int, head_width: int,
                         model_config: Any) -> None:
    if vocab_size > head_width:
        raise ConfigError(f"the tokenizer has {vocab_size} ids but the teacher's output head "
                          f"only {head_width} rows: pass the teacher's own tokenizer with "
                          "--tokenizer")
    if cfg.top_k > vocab_size:
        raise ConfigError(f"--top-k {cfg.top_k} exceeds the tokenizer's vocabulary "
                          f"({vocab_size} ids; the teacher's head has {head_width} rows)")
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the teacher's "
                          f"max_position_embeddings ({limit})")


def _run_teacher(model: Any, seqs: list[list[int]], cfg: CacheTeacherConfig, pad_id: int,
                 progress: tqdm, sample_ids: list[int], vocab_size: int
                 ) -> list[SequenceTargets]:
    """Teacher targets for one shard, batching sequences of similar length to cut padding.

    `sample_ids` seed each sequence's draws in a sampled cache; `vocab_size` real ids form the
    softmax (padding rows of the head are left out)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    results: list[SequenceTargets | None] = [None] * len(seqs)
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        outputs = teacher_targets(model, [seqs[i] for i in batch], cfg.top_k,
                                  cfg.tail_temperatures, pad_id,
                                  samples=cfg.samples if cfg.cache_mode == "sampled" else 0,
                                  sample_ids=[sample_ids[i] for i in batch],
                                  sample_seed=cfg.sample_seed, vocab_size=vocab_size)
        for i, out in zip(batch, outputs, strict=True):
            results[i] = out
        progress.update(sum(len(seqs[i]) for i in batch))
    return [r for r in results if r is not None]
