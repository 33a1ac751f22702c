"""Stage 1, `kdpipe cache-teacher`: corpus -> teacher -> Parquet shards + manifest.

Idempotent and crash-safe: every shard is written under a temporary name and renamed, the
manifest is replaced atomically after each shard, and re-running the same command resumes
(complete shards whose checksum holds are kept). A complete cache also holds its tokenizer
(`tokenizer/`, every file's sha256 in the manifest) and a dataset card (`README.md`,
`dataset_card`), so that the folder alone, copied or pushed to the Hugging Face Hub,
is all a student run needs. Different settings into an existing cache are
refused unless `overwrite` is set (`cache_dir`).

Two teacher backends fill the same shards: `hf` (transformers, full logits: exact tails and
entropy) and `vllm` (GPU, top-k prompt log-probs: see `teacher_vllm`). With `num_workers > 1`
this run is one worker of many over the same corpus (see `workers`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.packing import check_packing
from kdpipe.pipeline import teacher_vllm, workers
from kdpipe.pipeline.cache_config import CacheTeacherConfig
from kdpipe.pipeline.cache_dir import (
    files_intact,
    prepare_out,
    previous_manifest,
    record_progress,
    resumable_shards,
    reusable_shard,
)
from kdpipe.pipeline.cache_progress import (
    CacheProgress,
    DocumentCount,
    DocumentsDone,
    with_documents_done,
)
from kdpipe.pipeline.corpus import CorpusStats, corpus_fingerprint, resolve_sources
from kdpipe.pipeline.dataset_card import write_dataset_card
from kdpipe.pipeline.inputs import Reading, cache_sequences, resolve_reading
from kdpipe.pipeline.remote_out import fetch_data, run_into
from kdpipe.pipeline.sequences import TokenSequence, special_affixes
from kdpipe.pipeline.shard_stream import in_background, shard_groups
from kdpipe.pipeline.teacher_hf import (
    load_teacher,
    resolve_dtype,
    teacher_parts,
    teacher_targets,
)
from kdpipe.pipeline.teacher_info import describe_teacher, teacher_head_width
from kdpipe.progress import bars_shown, library_bars
from kdpipe.schemas.errors import ConfigError, NonFiniteError
from kdpipe.schemas.manifest import (
    DATASET_CARD_NAME,
    CacheManifest,
    CorpusInfo,
    ShardInfo,
    TeacherInfo,
    write_manifest,
)
from kdpipe.schemas.shard import id_dtype_for_vocab, shard_name
from kdpipe.schemas.shard_writer import SequenceTargets, write_shard
from kdpipe.schemas.vocab import compare_vocab, real_vocab_size
from kdpipe.tokenizer_identity import describe as describe_tokenizer
from kdpipe.tokenizer_identity import load_tokenizer, save_tokenizer
from kdpipe.torch_runtime import resolve_device

log = logging.getLogger(__name__)

# One shard's (sample ids, sequences) -> their targets; updates the progress by the tokens it
# computed.
# (sample ids, sequences, progress) -> the teacher's targets at each sequence's target positions
TeacherRunner = Callable[[list[int], list[TokenSequence], CacheProgress], list[SequenceTargets]]


def cache_teacher(cfg: CacheTeacherConfig) -> CacheManifest:
    """Run the whole stage; returns the finished manifest (a worker: its part, or the merge;
    with `merge`, the merge of the finished workers' parts alone)."""
    cfg.validate()
    with library_bars(bars_shown(cfg.progress)), \
            tempfile.TemporaryDirectory(prefix="kdpipe-data-") as data:  # --data URLs' copies
        cfg = replace(cfg, data=fetch_data(cfg.data, Path(data)))
        return run_into(cfg, _cache_teacher)


def _cache_teacher(cfg: CacheTeacherConfig, commit: Callable[[], None]) -> CacheManifest:
    """The stage in the local folder `cfg.out`; `commit()` after each file that is final
    (uploads it when --out is a URL: `remote_out`)."""
    if cfg.merge:
        return workers.merge_parts(cfg.out_dir, cfg.num_workers if cfg.num_workers > 1 else None)
    backend = resolve_backend(cfg)
    if backend == "hf" and cfg.tensor_parallel_size > 1:
        raise ConfigError("--tensor-parallel-size splits a teacher over GPUs with vLLM only; "
                          "pass --backend vllm on a GPU machine with vLLM installed")
    sources = resolve_sources(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher_model, cfg.trust_remote_code,
                               flag="--tokenizer" if cfg.tokenizer else "--teacher")
    teacher_info, model_config = describe_teacher(cfg.teacher_model, backend, cfg.dtype,
                                                  cfg.trust_remote_code)
    if cfg.tokenizer:
        _check_teachers_own_tokenizer(cfg, tokenizer)
    vocab_size = real_vocab_size(tokenizer)  # the support of every cached distribution
    _check_against_model(cfg, vocab_size, teacher_head_width(model_config), model_config)
    device = torch.device("cuda") if backend == "vllm" else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    reading = resolve_reading(cfg, sources, tokenizer)
    draft = _draft_manifest(cfg, replace(teacher_info, dtype=str(dtype).removeprefix("torch.")),
                            sources, tokenizer, vocab_size, teacher_head_width(model_config),
                            reading)
    previous = previous_manifest(cfg, draft)
    if previous is not None and previous.complete and files_intact(cfg.out_dir, previous):
        log.info("%s is already a complete cache with these settings; nothing to do", cfg.out_dir)
        if cfg.num_workers == 1 and not (cfg.out_dir / DATASET_CARD_NAME).is_file():
            write_dataset_card(cfg.out_dir, previous)
        return previous
    kept = resumable_shards(cfg, draft, previous)

    # Read up to the first shard before loading the teacher or touching --out, so corpus
    # errors (missing field, empty corpus) cost seconds and leave nothing behind.
    stats = CorpusStats()
    done = DocumentsDone(stats)
    sequences = _with_targets(cache_sequences(cfg, reading, sources, tokenizer, stats,
                                              on_done=done.add, key=draft.settings_fingerprint))
    shard_stream = in_background(with_documents_done(shard_groups(sequences, cfg.shard_size),
                                                     done))
    first_shard = next(shard_stream, None)
    if first_shard is None:
        raise ConfigError(f"--data {' '.join(cfg.data)}: no sequence of at least 2 tokens; "
                          "the corpus is empty or every document is too short")
    count = DocumentCount(sources)  # the progress total, counted while the teacher loads
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run_teacher = _teacher_runner(cfg, backend, device, dtype, pad_id, vocab_size,
                                  model_config)
    prepare_out(cfg, draft, fresh=kept is None)
    draft = replace(draft, tokenizer=replace(draft.tokenizer,
                                             files=save_tokenizer(tokenizer, cfg.out_dir)))
    record_progress(cfg, draft)
    commit()
    written = _write_shards(cfg, draft, kept or {}, chain([first_shard], shard_stream),
                            run_teacher, dtype, CacheProgress(count, done, cfg.progress), commit)
    corpus = replace(written.manifest.corpus, documents_read=stats.documents_read,
                     documents_skipped=stats.documents_skipped,
                     conversations_truncated=stats.conversations_truncated,
                     conversations_too_long=stats.conversations_too_long,
                     conversations_without_targets=stats.conversations_without_targets)
    manifest = replace(written.manifest, corpus=corpus, complete=True)
    if cfg.num_workers == 1:
        write_manifest(cfg.out_dir, manifest)
        write_dataset_card(cfg.out_dir, manifest)
        return manifest
    part = workers.finished_part(manifest, cfg.worker_index, cfg.num_workers,
                                 written.stream_shards, written.stream_sequences)
    record_progress(cfg, part)
    commit()
    merged = workers.try_merge(cfg.out_dir, cfg.num_workers)
    if merged is None:
        log.info("worker %d of %d finished; the last worker to finish merges the manifest",
                 cfg.worker_index, cfg.num_workers)
    return merged if merged is not None else part


def _with_targets(sequences: Iterator[TokenSequence]) -> Iterator[TokenSequence]:
    """The sequences with at least one target position. Only a packed block of one-token
    documents has none (a document's last position is never a target), so they are dropped."""
    dropped = 0
    for sequence in sequences:
        if sequence.position_mask().any():
            yield sequence
        else:
            dropped += 1
    if dropped:
        log.info("dropped %d packed sequence(s) of one-token documents: no target position",
                 dropped)


def _draft_manifest(cfg: CacheTeacherConfig, teacher: TeacherInfo, sources: list[str],
                    tokenizer: Any, vocab_size: int, head_width: int, reading: Reading
                    ) -> CacheManifest:
    """The manifest this run's settings call for, with no shard yet (compared on resume)."""
    vllm = teacher.backend == "vllm"
    sampled = cfg.cache_mode == "sampled"
    chat = {k: v for k, v in reading.settings().items()
            if k not in ("format", "train_on", "chat_template_sha256")}
    return CacheManifest(
        teacher=teacher,
        tokenizer=describe_tokenizer(cfg.tokenizer or cfg.teacher_model, tokenizer, vocab_size),
        corpus=CorpusInfo(sources=tuple(sources), text_field=cfg.text_field, split=cfg.split,
                          fingerprint=corpus_fingerprint(sources, cfg.text_field, cfg.split),
                          documents_read=0, documents_skipped=0, format=reading.format.kind,
                          chat_template=reading.template_sha256,
                          options=chat if reading.format.kind != "text" else {}),
        train_on=reading.train_on, segments=cfg.layout == "packed",
        vocab_size=vocab_size, teacher_head_width=head_width, top_k=cfg.top_k,
        max_length=cfg.max_length, layout=cfg.layout,
        add_special_tokens=cfg.add_special_tokens, shard_size=cfg.shard_size,
        id_dtype=id_dtype_for_vocab(vocab_size), logprob_dtype=cfg.logprob_dtype,
        capture_temperature=1.0, tail_temperatures=tuple(cfg.tail_temperatures),
        tail_mode="uniform" if vllm else "exact",
        entropy_mode=teacher_vllm.ENTROPY_MODE if vllm else "exact",
        encoding=cfg.encoding, cache_mode=cfg.cache_mode,
        samples=cfg.samples if sampled else 0, sample_seed=cfg.sample_seed if sampled else 0,
        settings_fingerprint="", complete=False,
    ).with_fingerprint()


@dataclass
class _Written:
    manifest: CacheManifest  # with every shard of this run (or worker), not yet complete
    stream_shards: int  # shards of the whole corpus stream (all workers')
    stream_sequences: int


def _write_shards(cfg: CacheTeacherConfig, draft: CacheManifest, kept: dict[str, ShardInfo],
                  stream: Iterator[tuple[list[int], list[TokenSequence], int]],
                  run_teacher: TeacherRunner, dtype: torch.dtype, progress: CacheProgress,
                  commit: Callable[[], None]) -> _Written:
    """Run the teacher over this run's shards of `stream` (intact kept shards are reused) and
    write them, one shard written in the background while the teacher runs the next.

    `stream` yields (sample ids, sequences, documents done when the shard was cut)."""
    manifest = draft
    started = time.perf_counter()
    computed = shards = sequences = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        pending: Future[ShardInfo] | None = None
        for index, (sample_ids, seqs, documents) in enumerate(stream):
            ids = [s.ids for s in seqs]
            shards, sequences = index + 1, sequences + len(seqs)
            progress.start_shard(documents, sum(len(s) for s in ids))
            if not workers.owns_shard(index, cfg.num_workers, cfg.worker_index):
                continue  # another worker's shard: its sequences only advance the sample ids
            reused = reusable_shard(cfg.out_dir, kept.get(shard_name(index)), sample_ids, ids)
            if reused is not None:
                manifest = manifest.with_shard(reused)
                record_progress(cfg, manifest)
                commit()
                continue
            try:
                targets = run_teacher(sample_ids, seqs, progress)
                _refuse_nonfinite(sample_ids, seqs, targets, dtype)
            except BaseException:
                if pending is not None:  # the shard before is finished: keep it for a resume
                    record_progress(cfg, manifest.with_shard(pending.result()))
                    commit()
                raise
            computed += sum(len(s) for s in ids)
            if pending is not None:
                manifest = manifest.with_shard(pending.result())
                record_progress(cfg, manifest)
                commit()
            layout = draft.shard_layout
            masks = [s.position_mask() for s in seqs] if layout.has_target_mask else None
            segments = [s.segments or [len(s.ids)] for s in seqs] if layout.has_segments else None
            pending = writer.submit(write_shard, cfg.out_dir / shard_name(index), layout,
                                    sample_ids, ids, targets, masks, segments)
        if pending is not None:
            manifest = manifest.with_shard(pending.result())
    progress.close()
    elapsed = time.perf_counter() - started
    log.info("cached %d sequences, %d tokens in %d shards (%d tokens computed, %.0f tok/s) "
             "-> %s", manifest.num_sequences, manifest.num_tokens, len(manifest.shards),
             computed, computed / max(elapsed, 1e-9), cfg.out_dir)
    return _Written(manifest, shards, sequences)


def resolve_backend(cfg: CacheTeacherConfig) -> str:
    """The backend this run uses; `auto` is vLLM when it is installed and a GPU is visible.

    `auto` keeps hf when exact tempered tails are asked for (only full logits give them), for
    a sampled or packed cache, or when a device other than the default GPU is named.
    """
    if cfg.backend == "vllm":
        teacher_vllm.require_vllm()
        return "vllm"
    if (cfg.backend == "hf" or cfg.tail_temperatures or cfg.cache_mode == "sampled"
            or cfg.pack or cfg.device not in ("auto", "cuda")):
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
            cfg.teacher_model, top_k=cfg.top_k, vocab_size=vocab_size, max_length=cfg.max_length,
            position_limit=limit if isinstance(limit, int) else None,
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            trust_remote_code=cfg.trust_remote_code)

        def run_vllm(sample_ids: list[int], seqs: list[TokenSequence], progress: CacheProgress
                     ) -> list[SequenceTargets]:
            # The whole shard in one generate call; each sequence is one prompt (--pack is
            # refused with vLLM: its prompts cannot keep packed documents apart).
            targets = teacher.targets([s.ids for s in seqs], sample_ids,
                                      [s.position_mask() for s in seqs])
            progress.update(sum(len(s.ids) for s in seqs))
            return targets

        return run_vllm
    model = load_teacher(cfg.teacher_model, device, dtype, cfg.trust_remote_code)
    if cfg.layout == "packed":  # packed documents must stay apart, in the student's pass too
        check_packing(model, "teacher", cfg.teacher_model)
    parts = teacher_parts(model, cfg.teacher_model)
    return lambda sample_ids, seqs, progress: _run_teacher(parts, seqs, cfg, pad_id, progress,
                                                           sample_ids, vocab_size)


