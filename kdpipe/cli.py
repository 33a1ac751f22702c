"""The `kdpipe` command line: parse options, build a stage's config, call the stage's function.

Every option can also come from a YAML file (`kdpipe COMMAND --config FILE ...`: keys are option
names, flat or under a section named after the command) or from an environment variable
`KDPIPE_<COMMAND>_<OPTION>` (e.g. `KDPIPE_CACHE_TEACHER_TOP_K=32`). Flags on the command line
win over the environment, which wins over the file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import click
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
    teacher: Annotated[str, typer.Option(help="Teacher model: local folder or hub name.")],
    data: Annotated[list[str], typer.Option(
        help="Corpus: .txt/.jsonl/.jsonl.zst/.parquet file, folder, glob, or a Hugging Face "
        "dataset name. Repeat for several.")],
    out: Annotated[Path, typer.Option(help="Cache folder to create (or resume).")],
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer path/name if it is not stored with the teacher.")] = None,
    backend: Annotated[str, typer.Option(help="Teacher backend: hf (transformers).")] = "hf",
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
    shard_size: Annotated[int, typer.Option(help="Sequences per Parquet shard.")] = 1024,
    text_field: Annotated[str, typer.Option(help="Text field of jsonl/parquet/datasets.")
                          ] = "text",
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "train",
    tail_temperatures: Annotated[str, typer.Option(
        help="Also store the exact tail log-mass at these temperatures, e.g. 2,4.")] = "",
    logprob_dtype: Annotated[str, typer.Option(
        help="Storage type of top-k log-probs: float16 (default; error measured in "
        "docs/cache-format.md) or float32.")] = "float16",
    strict: Annotated[bool, typer.Option(
        help="Fail on the first empty or undecodable document instead of skipping it.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing cache made with different settings.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        help="Allow the teacher/tokenizer to run code from its repository.")] = False,
) -> None:
    """Run the teacher over a corpus once; write top-k log-probs, tail mass and confidence."""
    from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher

    cfg = CacheTeacherConfig(
        teacher=teacher, data=tuple(data), out=out, tokenizer=tokenizer, backend=backend,
        device=device, dtype=dtype, batch_size=batch_size, top_k=top_k, max_length=max_length,
        pack=pack, shard_size=shard_size, text_field=text_field, split=split,
        tail_temperatures=_parse_floats(tail_temperatures, "--tail-temperatures"),
        logprob_dtype=logprob_dtype, strict=strict, overwrite=overwrite,
        trust_remote_code=trust_remote_code)
    manifest = cache_teacher(cfg)
    typer.echo(f"cache ready: {out} ({manifest.num_sequences} sequences, "
               f"{manifest.num_tokens} tokens, {len(manifest.shards)} shards)")


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A cache folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarise a cache: teacher, tokenizer, k, sequences, tokens, bytes/token, teacher NLL."""
    from kdpipe.schemas.cache import open_cache, summarize

    summary = summarize(open_cache(path, require_complete=False))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        typer.echo(f"{key:<{width}}  {shown}")


@app.command("verify")
def verify_command(path: Annotated[Path, typer.Argument(help="A cache folder.")]) -> None:
    """Re-check a cache's schema and every shard's checksum; exit 1 on any fault."""
    from kdpipe.schemas.cache import open_cache

    cache = open_cache(path, require_complete=False, check_shards=False)
    problems = cache.verify()
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
    click_command = typer.main.get_command(app)
    assert isinstance(click_command, click.Group)
    target = click_command.get_command(click.Context(click_command), command)
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
