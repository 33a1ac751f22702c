"""The `kdpipe` command line: parse options, build a stage's config, call the stage's function.

Every option can also come from a YAML file (`kdpipe COMMAND --config FILE ...`: keys are option
names, flat or under a section named after the command) or from an environment variable
`KDPIPE_<COMMAND>_<OPTION>` (e.g. `KDPIPE_CACHE_TEACHER_TOP_K=32`). Flags on the command line
win over the environment, which wins over the file.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kdpipe import __version__
from kdpipe.schemas.errors import ConfigError, KdpipeError

app = typer.Typer(
    name="kdpipe",
    help="Knowledge distillation for language models: run the teacher once, cache what "
    "students need, train any number of students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
log = logging.getLogger("kdpipe")

USER_ERRORS = (KdpipeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def _parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 2,4") from exc


@app.command("cache-teacher")
def cache_teacher_command(
    out: Annotated[Path, typer.Option(help="Cache folder to create (or resume).")],
    teacher: Annotated[str | None, typer.Option(
        help="Teacher model: local folder or hub name (required unless --merge).")] = None,
    data: Annotated[list[str] | None, typer.Option(
        help="Corpus: .txt/.jsonl/.jsonl.zst/.parquet file, folder, glob, or a Hugging Face "
        "dataset name. Repeat for several.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer path/name if it is not stored with the teacher.")] = None,
    backend: Annotated[str, typer.Option(
        help="Teacher backend: hf (transformers: exact tails and entropy), vllm (GPU, "
        "pip install 'kdpipe[vllm]'), auto (vllm when it is installed and a GPU is visible, "
        "else hf).")] = "hf",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="Teacher compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
        "bfloat16, float16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Sequences per teacher forward pass.")] = 8,
    top_k: Annotated[int, typer.Option(help="Teacher log-probs kept per position.")] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per sequence (at most).")] = 512,
    pack: Annotated[bool, typer.Option(
        help="Join documents with EOS and cut fixed blocks (pretraining); default: each "
        "document chunked on its own.")] = False,
    add_special_tokens: Annotated[bool, typer.Option(
        help="Encode documents as the tokenizer does by default: with the special tokens its "
        "post-processor adds (a BOS for Llama, Gemma, Mistral). --no-add-special-tokens "
        "encodes the text alone.")] = True,
    shard_size: Annotated[int, typer.Option(help="Sequences per Parquet shard.")] = 1024,
    text_field: Annotated[str, typer.Option(help="Text field of jsonl/parquet/datasets.")
                          ] = "text",
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "train",
    tail_temperatures: Annotated[str, typer.Option(
        help="Also store the exact tail log-mass at these temperatures, e.g. 2,4.")] = "",
    logprob_dtype: Annotated[str, typer.Option(
        help="Storage type of top-k log-probs: float16 (default; error measured in "
        "docs/cache-format.md) or float32.")] = "float16",
    encoding: Annotated[str, typer.Option(
        help="Top-k storage: plain (ids + float log-probs) or compact (delta-coded ids, "
        "log-probs quantised to 1/16 nat: about half the size, KL <= 5e-4; docs/cache-format.md).")
    ] = "plain",
    cache_mode: Annotated[str, typer.Option(
        help="topk (top-k log-probs + tail mass) or sampled (--samples draws per position "
        "from the teacher, stored as unique ids with counts; train with --loss sampled).")
    ] = "topk",
    samples: Annotated[int, typer.Option(
        help="sampled: draws per position (1..255).")] = 50,
    sample_seed: Annotated[int, typer.Option(
        help="sampled: seed of the draws (each sequence's generator is seeded from it and "
        "its sample id).")] = 0,
    strict: Annotated[bool, typer.Option(
        help="Fail on the first empty or undecodable document instead of skipping it.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing cache made with different settings.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        help="Allow the teacher/tokenizer to run code from its repository.")] = False,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option(
        help="Use --tokenizer even though it maps ids differently from the tokenizer stored "
        "with the teacher (refused otherwise: the teacher would read scrambled text).")
    ] = False,
    num_workers: Annotated[int, typer.Option(
        help="Workers caching this corpus together into --out (docs/distributed.md).")] = 1,
    worker_index: Annotated[int, typer.Option(
        help="This worker's index, 0..num-workers-1: it caches shards i, i+N, i+2N, ...")] = 0,
    merge: Annotated[bool, typer.Option(
        help="Only merge the finished workers' manifest parts in --out into manifest.json.")
    ] = False,
    gpu_memory_utilization: Annotated[float, typer.Option(
        help="vllm: share of each GPU's memory vLLM may use.")] = 0.9,
    tensor_parallel_size: Annotated[int, typer.Option(
        help="vllm: GPUs to split one teacher over (only for a teacher too big for one).")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run the teacher over a corpus once; write top-k log-probs, tail mass and confidence."""
    if merge:
        from kdpipe.pipeline.workers import merge_parts

        merged = merge_parts(out, num_workers if num_workers > 1 else None)
        typer.echo(f"cache ready: {out} ({merged.num_sequences} sequences, "
                   f"{merged.num_tokens} tokens, {len(merged.shards)} shards)")
        return
    if teacher is None:
        raise ConfigError("--teacher is required (a local model folder or hub name), unless "
                          "--merge")
    from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
    from kdpipe.pipeline.workers import is_part

    cfg = CacheTeacherConfig(
        teacher=teacher, data=tuple(data or ()), out=out, tokenizer=tokenizer, backend=backend,
        device=device, dtype=dtype, batch_size=batch_size, top_k=top_k, max_length=max_length,
        pack=pack, add_special_tokens=add_special_tokens, shard_size=shard_size,
        text_field=text_field, split=split,
        tail_temperatures=_parse_floats(tail_temperatures, "--tail-temperatures"),
        logprob_dtype=logprob_dtype, encoding=encoding, cache_mode=cache_mode,
        samples=samples, sample_seed=sample_seed, strict=strict, overwrite=overwrite,
        trust_remote_code=trust_remote_code, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
        num_workers=num_workers, worker_index=worker_index,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, progress=progress)
    manifest = cache_teacher(cfg)
    if is_part(manifest):
        typer.echo(f"worker {worker_index} of {num_workers} done: {len(manifest.shards)} "
                   f"shards in {out}; the last worker to finish merges the manifest (or run "
                   f"`kdpipe cache-teacher --merge --out {out}`)")
        return
    typer.echo(f"cache ready: {out} ({manifest.num_sequences} sequences, "
               f"{manifest.num_tokens} tokens, {len(manifest.shards)} shards)")


