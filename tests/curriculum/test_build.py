"""`kdpipe build-curriculum`: teacher, student, snapshot and length scores, ranks that follow
them, re-runs that do nothing, and `kdpipe inspect` on one or two curricula."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.curriculum.build import build_curriculum
from kdpipe.curriculum.cli import rank_correlation
from kdpipe.curriculum.config import BuildCurriculumConfig
from kdpipe.curriculum.student_scoring import score_student
from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas import shard as cols
from kdpipe.schemas import snapshot as snap
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.curriculum import read_curriculum, sample_ids_digest
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout

from ..conftest import STDLIB, run_cli
from ..families import permuted_tokenizer


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Path:
    """A few dozen sequences of <= 32 tokens, top-4, in shards of 16."""
    root = tmp_path_factory.mktemp("curriculum-cache")
    corpus = root / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for name in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "glob.py"):
            text = (STDLIB / name).read_text(encoding="utf-8")[:400]
            f.write(json.dumps({"text": text}) + "\n")
    out = root / "cache"
    cache_teacher(CacheTeacherConfig(teacher=str(tiny_teacher_dir), data=(str(corpus),),
                                     out=out, device="cpu", top_k=4, max_length=32,
                                     shard_size=16, batch_size=16))
    return out


def _shard_rows(cache_dir: Path) -> dict[str, np.ndarray | list[list[int]]]:
    """The per-sequence columns read straight from the shard files (not via Cache)."""
    files = sorted(cache_dir.glob("shard-*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    out: dict[str, np.ndarray | list[list[int]]] = {
        name: table.column(name).to_numpy().astype(np.float64)
        for name in (cols.TEACHER_NLL, cols.TEACHER_ENTROPY, cols.TEACHER_CONFIDENCE,
                     cols.NUM_TARGETS)}
    out[cols.SAMPLE_ID] = table.column(cols.SAMPLE_ID).to_numpy().astype(np.int64)
    out[cols.INPUT_IDS] = table.column(cols.INPUT_IDS).to_pylist()
    return out


def _cfg(cache: Path, out: Path, **overrides: object) -> BuildCurriculumConfig:
    values: dict[str, object] = dict(cache=str(cache), out=str(out), device="cpu",
                                     progress=False, buckets=4)
    values.update(overrides)
    return BuildCurriculumConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("metric", "column", "sign"), [
    ("nll", cols.TEACHER_NLL, 1.0), ("entropy", cols.TEACHER_ENTROPY, 1.0),
    ("confidence", cols.TEACHER_CONFIDENCE, -1.0)])
def test_teacher_ranks_follow_the_cached_stats(tmp_path: Path, small_cache: Path, metric: str,
                                               column: str, sign: float) -> None:
    c = build_curriculum(_cfg(small_cache, tmp_path / "c.parquet", metric=metric))
    rows = _shard_rows(small_cache)
    ids, stat = rows[cols.SAMPLE_ID], rows[column]
    assert isinstance(ids, np.ndarray) and isinstance(stat, np.ndarray)
    assert 20 <= ids.size <= 80
    expected = ids[np.lexsort((ids, sign * stat))]  # hardest last; ties by id
    assert c.ordered_ids().tolist() == expected.tolist()
    n = ids.size
    assert np.allclose(np.sort(c.percentile), np.arange(n) / (n - 1))
    assert np.bincount(c.bucket).tolist() == np.bincount(np.arange(n) * 4 // n).tolist()
    manifest = open_cache(small_cache).manifest
    assert c.info.cache_fingerprint == manifest.settings_fingerprint
    assert c.info.cache_sample_ids_sha256 == sample_ids_digest(ids)
    assert (c.info.source, c.info.metric, c.info.num_samples) == ("teacher", metric, n)
    back = read_curriculum(tmp_path / "c.parquet")
    assert np.array_equal(back.ordered_ids(), c.ordered_ids())


def test_length_baseline(tmp_path: Path, small_cache: Path) -> None:
    c = build_curriculum(_cfg(small_cache, tmp_path / "len.parquet", source="length"))
    rows = _shard_rows(small_cache)
    ids, lengths = rows[cols.SAMPLE_ID], rows[cols.NUM_TARGETS]
    assert isinstance(ids, np.ndarray) and isinstance(lengths, np.ndarray)
    assert c.info.metric == "tokens"
    assert c.ordered_ids().tolist() == ids[np.lexsort((ids, lengths))].tolist()


def test_student_scores_equal_an_independent_nll(tmp_path: Path, small_cache: Path,
                                                 tiny_gpt2_dir: Path) -> None:
    scores = score_student(open_cache(small_cache), str(tiny_gpt2_dir), batch_size=5,
                           device="cpu", chunk_size=7, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    rows = _shard_rows(small_cache)
    by_id = dict(zip(rows[cols.SAMPLE_ID].tolist(),  # type: ignore[union-attr]
                     rows[cols.INPUT_IDS], strict=True))
    for k, sid in enumerate(scores.sample_ids.tolist()):
        ids = torch.tensor([by_id[sid]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # (T-1, V)
        token_nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        assert scores.nll[k] == pytest.approx(float(token_nll.mean()), abs=1e-4)
        assert scores.confidence[k] == pytest.approx(float(torch.exp(-token_nll).mean()),
                                                     abs=1e-5)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        assert scores.entropy[k] == pytest.approx(float(entropy), abs=1e-4)
    c = build_curriculum(_cfg(small_cache, tmp_path / "s.parquet", source="student",
                              student=str(tiny_gpt2_dir), metric="confidence"))
    expected = scores.sample_ids[np.lexsort((scores.sample_ids, 1.0 - scores.confidence))]
    assert c.ordered_ids().tolist() == expected.tolist()
    assert c.info.settings["student_fingerprint"]


def _fake_run(run: Path, ids: np.ndarray, fingerprint: str, epochs: int) -> list[np.ndarray]:
    """Snapshots as train-student writes them; returns each epoch's confidences."""
    confidences = []
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        conf = rng.uniform(0.05, 0.95, ids.size).astype(np.float32)
        n = ids.size
        table = pa.Table.from_arrays([
            pa.array(ids, pa.int64()), pa.array(np.full(n, epoch, np.int32)),
            pa.array(np.full(n, 3, np.int64)), pa.array(-np.log(conf)),
            pa.array(conf), pa.array(np.full(n, 9, np.int32)), pa.array(np.ones(n, np.int32))],
            schema=snap.SNAPSHOT_SCHEMA)
        snap.write_snapshot(RunLayout(run).snapshots / snap.snapshot_name(epoch), table, epoch,
                            3, True, fingerprint)
        confidences.append(conf.astype(np.float64))
    return confidences


