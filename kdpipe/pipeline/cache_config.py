"""`CacheTeacherConfig`: every option of `kdpipe cache-teacher`, declared once.

Each field is an `options.option` (default, help, checks); the command is generated from it
(`pipeline/cli.py`). `validate()` reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import options
from kdpipe.options import DEVICE_HELP, PROGRESS_HELP, REMOTE_CODE_HELP, THREADS_HELP, option
from kdpipe.pipeline.formats import FORMATS, OVERLONG, TRAIN_ON, train_on_problem
from kdpipe.schemas.encoding import CACHE_MODES, ENCODINGS, MAX_SAMPLES
from kdpipe.schemas.shard import LOGPROB_DTYPES
from kdpipe.schemas.storage import is_url

BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheTeacherConfig:
    """Every option of `kdpipe cache-teacher`; `kdpipe cache-teacher --help` shows them."""

    out: str = option(help="Cache folder or URL (s3://, gs://, ...: docs/storage.md) to "
                      "create (or resume).")
    teacher: str | None = option(
        None, "Teacher model: local folder or hub name (required unless --merge).")
    data: tuple[str, ...] = option(
        (), "Corpus: .txt/.jsonl/.jsonl.zst/.parquet file, folder, glob, or a Hugging Face "
        "dataset name. Repeat for several.")
    tokenizer: str | None = option(None, "Tokenizer path/name if it is not stored with the "
                                   "teacher.")
    backend: str = option(
        "hf", "Teacher backend: hf (transformers: exact tails and entropy), vllm (GPU, pip "
        "install 'kdpipe[vllm]'), auto (vllm when it is installed and a GPU is visible, else "
        "hf).", choices=BACKENDS)
    device: str = option("auto", DEVICE_HELP)
    threads: int = option(0, THREADS_HELP, ge=0)
    dtype: str = option("auto", "Teacher compute dtype: auto (bfloat16 on GPU, float32 on "
                        "CPU), float32, bfloat16, float16.", choices=DTYPES)
    batch_size: int = option(8, "Sequences per teacher forward pass.", ge=1)
    top_k: int = option(64, "Teacher log-probs kept per position.", ge=1)
    max_length: int = option(512, "Tokens per sequence (at most; at least 2, so a sequence "
                             "has a target).", ge=2)
    pack: bool = option(False, "Join documents with EOS and cut fixed blocks (pretraining); "
                        "default: each document chunked on its own.")
    add_special_tokens: bool = option(
        True, "Encode documents as the tokenizer does by default: with the special tokens its "
        "post-processor adds (a BOS for Llama, Gemma, Mistral). --no-add-special-tokens "
        "encodes the text alone.")
    shard_size: int = option(1024, "Sequences per Parquet shard.", ge=1)
    text_field: str = option("text", "Text field of jsonl/parquet/datasets.")
    format: str = option(
        "auto", "What a row of --data is: text, messages (a conversation: a list of {role, "
        "content}), prompt-completion (TRL's: strings or lists of messages), or auto (from "
        "the first rows, preferring messages, then prompt-completion, then text). See "
        "docs/chat-data.md.", choices=FORMATS)
    messages_field: str = option("messages", "Conversation field (--format messages).")
    prompt_field: str = option("prompt", "Prompt field (--format prompt-completion).")
    completion_field: str = option("completion", "Completion field (--format "
                                   "prompt-completion).")
    tools_field: str = option("tools", "Tool definitions field of conversations (optional in "
                              "a row).")
    chat_template: str | None = option(
        None, "Jinja file to render conversations with (default: the tokenizer's chat "
        "template).")
    train_on: str | None = option(
        None, "Positions trained: assistant (every assistant reply), last-assistant, "
        "completion, all. Default: assistant for messages, completion for "
        "prompt-completion, all for text.", choices=TRAIN_ON)
    overlong: str = option(
        "truncate", "A conversation longer than --max-length: truncate (keep its first "
        "tokens; skipped if no target is left) or skip it. Both are counted.",
        choices=OVERLONG)
    split: str = option("train", "Split of a Hugging Face dataset.")
    tail_temperatures: tuple[float, ...] = option(
        (), "Also store the exact tail log-mass at these temperatures, e.g. 2,4 (0.05 to "
        "100, as --temperature).", ge=0.05, le=100,
        comma_separated=True)
    logprob_dtype: str = option(
        "float16", "Storage type of top-k log-probs: float16 (default; error measured in "
        "docs/cache-format.md) or float32.", choices=tuple(LOGPROB_DTYPES))
    encoding: str = option(
        "plain", "Top-k storage: plain (ids + float log-probs) or compact (sorted, "
        "delta-coded ids and log-probs quantised to 1/16 nat, KL <= 4.9e-4 nats per "
        "position). Measured at k = 64: compact is 22-32% smaller than plain at a 152k "
        "vocabulary (synthetic teachers) and 47% at a 2k one (a trained teacher); "
        "docs/cache-format.md.", choices=ENCODINGS)
    cache_mode: str = option(
        "topk", "topk (top-k log-probs + tail mass) or sampled (--samples draws per position "
        "from the teacher, stored as unique ids with counts; train with --loss sampled).",
        choices=CACHE_MODES)
    samples: int = option(50, f"sampled: draws per position (1..{MAX_SAMPLES}).", ge=1,
                          le=MAX_SAMPLES)
    sample_seed: int = option(
        0, "sampled: seed of the draws (each sequence's generator is seeded from it and its "
        "sample id).")
    strict: bool = option(False, "Fail on the first empty, undecodable or malformed document "
                          "instead of skipping it.")
    overwrite: bool = option(False, "Replace an existing cache made with different settings.")
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)
    allow_tokenizer_mismatch: bool = option(
        False, "Use --tokenizer even though it maps ids differently from the tokenizer stored "
        "with the teacher (refused otherwise: the teacher would read scrambled text).")
    num_workers: int = option(1, "Workers caching this corpus together into --out "
                              "(docs/distributed.md).", ge=1)
    worker_index: int = option(
        0, "This worker's index, 0..num-workers-1: it caches shards i, i+N, i+2N, ...", ge=0)
    merge: bool = option(False, "Only merge the finished workers' manifest parts in --out into "
                         "manifest.json.")
    gpu_memory_utilization: float = option(
        0.9, "vllm: share of each GPU's memory vLLM may use.", gt=0, le=1)
    tensor_parallel_size: int = option(
        1, "vllm: GPUs to split one teacher over (only for a teacher too big for one).", ge=1)
    progress: bool = option(True, PROGRESS_HELP)
    local_cache: str | None = option(
        None, "--out a URL: the node-local folder the cache is written in before each file "
        "is uploaded (default: a temporary folder, removed at the end).")

    @classmethod
    def from_options(cls, **values: Any) -> CacheTeacherConfig:
        """A CacheTeacherConfig from option names, as on the command line."""
        return options.build(cls, values)

    @property
    def out_dir(self) -> Path:
        """--out as a local folder (a URL --out is written through one: `remote_out`)."""
        return Path(self.out)

    @property
    def layout(self) -> str:
        return "packed" if self.pack else "document"

    @property
    def teacher_model(self) -> str:
        """--teacher, which `validate` requires unless --merge."""
        assert self.teacher is not None, "validate() first: --teacher is required"
        return self.teacher

    def problems(self) -> list[str]:
        """Checks across options (each option's own checks are declared with it)."""
        found: list[str] = []
        if self.merge:
            return found  # only --out and --num-workers matter
        if self.teacher is None:
            found.append("--teacher is required (a local model folder or hub name), unless "
                         "--merge")
        if not self.data:
            found.append("--data is required (a file, folder, glob or dataset name)")
        if self.backend == "vllm" and self.pack:
            found.append("--pack needs --backend hf: vLLM runs each sequence as one prompt, "
                         "so packed documents would attend to each other (and vLLM does not "
                         "pad, so packing gains the teacher pass nothing)")
        if self.backend == "vllm" and self.tail_temperatures:
            found.append("--tail-temperatures needs --backend hf: vLLM returns only top-k "
                         "log-probs, so exact tempered tails cannot be computed (without them "
                         "the trainer uses the uniform-tail approximation)")
        if self.backend == "vllm" and self.device not in ("auto", "cuda"):
            found.append(f"--device {self.device} with --backend vllm: vLLM uses the GPUs "
                         "CUDA_VISIBLE_DEVICES shows; leave --device at auto")
        if self.worker_index >= self.num_workers >= 1:  # --num-workers 0 has its own line
            found.append(f"--worker-index must be in 0..{self.num_workers - 1} for "
                         f"--num-workers {self.num_workers} (got {self.worker_index})")
        if self.cache_mode == "sampled":
            if self.backend == "vllm":
                found.append("--cache-mode sampled needs --backend hf: drawing from the "
                             "teacher's distribution needs its full logits")
            if self.tail_temperatures:
                found.append("--tail-temperatures applies to top-k caches; drop it with "
                             "--cache-mode sampled")
            if self.encoding != "plain":
                found.append("--encoding compact applies to top-k caches; drop it with "
                             "--cache-mode sampled")
        train_on = train_on_problem(self.format, self.train_on)
        if train_on is not None:
            found.append(train_on)
        if self.format == "text" and self.chat_template is not None:
            found.append("--chat-template renders conversations; drop it with --format text")
        if not is_url(self.out) and self.out_dir.exists() and not self.out_dir.is_dir():
            found.append(f"--out {self.out} is a file; give a folder for the cache")
        return found

    def validate(self) -> None:
        """Raise one ConfigError listing every invalid option."""
        options.raise_problems("cache-teacher", options.field_problems(self) + self.problems())