def _refuse_nonfinite(sample_ids: list[int], seqs: list[TokenSequence],
                      targets: list[SequenceTargets], dtype: torch.dtype) -> None:
    """Stop at the first NaN or infinity a cache must not hold (`schemas.shard.first_invalid`),
    before its shard is written: a NaN teacher log-prob would silently zero the KD term."""
    for sample_id, seq, target in zip(sample_ids, seqs, targets, strict=True):
        found = target.first_invalid()
        if found is None:
            continue
        column, index, value = found  # index: among the sequence's target positions
        position = (None if index is None else
                    int(np.flatnonzero(seq.position_mask())[index]))
        where = f"sample {sample_id}" + (f", target position {position}" if position is not None
                                         else "")
        # Shards of another dtype cannot join this cache: a new dtype needs --overwrite.
        remedy = {torch.float16: "float16 logits overflow: re-run with --dtype bfloat16 "
                                 "--overwrite (or --dtype float32 --overwrite)",
                  torch.bfloat16: "re-run with --dtype float32 --overwrite; if it persists, "
                                  "the teacher's weights hold NaN or infinity"}.get(
            dtype, "the teacher itself computes it: check its weights and config")
        raise NonFiniteError(f"the teacher's output is not finite ({column} = {value} at "
                             f"{where}, computed in {str(dtype).removeprefix('torch.')}); "
                             f"{remedy}. No shard holds it; the cache is marked incomplete")