def test_snapshot_scores_and_data_maps(tmp_path: Path, small_cache: Path) -> None:
    cache = open_cache(small_cache)
    ids = cache.read_column(cols.SAMPLE_ID).to_numpy().astype(np.int64)[::2]  # a train split
    run = tmp_path / "run"
    conf = _fake_run(run, ids, cache.manifest.settings_fingerprint, epochs=3)
    last = build_curriculum(_cfg(small_cache, tmp_path / "last.parquet", source="snapshot",
                                 run=str(run)))
    loss = -np.log(conf[2].astype(np.float32)).astype(np.float64)
    assert last.info.settings["epochs"] == "2" and last.mean_confidence is None
    assert last.ordered_ids().tolist() == ids[np.lexsort((ids, loss))].tolist()

    data_map = build_curriculum(_cfg(small_cache, tmp_path / "map.parquet", source="snapshot",
                                     run=str(run), epochs=(0, 1, 2), metric="confidence"))
    stacked = np.stack(conf)  # (E, n)
    assert data_map.mean_confidence is not None and data_map.variability is not None
    assert np.allclose(data_map.mean_confidence, stacked.mean(0), atol=1e-6)
    assert np.allclose(data_map.variability, stacked.std(0), atol=1e-6)
    assert np.allclose(data_map.score, 1.0 - stacked.mean(0))
    ambiguous = build_curriculum(_cfg(small_cache, tmp_path / "var.parquet", source="snapshot",
                                      run=str(run), epochs=(0, 2), metric="variability"))
    assert np.allclose(ambiguous.score, stacked[[0, 2]].std(0))
    with pytest.raises(ConfigError, match=r"--epoch \[7\]"):
        build_curriculum(_cfg(small_cache, tmp_path / "x.parquet", source="snapshot",
                              run=str(run), epochs=(7,)))
    foreign = tmp_path / "foreign"
    _fake_run(foreign, ids, "0" * 64, epochs=1)
    with pytest.raises(ConfigError, match="another cache"):
        build_curriculum(_cfg(small_cache, tmp_path / "y.parquet", source="snapshot",
                              run=str(foreign)))