@app.command("inspect")
def inspect_command(
    paths: Annotated[list[Path], typer.Argument(
        help="A cache folder, or one curriculum file (two: also their rank correlation).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarise a cache (teacher, tokenizer, k, sequences, bytes/token, teacher NLL) or a
    curriculum (source, metric, score quantiles; with two, Spearman's rank correlation)."""
    from kdpipe.schemas.cache import open_cache, summarize
    from kdpipe.schemas.curriculum import is_curriculum_file

    if any(is_curriculum_file(p) for p in paths):
        from kdpipe.pipeline.curriculum_cli import inspect_curricula

        for line in inspect_curricula(paths, as_json):
            typer.echo(line)
        return
    if len(paths) != 1:
        raise ConfigError("kdpipe inspect takes one cache folder (or one or two curriculum "
                          "files)")
    summary = summarize(open_cache(paths[0], require_complete=False))
    if as_json:  # strict JSON: a NaN statistic of a faulty cache prints as null
        typer.echo(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                               for k, v in summary.items()}, allow_nan=False))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        typer.echo(f"{key:<{width}}  {shown}")


@app.command("verify")
def verify_command(path: Annotated[Path, typer.Argument(help="A cache folder.")]) -> None:
    """Re-check a cache's schema, every shard's checksum and values (no NaN or infinity) and
    its saved tokenizer; exit 1 on any fault."""
    from kdpipe.schemas.cache import open_cache

    cache = open_cache(path, require_complete=False, check_shards=False)
    problems = cache.verify()
    if cache.tokenizer_dir is not None:
        from kdpipe.tokenizer_identity import cache_tokenizer

        try:
            cache_tokenizer(cache)
        except KdpipeError as exc:
            problems.append(str(exc))
    for problem in problems:
        typer.echo(f"FAULT {problem}", err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"ok: {len(cache.manifest.shards)} shards, {cache.manifest.num_sequences} "
               "sequences verified")


def _register_optional_commands() -> None:
    """Commands whose modules live with their stage (kept out of this file on purpose)."""
    from kdpipe.trainer import cli as trainer_cli

    app.command("train-student")(trainer_cli.train_student)
    app.command("evaluate")(trainer_cli.evaluate)
    from kdpipe.pipeline import curriculum_cli

    app.command("build-curriculum")(curriculum_cli.build_curriculum)
    from kdpipe.demo import cli as demo_cli
    from kdpipe.experiments import cli as experiments_cli

    app.command("demo")(demo_cli.demo)
    app.command("experiment")(experiments_cli.experiment)
    app.command("report")(experiments_cli.report)


def _config_file_defaults(argv: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Strip `--config FILE` from argv and turn the file into click's `default_map`."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv, None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path, del_span = Path(args[i + 1]), slice(i, i + 2)
            break
        if arg.startswith("--config="):
            path, del_span = Path(arg.split("=", 1)[1]), slice(i, i + 1)
            break
    else:
        raise ConfigError("--config needs a file path")
    del args[del_span]
    command = next((a for a in args if not a.startswith("-")), None)
    if command is None:
        raise ConfigError("--config must come with a command, e.g. kdpipe train-student "
                          "--config run.yaml")
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    section = loaded.get(command, loaded)
    commands = getattr(typer.main.get_command(app), "commands", {})  # the click group's
    target = commands.get(command)
    known = {p.name for p in target.params} if target is not None else set()
    values = {str(k).replace("-", "_"): v for k, v in section.items()}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) for {command}: "
                          f"{', '.join(unknown)}")
    return args, {command: values}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and exit code 2 for input the user can fix."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    try:
        _register_optional_commands()
        args, default_map = _config_file_defaults(list(sys.argv[1:] if argv is None else argv))
        command = typer.main.get_command(app)
        command.main(args=args, prog_name="kdpipe", auto_envvar_prefix="KDPIPE",
                     default_map=default_map)
    except USER_ERRORS as exc:
        print(f"kdpipe: error: {exc}", file=sys.stderr)
        sys.exit(2)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False
          ) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
