"""cache-teacher end to end: content, resume after a crash, idempotence, refusals, verify."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from kdpipe.pipeline import cache_stage
from kdpipe.pipeline.cache_stage import cache_teacher
from kdpipe.pipeline.teacher_hf import teacher_targets
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import CacheFormatError, ConfigError

from .conftest import run_cli, small_config


def test_shards_hold_the_teacher_targets(tiny_teacher_dir: Path, small_corpus: Path,
                                         tmp_path: Path) -> None:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "cache",
                       tail_temperatures=(2.0,))
    manifest = cache_teacher(cfg)
    assert manifest.complete and len(manifest.shards) >= 2
    cache = open_cache(cfg.out)
    assert cache.verify() == []
    table = pq.read_table(cfg.out / manifest.shards[0].file)
    assert table.column("sample_id").to_pylist() == list(range(table.num_rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    row = table.slice(2, 1).to_pylist()[0]
    expected = teacher_targets(model, [row["input_ids"]], 8, [2.0], pad_id=1)[0]
    k = manifest.top_k
    t = len(row["input_ids"]) - 1
    assert row["num_targets"] == t
    np.testing.assert_array_equal(np.array(row["topk_ids"]).reshape(t, k), expected.topk_ids)
    np.testing.assert_allclose(np.array(row["topk_logprobs"]).reshape(t, k),
                               expected.topk_logprobs, rtol=1e-3, atol=1e-3)  # float16
    np.testing.assert_allclose(row["tail_logmass"], expected.tail_logmass, atol=1e-5)
    np.testing.assert_allclose(row["target_logprob"], expected.target_logprob, atol=1e-5)
    np.testing.assert_allclose(np.array(row["tail_logmass_tempered"]),
                               expected.tail_logmass_tempered[:, 0], atol=1e-5)
    assert row["teacher_nll"] == pytest.approx(expected.nll, rel=1e-5)
    assert table.schema.field("topk_ids").type.value_type == "uint16"
    # The per-column Parquet encodings really apply (pyarrow ignores non-leaf names silently).
    row_group = pq.ParquetFile(cfg.out / manifest.shards[0].file).metadata.row_group(0)
    encodings = {row_group.column(i).path_in_schema.split(".")[0]: row_group.column(i).encodings
                 for i in range(row_group.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_ids"]
    assert "RLE_DICTIONARY" not in encodings["topk_ids"]
    assert "BYTE_STREAM_SPLIT" in encodings["topk_logprobs"]
    assert "RLE_DICTIONARY" not in encodings["tail_logmass"]


def test_interrupted_run_resumes_to_the_same_cache(tiny_teacher_dir: Path, small_corpus: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reference = cache_teacher(small_config(tiny_teacher_dir, small_corpus, tmp_path / "ref"))

    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "crash")
    real_write = cache_stage.write_shard
    calls = {"n": 0}

    def crash_on_third(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_stage, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg)
    with pytest.raises(CacheFormatError, match="incomplete"):
        open_cache(cfg.out)
    assert not list(cfg.out.glob(".*tmp*"))  # no half-written shard left behind

    monkeypatch.setattr(cache_stage, "write_shard", real_write)
    computed: list[int] = []
    real_run = cache_stage._run_teacher
    monkeypatch.setattr(cache_stage, "_run_teacher",
                        lambda model, seqs, *a: computed.append(len(seqs)) or real_run(
                            model, seqs, *a))
    resumed = cache_teacher(cfg)
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in reference.shards]
    assert len(computed) == len(reference.shards) - 2  # the two finished shards were kept
    assert open_cache(cfg.out).verify() == []


def test_rerun_is_a_no_op_and_other_settings_are_refused(tiny_teacher_dir: Path,
                                                         small_corpus: Path,
                                                         tmp_path: Path) -> None:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "cache")
    first = cache_teacher(cfg)
    assert cache_teacher(cfg) == first
    with pytest.raises(ConfigError, match=rf"different settings \(top_k: {cfg.top_k} -> 4\); "
                                          r"re-run with the cache's values.*--overwrite"):
        cache_teacher(replace(cfg, top_k=4))
    assert open_cache(cfg.out).manifest == first  # nothing lost
    replaced = cache_teacher(replace(cfg, top_k=4, overwrite=True))
    assert replaced.top_k == 4 and open_cache(cfg.out).verify() == []


def test_changed_corpus_is_detected_on_resume(tiny_teacher_dir: Path, small_corpus: Path,
                                              tmp_path: Path) -> None:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "cache")
    manifest = cache_teacher(cfg)
    manifest_file = cfg.out / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["complete"] = False
    manifest_file.write_text(json.dumps(data))
    # Same size and sampled bytes would fool a fingerprint; the token hash still catches it.
    shard = manifest.shards[0]
    data["shards"][0]["tokens_sha256"] = "0" * 64
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"{shard.file}: the corpus changed"):
        cache_teacher(cfg)


def test_packed_layout_fills_blocks(tiny_teacher_dir: Path, small_corpus: Path,
                                    tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "packed", pack=True,
                       progress=False)
    manifest = cache_teacher(cfg)
    assert "cache-teacher:" not in capfd.readouterr().err  # no progress bar
    assert manifest.layout == "packed"
    lengths = [len(ids) for t in open_cache(cfg.out).iter_row_groups(["input_ids"])
               for ids in t.column("input_ids").to_pylist()]
    assert all(n == cfg.max_length for n in lengths[:-1]) and 2 <= lengths[-1] <= 48


def test_verify_finds_flipped_byte_missing_shard_and_edited_manifest(
        tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    manifest = cache_teacher(small_config(tiny_teacher_dir, small_corpus, out))
    assert run_cli(["verify", str(out)], capsys)[0] == 0

    shard = out / manifest.shards[1].file
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 1 and f"{shard.name}: sha256 differs" in err

    (out / manifest.shards[2].file).unlink()
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 1 and "missing" in err

    manifest_file = out / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["top_k"] = 4
    manifest_file.write_text(json.dumps(data))
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 2 and "edited by hand" in err and err.count("\n") == 1


def test_inspect_reports_the_cache(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    manifest = cache_teacher(small_config(tiny_teacher_dir, small_corpus, out))
    code, stdout, _ = run_cli(["inspect", str(out), "--json"], capsys)
    summary = json.loads(stdout)
    assert code == 0
    assert summary["top_k"] == 8 and summary["sequences"] == manifest.num_sequences
    assert summary["tokens"] == manifest.num_tokens and summary["teacher_nll"] > 0
    assert summary["bytes_per_token"] == pytest.approx(
        manifest.num_bytes / manifest.num_targets)
    tails = np.concatenate([np.asarray(t.column("tail_logmass").to_pylist()[i])
                            for t in open_cache(out).iter_row_groups(["tail_logmass"])
                            for i in range(t.num_rows)])
    assert summary["topk_mass_positions"] == manifest.num_targets == tails.size
    assert summary["topk_mass"] == pytest.approx(float(np.mean(1 - np.exp(tails))), rel=1e-6)
    assert 0 < summary["topk_mass"] < 1