def test_reruns_are_recognised_and_other_settings_refused(tmp_path: Path, small_cache: Path
                                                          ) -> None:
    out = tmp_path / "c.parquet"
    build_curriculum(_cfg(small_cache, out))
    stamp = out.stat().st_mtime_ns
    build_curriculum(_cfg(small_cache, out))
    assert out.stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(ConfigError, match="other settings .* --overwrite"):
        build_curriculum(_cfg(small_cache, out, metric="entropy"))
    replaced = build_curriculum(_cfg(small_cache, out, metric="entropy", overwrite=True))
    assert read_curriculum(out).info == replaced.info
    stranger = tmp_path / "notes.txt"
    stranger.write_text("mine")
    with pytest.raises(ConfigError, match="not a curriculum"):
        build_curriculum(_cfg(small_cache, stranger))


def test_a_refused_build_writes_nothing(tmp_path: Path, small_cache: Path,
                                        tiny_tokenizer_dir: Path, tiny_gpt2_dir: Path) -> None:
    """A student whose tokenizer maps ids otherwise is refused after the options passed, and
    nothing of --out (nor its folder) exists."""
    student = tmp_path / "student"
    student.mkdir()
    for path in tiny_gpt2_dir.iterdir():
        (student / path.name).write_bytes(path.read_bytes())
    permuted_tokenizer(tiny_tokenizer_dir, student, 40, 41)  # overwrites its tokenizer files
    out = tmp_path / "curricula" / "student.parquet"
    with pytest.raises(ConfigError, match="tokenizer mismatch"):
        build_curriculum(_cfg(small_cache, out, source="student", student=str(student)))
    assert not out.parent.exists()


def test_options_are_validated_together(tmp_path: Path, small_cache: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_curriculum(_cfg(small_cache, tmp_path, source="student", metric="tokens",
                              epochs=(1,), buckets=0))
    message = str(caught.value)
    for text in ("--metric 'tokens'", "--student PATH", "--epoch applies", "--buckets 0",
                 "is a folder"):
        assert text in message, text
    with pytest.raises(ConfigError, match="--source 'oracle'"):
        build_curriculum(_cfg(small_cache, tmp_path / "o.parquet", source="oracle"))


def test_rank_correlation_by_hand(tmp_path: Path, small_cache: Path) -> None:
    """Spearman's ρ is Pearson's r of the ranks, ties given their average rank."""
    nll, conf = tmp_path / "nll.parquet", tmp_path / "conf.parquet"
    build_curriculum(_cfg(small_cache, nll, source="teacher", metric="nll"))
    build_curriculum(_cfg(small_cache, conf, source="teacher", metric="confidence"))
    a, b = read_curriculum(nll), read_curriculum(conf)

    def ranks(values: np.ndarray) -> np.ndarray:
        return np.array([np.sum(values < v) + (np.sum(values == v) + 1) / 2 for v in values])

    expected = np.corrcoef(ranks(a.score), ranks(b.score[np.searchsorted(b.sample_ids,
                                                                           a.sample_ids)]))
    assert rank_correlation(a, b)["spearman"] == pytest.approx(expected[0, 1])
    assert rank_correlation(a, a)["spearman"] == pytest.approx(1.0)


def test_cli_build_and_inspect(tmp_path: Path, small_cache: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    nll, conf = tmp_path / "nll.parquet", tmp_path / "conf.parquet"
    code, out, err = run_cli(["build-curriculum", "--cache", str(small_cache), "--out", str(nll),
                              "--source", "teacher", "--metric", "nll", "--no-progress"], capsys)
    assert code == 0, err
    assert "curriculum ready" in out and "teacher/nll" in out
    code, _, err = run_cli(["build-curriculum", "--cache", str(small_cache), "--out", str(conf),
                            "--metric", "confidence"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["inspect", str(nll)], capsys)
    assert code == 0, err
    assert "source" in out and "teacher" in out and "score_median" in out
    code, out, _ = run_cli(["inspect", str(nll), str(conf), "--json"], capsys)
    record = json.loads(out)
    expected = rank_correlation(read_curriculum(nll), read_curriculum(conf))
    assert record["spearman"] == pytest.approx(expected["spearman"])
    assert record["common_samples"] == read_curriculum(nll).info.num_samples
    assert -1.0 <= record["spearman"] <= 1.0
    code, out, _ = run_cli(["inspect", str(nll), str(nll), "--json"], capsys)
    assert json.loads(out)["spearman"] == pytest.approx(1.0)
    code, out, _ = run_cli(["inspect", str(small_cache)], capsys)  # caches still work
    assert code == 0 and "teacher_nll" in out
    code, _, err = run_cli(["build-curriculum", "--cache", str(small_cache), "--out",
                            str(tmp_path / "s.parquet"), "--source", "student"], capsys)
    assert code == 2 and "--student PATH" in err and len(err.strip().splitlines()) == 1