def _check_teachers_own_tokenizer(cfg: CacheTeacherConfig, tokenizer: Any) -> None:
    """--tokenizer must map ids as the tokenizer stored with the teacher does, if it has one:
    otherwise the teacher reads scrambled text, and nothing else would notice."""
    try:
        own = load_tokenizer(cfg.teacher_model, cfg.trust_remote_code, "--teacher")
    except ConfigError:
        return  # no tokenizer with the teacher: --tokenizer is how it gets one
    comparison = compare_vocab(own, tokenizer, real_vocab_size(own),
                               ("the teacher's own tokenizer", f"--tokenizer {cfg.tokenizer}"))
    mismatch = comparison.mismatch
    if mismatch is None and real_vocab_size(tokenizer) != real_vocab_size(own):
        # Extra ids would be padding rows of the teacher's head: untrained, yet in the softmax.
        mismatch = (f"it has {real_vocab_size(tokenizer)} ids, the teacher's own "
                    f"{real_vocab_size(own)}")
    if mismatch is None:
        if comparison.cosmetic or comparison.roles:
            log.warning("--tokenizer %s differs from the teacher's own tokenizer in %s (same "
                        "id-to-token mapping)%s", cfg.tokenizer,
                        ", ".join(comparison.cosmetic + comparison.roles),
                        _affix_difference(own, tokenizer) if cfg.add_special_tokens else "")
        return
    if not cfg.allow_tokenizer_mismatch:
        raise ConfigError(f"--tokenizer {cfg.tokenizer} does not map ids as the teacher's own "
                          f"tokenizer ({cfg.teacher}) does ({mismatch}), so the "
                          "teacher would read scrambled text; drop --tokenizer, or pass "
                          "--allow-tokenizer-mismatch if the teacher was trained with it")
    log.warning("--allow-tokenizer-mismatch: caching with --tokenizer %s although %s",
                cfg.tokenizer, mismatch)


