"""vLLM prompt log-probs -> cache columns, on CPU: alignment, the actual-token column, tails.

The structures come from `vllm_mirror` (vLLM's own classes when vLLM is installed); the
whole `--backend vllm` path of cache-teacher runs against a fake engine with a transformers
model underneath, and is compared with the hf backend on the same corpus.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdpipe.pipeline import cache_stage, teacher_vllm
from kdpipe.pipeline.cache_stage import cache_teacher, resolve_backend
from kdpipe.pipeline.teacher_hf import teacher_targets
from kdpipe.pipeline.teacher_vllm import (
    TAIL_FLOOR,
    VllmTeacher,
    convert_prompt_logprobs,
    entropy_lower_bound,
    tail_logmass_from_topk,
    targets_from_topk,
)
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError, TeacherOutputError

from .conftest import run_cli, small_config
from .vllm_mirror import (
    FakeLLM,
    classes,
    dict_prompt_logprobs,
    engine_rows,
    fake_vllm,
    flat_prompt_logprobs,
    legacy_dict_prompt_logprobs,
)

K = 8


@pytest.fixture(scope="module")
def teacher_and_prompts(tiny_teacher_dir: Path) -> tuple[object, list[list[int]]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    texts = ["def wrap(text, width=70):\n    return text", "import bisect\nx = [1, 2]",
             "a b"]
    return model, [tokenizer(t)["input_ids"] for t in texts]


def _rows(model: object, prompt: list[int]) -> tuple[list[list[int]], list[list[float]],
                                                      list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]  # type: ignore[operator]
    return engine_rows(logits, prompt, K)


def test_flat_conversion_equals_the_hf_backend(teacher_and_prompts: tuple) -> None:
    model, prompts = teacher_and_prompts
    vocab = model.config.vocab_size
    for prompt in prompts:
        expected = teacher_targets(model, [prompt], K, (), pad_id=1)[0]
        got = convert_prompt_logprobs(flat_prompt_logprobs(_rows(model, prompt)), prompt, K,
                                      vocab)
        assert got.topk_ids.shape == (len(prompt) - 1, K)  # position t predicts token t + 1
        np.testing.assert_array_equal(got.topk_ids, expected.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, expected.topk_logprobs, atol=2e-5)
        np.testing.assert_allclose(got.target_logprob, expected.target_logprob, atol=2e-5)
        np.testing.assert_allclose(np.exp(got.tail_logmass), np.exp(expected.tail_logmass),
                                   atol=2e-6)
        assert got.tail_logmass_tempered is None
        assert got.nll == pytest.approx(expected.nll, abs=1e-5)
        assert got.confidence == pytest.approx(expected.confidence, abs=1e-6)
        assert got.top1 == expected.top1
        assert got.entropy <= expected.entropy + 1e-5  # a lower bound ...
        assert got.entropy >= 0.5 * expected.entropy  # ... and not a vacuous one here


def test_dict_forms_give_the_same_columns(teacher_and_prompts: tuple) -> None:
    model, prompts = teacher_and_prompts
    vocab = model.config.vocab_size
    for prompt in prompts:
        rows = _rows(model, prompt)
        flat = convert_prompt_logprobs(flat_prompt_logprobs(rows), prompt, K, vocab)
        for form in (dict_prompt_logprobs(rows), legacy_dict_prompt_logprobs(rows)):
            other = convert_prompt_logprobs(form, prompt, K, vocab)
            np.testing.assert_array_equal(other.topk_ids, flat.topk_ids)
            np.testing.assert_array_equal(other.topk_logprobs, flat.topk_logprobs)
            np.testing.assert_array_equal(other.target_logprob, flat.target_logprob)
            np.testing.assert_array_equal(other.tail_logmass, flat.tail_logmass)
            assert (other.entropy, other.top1) == (flat.entropy, flat.top1)


def _one_position(actual: int, top_ids: list[int], top_lps: list[float], actual_lp: float,
                  rank: int) -> tuple[list[list[int]], list[list[float]], list[int]]:
    return [[actual, *top_ids]], [[actual_lp, *top_lps]], [rank]


def test_actual_token_inside_and_outside_the_top_k() -> None:
    p = np.array([0.5, 0.2, 0.1, 0.08, 0.07, 0.05])  # V = 6, K = 3
    lp = np.log(p).tolist()
    # Inside: the flat form repeats it (K + 1 entries), the dict form merges it (K entries).
    rows = _one_position(1, [0, 1, 2], lp[:3], lp[1], rank=2)
    for form in (flat_prompt_logprobs(rows), dict_prompt_logprobs(rows)):
        got = convert_prompt_logprobs(form, [9, 1], 3, 6)
        assert got.topk_ids.tolist() == [[0, 1, 2]]
        assert got.target_logprob[0] == pytest.approx(math.log(0.2), abs=1e-6)
        assert got.tail_logmass[0] == pytest.approx(math.log(0.2), abs=1e-6)
        assert got.top1 == 0.0 and got.nll == pytest.approx(-math.log(0.2), abs=1e-6)
    # Outside: its log-prob still comes through, and the tail holds at least its mass.
    rows = _one_position(5, [0, 1, 2], lp[:3], lp[5], rank=6)
    for form in (flat_prompt_logprobs(rows), dict_prompt_logprobs(rows),
                 legacy_dict_prompt_logprobs(rows)):
        got = convert_prompt_logprobs(form, [9, 5], 3, 6)
        assert got.topk_ids.tolist() == [[0, 1, 2]]
        assert got.target_logprob[0] == pytest.approx(math.log(0.05), abs=1e-6)
        assert got.confidence == pytest.approx(0.05, abs=1e-7)


def _positions(*positions: tuple[list[list[int]], list[list[float]], list[int]]
               ) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """Rows of several `_one_position`s, in order."""
    ids, lps, ranks = zip(*positions, strict=True)
    return sum(ids, []), sum(lps, []), sum(ranks, [])


def _flat(*positions: tuple[list[int], list[float], list[int]]) -> object:
    """A FlatLogprobs with the given (ids, log-probs, ranks) per position, as given."""
    flat_cls, _ = classes()
    flat = flat_cls()
    flat.append(None)
    for ids, lps, ranks in positions:
        flat.append_fast(ids, lps, iter(ranks), itertools.repeat(None))
    return flat


P6 = np.log([0.5, 0.2, 0.1, 0.08, 0.07, 0.05]).tolist()  # V = 6, K = 3 below


def test_only_entries_ranked_within_k_are_top_k() -> None:
    # Position 2: vLLM returned K - 1 top entries; the prompt token (rank 6) must not fill in.
    # The dict then holds K entries (the old count check accepted it), the flat form K.
    rows = _positions(_one_position(1, [0, 1, 2], P6[:3], P6[1], rank=2),
                      _one_position(5, [0, 1], P6[:2], P6[5], rank=6))
    for form in (flat_prompt_logprobs(rows), dict_prompt_logprobs(rows)):
        with pytest.raises(TeacherOutputError, match=r"target position 1 have 2 top entries "
                           r"\(rank <= 3\), "
                           r"expected 3: max_logprobs and prompt_logprobs must be >= --top-k"):
            convert_prompt_logprobs(form, [9, 1, 5], 3, 6)


def test_flat_top_entries_must_be_ranked_1_to_k() -> None:
    good = ([1, 0, 1, 2], [P6[1], *P6[:3]], [2, 1, 2, 3])
    # K + 1 wide, but no rank-3 entry: the prompt token and a rank-4 id may not stand in.
    gap = ([5, 0, 1, 3], [P6[5], P6[0], P6[1], P6[3]], [6, 1, 2, 4])
    with pytest.raises(TeacherOutputError, match=r"target position 1 have 2 top entries"):
        convert_prompt_logprobs(_flat(good, gap), [9, 1, 5], 3, 6)
    # The top-K out of rank order: read by rank, not by place.
    shuffled = ([5, 1, 0, 2], [P6[5], P6[1], P6[0], P6[2]], [6, 2, 1, 3])
    got = convert_prompt_logprobs(_flat(good, shuffled), [9, 1, 5], 3, 6)
    assert got.topk_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    np.testing.assert_array_equal(got.topk_logprobs, np.float32([P6[:3], P6[:3]]))


def test_regular_flat_output_takes_the_fast_path_unchanged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _positions(_one_position(1, [0, 1, 2], P6[:3], P6[1], rank=2),
                      _one_position(5, [0, 1, 2], P6[:3], P6[5], rank=6))
    by_position = convert_prompt_logprobs(dict_prompt_logprobs(rows), [9, 1, 5], 3, 6)

    def no_fallback(*args: object) -> None:
        raise AssertionError("a regular, correctly ranked container was read position by position")

    monkeypatch.setattr(teacher_vllm, "_position", no_fallback)
    flat = flat_prompt_logprobs(rows)
    unranked = flat_prompt_logprobs(rows)
    unranked.ranks = [None] * len(unranked.ranks)  # very old vLLMs: the layout is trusted
    for form in (flat, unranked):
        got = convert_prompt_logprobs(form, [9, 1, 5], 3, 6)
        assert got.topk_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
        np.testing.assert_array_equal(got.topk_logprobs, np.float32([P6[:3], P6[:3]]))
        np.testing.assert_array_equal(got.target_logprob, np.float32([P6[1], P6[5]]))
        for column in ("topk_ids", "topk_logprobs", "target_logprob", "tail_logmass"):
            np.testing.assert_array_equal(getattr(got, column), getattr(by_position, column))


def test_padding_ids_in_the_top_k_are_refused() -> None:
    # The head has 8 rows, the tokenizer 6 ids: id 7 is a padding row, at position 2.
    rows = _positions(_one_position(1, [0, 1, 2], P6[:3], P6[1], rank=2),
                      _one_position(5, [0, 7, 1], P6[:3], P6[5], rank=7))
    for form in (flat_prompt_logprobs(rows), dict_prompt_logprobs(rows)):
        with pytest.raises(TeacherOutputError, match=r"target position 1 have id 7 in the top-K, "
                           r".* padding "
                           r"rows \(ids >= 6\); use --backend hf"):
            convert_prompt_logprobs(form, [9, 1, 5], 3, 6)
    # The same ids within the real vocabulary are fine.
    assert convert_prompt_logprobs(flat_prompt_logprobs(rows), [9, 1, 5], 3, 8).topk_ids[1, 1] == 7


def test_engine_errors_name_the_sample_and_target_position() -> None:
    rows = _positions(_one_position(1, [0, 1, 2], P6[:3], P6[1], rank=2),
                      _one_position(5, [0, 7, 1], P6[:3], P6[5], rank=7))

    class Engine:
        def generate(self, prompts: list[list[int]], params: object, use_tqdm: bool
                     ) -> list[object]:
            return [SimpleNamespace(prompt_token_ids=p, prompt_logprobs=dict_prompt_logprobs(rows))
                    for p in prompts]

    teacher = VllmTeacher(Engine(), None, lambda prompt_token_ids: prompt_token_ids, 3, 6)
    with pytest.raises(TeacherOutputError, match=r"^sample 42: vLLM prompt log-probs at target "
                                                 r"position 1 have id 7"):
        teacher.targets([[9, 1, 5]], [42])


def test_misaligned_or_truncated_output_is_refused(teacher_and_prompts: tuple) -> None:
    model, prompts = teacher_and_prompts
    prompt = prompts[0]
    flat = flat_prompt_logprobs(_rows(model, prompt))
    with pytest.raises(RuntimeError, match="expected"):
        convert_prompt_logprobs(flat, prompt[:-1], K, 320)  # one entry too many
    shifted = [prompt[0], *prompt[2:], prompt[1]]  # same length, other tokens
    with pytest.raises(TeacherOutputError, match="target position 0"):
        convert_prompt_logprobs(flat, shifted, K, 320)
    with pytest.raises(RuntimeError, match="expected 4 or 5"):
        convert_prompt_logprobs(dict_prompt_logprobs(_rows(model, prompt)), prompt, 4, 320)


def test_tail_is_stable_and_bounded() -> None:
    target_in = np.array([True])
    # Rounding pushes the sum to 1 (or above): the tail is floored, not NaN or -inf.
    lp = np.log(np.array([[0.9, 0.1 + 1e-7]], dtype=np.float64)).astype(np.float32)
    assert tail_logmass_from_topk(lp, lp[:, 0], target_in, 1000)[0] == pytest.approx(
        math.log(TAIL_FLOOR))
    # A tiny but resolvable tail is kept to float precision (no 1 - sum cancellation in float32).
    lp = np.log(np.array([[0.99, 0.00999]])).astype(np.float32)
    got = tail_logmass_from_topk(lp, lp[:, 0], target_in, 1000)[0]
    assert math.exp(got) == pytest.approx(1 - np.exp(lp.astype(np.float64)).sum(), rel=1e-6)
    # The actual token outside the top-k bounds the tail from below ...
    lp = np.log(np.array([[0.7, 0.29999999]])).astype(np.float32)
    got = tail_logmass_from_topk(lp, np.array([math.log(1e-4)]), np.array([False]), 1000)[0]
    assert got == pytest.approx(math.log(1e-4))
    # ... and (V - K) * p_K from above: no tail id is likelier than the K-th.
    lp = np.log(np.array([[0.5, 0.01]])).astype(np.float32)
    got = tail_logmass_from_topk(lp, lp[:, 0], target_in, 12)[0]
    assert math.exp(got) == pytest.approx(10 * 0.01, rel=1e-5)
    # K = V: no tail at all, and the entropy is exact.
    p = np.array([[0.6, 0.3, 0.1]])
    tail = tail_logmass_from_topk(np.log(p), np.log(p[:, 0]), target_in, 3)
    assert tail[0] == -np.inf
    assert entropy_lower_bound(np.log(p), tail)[0] == pytest.approx(-(p * np.log(p)).sum())


def test_entropy_estimate_is_a_lower_bound() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        vocab = int(rng.integers(5, 60))
        k = int(rng.integers(1, vocab))
        p = rng.dirichlet(np.full(vocab, float(rng.choice([0.05, 0.5, 5.0]))))
        p = np.sort(p)[::-1]
        lp = np.log(np.maximum(p, 1e-300))
        exact = -(p * lp).sum()
        top_lp = lp[None, :k]
        tail = tail_logmass_from_topk(top_lp, top_lp[:, 0], np.array([True]), vocab, floor=0)
        assert entropy_lower_bound(top_lp, tail)[0] <= exact + 1e-9
    # Equality when the tail is one id.
    p = np.array([0.5, 0.3, 0.2])
    lp = np.log(p)[None, :2]
    got = targets_from_topk(np.array([[0, 1]]), lp, lp[:, 0], np.array([0]), 3)
    assert got.entropy == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)


@pytest.fixture()
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make `--backend vllm` run here: vLLM 'installed', a 'GPU' visible, the fake engine."""
    FakeLLM.instances.clear()
    monkeypatch.setattr(teacher_vllm, "vllm_importable", lambda: True)
    monkeypatch.setattr(teacher_vllm, "cuda_available", lambda: True)
    monkeypatch.setattr(teacher_vllm, "require_vllm", lambda: fake_vllm())
    yield
    FakeLLM.instances.clear()


