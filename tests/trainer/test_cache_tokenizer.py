"""A cache carries its tokenizer: `tokenizer/` with every file's size and sha256 in the manifest,
checked like shards, and loaded by default, so a student needs nothing but the cache folder,
wherever it was copied to. Older caches still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import CacheFormatError, ConfigError
from kdpipe.schemas.fingerprint import tokenizer_fingerprint
from kdpipe.schemas.io import sha256_file
from kdpipe.schemas.manifest import TOKENIZER_DIR, manifest_path
from kdpipe.schemas.records import to_dict
from kdpipe.tokenizer_identity import load_tokenizer
from kdpipe.trainer.train import train

from ..conftest import run_cli
from ..families import permuted_tokenizer
from ..pipeline.conftest import small_config as cache_config
from .conftest import small_config


@pytest.fixture()
def moved_cache(tmp_path: Path, tiny_teacher_dir: Path, trainer_corpus: Path,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache made with a relative --teacher (which is also its tokenizer), then moved to
    another folder and the teacher gone: what another node or a bucket's copy sees. The
    current folder is a third one."""
    made = tmp_path / "made"
    shutil.copytree(tiny_teacher_dir, made / "teacher")
    monkeypatch.chdir(made)
    cache_teacher(cache_config(Path("teacher"), trainer_corpus, Path("cache"), progress=False))
    assert open_cache("cache").manifest.tokenizer.name_or_path == "teacher"
    moved = tmp_path / "elsewhere" / "cache"
    shutil.move(made / "cache", moved)
    shutil.rmtree(made)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    return moved


def as_schema_3(cache: Path) -> None:
    """Rewrite the manifest as kdpipe wrote it before tokenizer files were recorded."""
    data = to_dict(open_cache(cache).manifest)
    del data["tokenizer"]["files"]
    data["schema_version"] = 3
    manifest_path(cache).write_text(json.dumps(data))


def test_the_tokenizer_files_are_fingerprinted(moved_cache: Path) -> None:
    files = open_cache(moved_cache).manifest.tokenizer.files
    folder = moved_cache / TOKENIZER_DIR
    assert [f.file for f in files] == sorted(p.name for p in folder.iterdir())
    assert "tokenizer.json" in [f.file for f in files]
    assert all((f.bytes, f.sha256) == ((folder / f.file).stat().st_size,
                                       sha256_file(folder / f.file)) for f in files)
    # Readable by whoever can read the cache (a shared folder, another user's node).
    assert folder.stat().st_mode & 0o777 == moved_cache.stat().st_mode & 0o777


def test_a_moved_cache_trains_without_tokenizer(moved_cache: Path, tmp_path: Path,
                                                student_config_file: Path,
                                                tiny_tokenizer_dir: Path) -> None:
    """The manifest names `teacher`, relative to a folder that is gone: the cache's own copy
    is loaded, and saved with the student. A --tokenizer is still checked against it."""
    run = tmp_path / "run"
    train(small_config(moved_cache, run, student_config=str(student_config_file), max_steps=2))
    saved = load_tokenizer(run / "final", False, "test")
    assert tokenizer_fingerprint(saved) == open_cache(moved_cache).manifest.tokenizer.fingerprint
    other = permuted_tokenizer(tiny_tokenizer_dir, tmp_path / "permuted", 40, 41)
    with pytest.raises(ConfigError, match=r"tokenizer mismatch: .* \(id 40 is "):
        train(small_config(moved_cache, tmp_path / "run2", max_steps=1,
                           student_config=str(student_config_file), tokenizer=str(other)))


@pytest.mark.parametrize("fault, message", [
    ("edit", r"tokenizer/tokenizer_config.json: sha256 differs from the manifest"),
    ("remove", r"tokenizer/tokenizer.json: missing"),
    ("add", r"tokenizer/extra.txt: file not listed in the manifest"),
])
def test_an_altered_tokenizer_copy_is_refused(fault: str, message: str, moved_cache: Path,
                                              tmp_path: Path, student_config_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = moved_cache / TOKENIZER_DIR
    if fault == "edit":  # same mapping, other bytes: a fault all the same
        config = folder / "tokenizer_config.json"
        config.write_text(config.read_text().replace("\n", " ", 1))  # the same size
    elif fault == "remove":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "extra.txt").write_text("x")
    code, _, err = run_cli(["verify", str(moved_cache)], capsys)
    assert code == 1 and f"FAULT {message.replace(chr(92), '')}" in err
    with pytest.raises(CacheFormatError, match=f"cache {moved_cache}: {message}.*kdpipe verify"):
        train(small_config(moved_cache, tmp_path / "run", max_steps=1,
                           student_config=str(student_config_file)))
    # --no-verify-reads: trust the cache as it stands
    if fault != "remove":
        train(small_config(moved_cache, tmp_path / "run", max_steps=1, verify_reads=False,
                           student_config=str(student_config_file)))


def test_older_caches_still_read(moved_cache: Path, tmp_path: Path, student_config_file: Path,
                                 tiny_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema 3: the tokenizer copy is loaded unchecked. Without the copy (schema 1), the
    tokenizer the manifest names is the fallback; when it does not load, the error says why
    and what to pass."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # `teacher` is
    # no hub name either: fail at once instead of retrying an unreachable hub
    as_schema_3(moved_cache)
    assert open_cache(moved_cache).manifest.tokenizer.files == ()
    assert run_cli(["verify", str(moved_cache)], capsys)[0] == 0
    train(small_config(moved_cache, tmp_path / "run", max_steps=1,
                       student_config=str(student_config_file)))

    shutil.rmtree(moved_cache / TOKENIZER_DIR)
    with pytest.raises(ConfigError, match=r"cache .* has no tokenizer/ folder .* names, "
                                          r"teacher, does not load from the current folder .*"
                                          r"pass --tokenizer"):
        train(small_config(moved_cache, tmp_path / "run2", max_steps=1,
                           student_config=str(student_config_file)))
    train(small_config(moved_cache, tmp_path / "run3", max_steps=1,
                       student_config=str(student_config_file),
                       tokenizer=str(tiny_tokenizer_dir)))


def test_cache_teacher_upgrades_an_older_cache_in_place(tmp_path: Path, tiny_teacher_dir: Path,
                                                         trainer_corpus: Path) -> None:
    """The same command over a schema 3 cache records the tokenizer's files (and makes the
    folder as readable as the cache), keeping every shard as it is."""
    cfg = cache_config(tiny_teacher_dir, trainer_corpus, tmp_path / "cache", progress=False)
    cache_teacher(cfg)
    as_schema_3(cfg.out)
    (cfg.out / TOKENIZER_DIR).chmod(0o700)  # as kdpipe before schema 4 made it
    shards = {p.name: p.stat().st_mtime_ns for p in cfg.out.glob("shard-*.parquet")}
    manifest = cache_teacher(cfg)
    assert manifest.schema_version == 4 and manifest.tokenizer.files
    assert open_cache(cfg.out).manifest == manifest
    assert (cfg.out / TOKENIZER_DIR).stat().st_mode & 0o777 == cfg.out.stat().st_mode & 0o777
    assert {p.name: p.stat().st_mtime_ns for p in cfg.out.glob("shard-*.parquet")} == shards