def _affix_difference(own: Any, tokenizer: Any) -> str:
    """'; it adds [1] before each text where the teacher's own adds [] ...' when the two
    tokenizers' own encodings add different special tokens (a BOS the teacher expects)."""
    try:
        ours, theirs = special_affixes(own), special_affixes(tokenizer)
    except ConfigError:
        return ""
    if ours == theirs:
        return ""
    return (f"; it adds {theirs[0]} before and {theirs[1]} after each text where the "
            f"teacher's own adds {ours[0]} and {ours[1]}: the teacher reads text in a form "
            "it was not trained on")


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


def _run_teacher(teacher: Any, seqs: list[TokenSequence], cfg: CacheTeacherConfig,
                 pad_id: int, progress: CacheProgress, sample_ids: list[int], vocab_size: int
                 ) -> list[SequenceTargets]:
    """Teacher targets for one shard, batching sequences of similar length to cut padding.

    Only each sequence's target positions are reduced (`TokenSequence.position_mask`), and
    packed documents never attend to each other. `sample_ids` seed each sequence's draws in a
    sampled cache; `vocab_size` real ids form the softmax (padding rows of the head are left
    out)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids), reverse=True)
    results: list[SequenceTargets | None] = [None] * len(seqs)
    for start in range(0, len(order), cfg.batch_size):
        batch = [seqs[i] for i in order[start : start + cfg.batch_size]]
        outputs = teacher_targets(teacher, [s.ids for s in batch], cfg.top_k,
                                  cfg.tail_temperatures, pad_id,
                                  samples=cfg.samples if cfg.cache_mode == "sampled" else 0,
                                  sample_ids=[sample_ids[i]
                                              for i in order[start : start + cfg.batch_size]],
                                  sample_seed=cfg.sample_seed, vocab_size=vocab_size,
                                  target_masks=[s.position_mask() for s in batch],
                                  segments=[s.segments for s in batch])
        for i, out in zip(order[start : start + cfg.batch_size], outputs, strict=True):
            results[i] = out
        progress.update(sum(len(s.ids) for s in batch))
    return [r for r in results if r is not None]
