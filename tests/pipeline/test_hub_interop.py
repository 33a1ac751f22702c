"""A cache folder is a Hugging Face dataset: `datasets` reads its shards without kdpipe, its
dataset card states what it holds, and a copy laid out as the Hub's downloads are is a cache.

No hub is reachable here: uploads and `hf://` URLs are documented, not tested; a download is
rebuilt as `hf download` lays it out (with `--local-dir`, and in the hub cache:
snapshot files that are symbolic links to blobs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.pipeline.dataset_card import render_card, size_category
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import DATASET_CARD_NAME, TOKENIZER_DIR

from .conftest import run_cli, small_config

TOPK_COLUMNS = ("sample_id", "topk_ids", "topk_logprobs", "tail_logmass",
                "tail_logmass_tempered")

# Run with `python -I` (no PYTHONPATH, no current folder on sys.path) and kdpipe made
# unimportable: what a user without kdpipe has. Writes what `datasets` read as Arrow IPC files.
WITHOUT_KDPIPE = """
import sys
sys.modules["kdpipe"] = None  # `import kdpipe` raises ImportError from here on
import pyarrow as pa
from datasets import load_dataset

cache, out, hf_cache = sys.argv[1:]
loads = {
    "data_files": load_dataset("parquet", data_files=f"{cache}/shard-*.parquet", split="train",
                               cache_dir=hf_cache),
    "folder": load_dataset(cache, split="train", cache_dir=hf_cache),  # the card's configs
}
for name, ds in loads.items():
    table = ds.with_format("arrow")[:]
    with pa.ipc.new_file(f"{out}/{name}.arrow", table.schema) as writer:
        writer.write_table(table)
assert "kdpipe" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


@pytest.fixture()
def hub_cache(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    cache_teacher(small_config(tiny_teacher_dir, small_corpus, out, tail_temperatures=(2.0,),
                               progress=False))
    return out


def card_header(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_datasets_reads_the_shards_without_kdpipe(hub_cache: Path, tmp_path: Path) -> None:
    """With manifest.json, cache_config.json and tokenizer/*.json beside the shards, both a
    glob over the shards and the folder itself (through the card) load the shards alone, and
    every top-k column comes back equal, types included."""
    out = tmp_path / "read"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-I", "-c", WITHOUT_KDPIPE, str(hub_cache),
                             str(out), str(tmp_path / "hf-datasets")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = pq.read_table(sorted(hub_cache.glob("shard-*.parquet")),
                              columns=list(TOPK_COLUMNS))
    for name in ("data_files", "folder"):
        with pa.ipc.open_file(out / f"{name}.arrow") as reader:
            table = reader.read_all()
        assert table.num_rows == open_cache(hub_cache).manifest.num_sequences
        for column in TOPK_COLUMNS:
            assert table.column(column).combine_chunks().equals(
                reference.column(column).combine_chunks()), (name, column)


def test_the_dataset_card(hub_cache: Path) -> None:
    """The Hub's YAML header points at the shards; the text states teacher, tokenizer, k, τ,
    corpus, target tokens and bytes per target token."""
    m = open_cache(hub_cache).manifest
    card = hub_cache / DATASET_CARD_NAME
    assert card_header(card) == {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "shard-*.parquet"}]}],
        "tags": ["kdpipe", "knowledge-distillation"],
        "size_categories": ["n<1K"]}
    text = card.read_text(encoding="utf-8")
    for fact in (f"| teacher | `{m.teacher.name_or_path}` (hf backend, float32) |",
                 f"`{m.tokenizer.name_or_path}`, {m.vocab_size} ids; saved in `tokenizer/`",
                 f"k = {m.top_k}:", "log-probs at τ = 1 (raw)", "exact tail masses also at τ = 2;",
                 f"`{m.corpus.sources[0]}`", f"| target tokens | {m.num_targets:,} ",
                 f"| bytes per target token | {m.num_bytes / m.num_targets:.1f} |",
                 f"{len(m.shards)} Parquet shards"):
        assert fact in text, fact


def test_card_sizes_modes_and_cells(hub_cache: Path) -> None:
    assert [size_category(n) for n in (0, 999, 1000, 123_456, 5 * 10**9)] == [
        "n<1K", "n<1K", "1K<n<10K", "100K<n<1M", "n>1B"]
    m = open_cache(hub_cache).manifest
    odd = replace(m, teacher=replace(m.teacher, name_or_path="org/a|b", revision="abc123",
                                     backend="vllm", dtype="bfloat16"))
    assert "| teacher | `org/a\\|b` (revision `abc123`, vllm backend, bfloat16) |" in \
        render_card(odd)
    sampled = render_card(replace(m, cache_mode="sampled", samples=50, sample_seed=3))
    assert "| targets | 50 ids drawn per position" in sampled and "`sampled_counts`" in sampled
    assert "`topk_logprob_q`" in render_card(replace(m, encoding="compact"))


def hub_download(cache: Path, local_dir: Path) -> Path:
    """What `hf download REPO --repo-type dataset --local-dir DIR` leaves after
    `hf upload REPO CACHE . --repo-type dataset`: the files, the repository's .gitattributes, and
    the download metadata under .cache/huggingface/."""
    shutil.copytree(cache, local_dir)
    (local_dir / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    meta = local_dir / ".cache" / "huggingface" / "download"
    (meta / TOKENIZER_DIR).mkdir(parents=True)
    for path in cache.rglob("*"):
        if path.is_file():
            (meta / f"{path.relative_to(cache)}.metadata").write_text("0123abcd\n")
    return local_dir


def hub_snapshot(cache: Path, repo: Path) -> Path:
    """The same download without --local-dir: the hub cache's snapshot folder, each file a
    relative symbolic link to a blob named by its hash."""
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for path in cache.rglob("*"):
        if not path.is_file():
            continue
        blob = repo / "blobs" / sha256_file(path)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(cache)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.mark.parametrize("layout", ["local-dir", "hub-cache"])
def test_a_dataset_downloaded_from_the_hub_is_a_cache(
        layout: str, hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    downloaded = (hub_download(hub_cache, tmp_path / "download") if layout == "local-dir"
                  else hub_snapshot(hub_cache, tmp_path / "hub" / "datasets--u--kd"))
    code, stdout, err = run_cli(["verify", str(downloaded)], capsys)
    assert code == 0, err
    cache = open_cache(downloaded)
    assert cache.manifest == open_cache(hub_cache).manifest
    assert cache.checked_tokenizer_dir() == downloaded / TOKENIZER_DIR
    assert sum(t.num_rows for t in cache.iter_row_groups(["sample_id"])) == \
        cache.manifest.num_sequences


def test_an_uploaded_card_keeps_its_edits_on_resume(hub_cache: Path, tiny_teacher_dir: Path,
                                                    small_corpus: Path) -> None:
    """A finished cache is not rewritten by the same command, card included; one without a
    card (made before kdpipe wrote one) gets it."""
    card = hub_cache / DATASET_CARD_NAME
    card.write_text(card.read_text(encoding="utf-8") + "\nlicense: see the corpus\n")
    edited = card.read_bytes()
    cfg = small_config(tiny_teacher_dir, small_corpus, hub_cache, tail_temperatures=(2.0,),
                       progress=False)
    cache_teacher(cfg)
    assert card.read_bytes() == edited
    card.unlink()
    cache_teacher(cfg)
    assert card_header(card)["configs"][0]["data_files"][0]["path"] == "shard-*.parquet"
