"""A cache resumes whatever `--threads` the re-run uses: threads never change its content."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.pipeline import cache_stage
from kdpipe.schemas.cache import open_cache

from .conftest import run_cli


def test_resume_with_other_threads(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(small_corpus),
            "--out", str(out), "--top-k", "8", "--max-length", "48", "--shard-size", "5",
            "--batch-size", "4", "--no-progress"]
    real_write = cache_stage.write_shard
    written = {"n": 0}

    def crash_on_third(*a: object, **k: object) -> object:
        written["n"] += 1
        if written["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_write(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_stage, "write_shard", crash_on_third)
    code, _, _ = run_cli([*args, "--threads", "1"], capsys)
    assert code == 130 and written["n"] == 3  # interrupted, as by Ctrl-C
    monkeypatch.setattr(cache_stage, "write_shard", real_write)
    computed: list[int] = []
    real_run = cache_stage._run_teacher
    monkeypatch.setattr(cache_stage, "_run_teacher",
                        lambda model, seqs, *a: computed.append(len(seqs)) or real_run(
                            model, seqs, *a))
    code, out_text, err = run_cli([*args, "--threads", "2"], capsys)
    assert code == 0, err
    assert "cache ready" in out_text
    shards = len(open_cache(out).manifest.shards)
    assert len(computed) == shards - 2  # the two shards of the first run were kept