def test_vllm_backend_end_to_end_matches_hf(fake_engine: None, tiny_teacher_dir: Path,
                                            small_corpus: Path, tmp_path: Path) -> None:
    hf_cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "hf", backend="hf",
                          dtype="float32")
    hf = cache_teacher(hf_cfg)
    cfg = replace(hf_cfg, out=tmp_path / "vllm", backend="vllm")
    manifest = cache_teacher(cfg)

    (engine,) = FakeLLM.instances
    assert engine.kwargs["max_logprobs"] == K and engine.kwargs["skip_tokenizer_init"]
    assert engine.kwargs["logprobs_mode"] == "raw_logprobs"
    assert engine.kwargs["enable_prefix_caching"] is False
    assert engine.kwargs["max_model_len"] == cfg.max_length + 1
    assert engine.generate_calls == [s.rows for s in manifest.shards]  # one call per shard

    assert manifest.teacher.backend == "vllm" and manifest.tail_mode == "uniform"
    assert manifest.entropy_mode == "topk_lower_bound" and manifest.tail_temperatures == ()
    assert hf.entropy_mode == "exact" and hf.tail_mode == "exact"
    assert [(s.file, s.rows, s.tokens_sha256, s.first_sample_id) for s in manifest.shards] == \
        [(s.file, s.rows, s.tokens_sha256, s.first_sample_id) for s in hf.shards]
    assert open_cache(cfg.out).verify() == []
    for ours, theirs in zip(manifest.shards, hf.shards, strict=True):
        a = pq.read_table(cfg.out / ours.file).to_pydict()
        b = pq.read_table(hf_cfg.out / theirs.file).to_pydict()
        assert a["sample_id"] == b["sample_id"] and a["input_ids"] == b["input_ids"]
        assert a["topk_ids"] == b["topk_ids"]
        # Stored as float16: a 1e-6 difference upstream can flip the rounding by one step
        # of the float16 grid, |x| * 2**-10 (0.004 at -5.6).
        np.testing.assert_allclose(np.concatenate(a["topk_logprobs"]),
                                   np.concatenate(b["topk_logprobs"]), rtol=2**-10, atol=1e-5)
        np.testing.assert_allclose(np.concatenate(a["target_logprob"]),
                                   np.concatenate(b["target_logprob"]), atol=2e-5)
        np.testing.assert_allclose(np.exp(np.concatenate(a["tail_logmass"])),
                                   np.exp(np.concatenate(b["tail_logmass"])), atol=2e-6)
        for stat in ("teacher_nll", "teacher_confidence", "teacher_top1"):
            np.testing.assert_allclose(a[stat], b[stat], rtol=1e-5, atol=1e-6)
        assert all(x <= y + 1e-5 for x, y in zip(a["teacher_entropy"], b["teacher_entropy"],
                                                  strict=True))


def test_vllm_without_flat_logprobs_falls_back(fake_engine: None, tiny_teacher_dir: Path,
                                               small_corpus: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    flat = cache_teacher(small_config(tiny_teacher_dir, small_corpus, tmp_path / "flat",
                                      backend="vllm", dtype="float32", shard_size=100))
    monkeypatch.setattr(teacher_vllm, "require_vllm", lambda: fake_vllm(flat_supported=False))
    dicts = cache_teacher(small_config(tiny_teacher_dir, small_corpus, tmp_path / "dict",
                                       backend="vllm", dtype="float32", shard_size=100))
    assert [s.sha256 for s in dicts.shards] == [s.sha256 for s in flat.shards]


def test_auto_backend_choice(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config(tiny_teacher_dir, small_corpus, tmp_path / "c", backend="auto")
    assert resolve_backend(replace(cfg, backend="hf")) == "hf"
    monkeypatch.setattr(teacher_vllm, "vllm_importable", lambda: False)
    assert resolve_backend(cfg) == "hf"
    monkeypatch.setattr(teacher_vllm, "vllm_importable", lambda: True)
    monkeypatch.setattr(teacher_vllm, "cuda_available", lambda: False)
    assert resolve_backend(cfg) == "hf"
    monkeypatch.setattr(teacher_vllm, "cuda_available", lambda: True)
    assert resolve_backend(cfg) == "vllm"
    assert resolve_backend(replace(cfg, tail_temperatures=(2.0,))) == "hf"  # exact tails
    assert resolve_backend(replace(cfg, device="cpu")) == "hf"


def test_vllm_refusals(tiny_teacher_dir: Path, small_corpus: Path, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(small_corpus),
            "--out", str(out), "--backend", "vllm"]
    monkeypatch.setattr(teacher_vllm, "vllm_importable", lambda: False)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "pip install 'kdpipe[vllm]'" in err and err.count("\n") == 1
    monkeypatch.setattr(teacher_vllm, "vllm_importable", lambda: True)
    monkeypatch.setattr(teacher_vllm, "cuda_available", lambda: False)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "needs a CUDA GPU" in err
    code, _, err = run_cli(args + ["--tail-temperatures", "2"], capsys)
    assert code == 2 and "--tail-temperatures needs --backend hf" in err
    code, _, err = run_cli(args[:-1] + ["hf", "--tensor-parallel-size", "2"], capsys)
    assert code == 2 and "--tensor-parallel-size splits a teacher" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="--device cpu with --backend vllm"):
        cache_stage.CacheTeacherConfig(teacher="t", data=("d",), out=out, backend="vllm",
                                       device="cpu").validate()
