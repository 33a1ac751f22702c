"""LoRA and DoRA students: trainable parameters, the chunked KD head frozen or adapted, exact
resume, final/ and final/merged/ loaded by peft and transformers, evaluate on an adapter
folder, and a one-line refusal for every bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
from kdpipe.schemas.cache import open_cache
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.schemas.shard_reader import build_index, columns_for
from kdpipe.trainer import adapters
from kdpipe.trainer.adapter_config import AdapterConfig
from kdpipe.trainer.config import EvalConfig, TrainConfig
from kdpipe.trainer.data import BatchLoader
from kdpipe.trainer.evaluate import evaluate
from kdpipe.trainer.loss_config import LossConfig
from kdpipe.trainer.model import open_student
from kdpipe.trainer.objective import StudentObjective, call
from kdpipe.trainer.train import train

from ..conftest import run_cli
from ..families import VOCAB, Family
from .conftest import small_config
from .test_chunked_loss import unchunked

peft = pytest.importorskip("peft")

CPU = torch.device("cpu")
H, FF, LAYERS = 32, 64, 2  # the tiny Llama student of conftest.py
ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def qwen2(model_family: Any) -> Family:
    """Qwen2 student: tied embeddings, a head padded past its 400 ids (432 rows)."""
    family: Family = model_family("qwen2")
    return family


@pytest.fixture(scope="module")
def qwen2_cache(tmp_path_factory: pytest.TempPathFactory, qwen2: Family, trainer_corpus: Path
                ) -> Path:
    out = tmp_path_factory.mktemp("qwen2-cache")
    cache_teacher(CacheTeacherConfig(
        teacher=str(qwen2.teacher), tokenizer=str(qwen2.tokenizer), data=(str(trainer_corpus),),
        out=out, device="cpu", top_k=8, max_length=40, shard_size=16, batch_size=16,
        progress=False))
    return out


def _randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA starts with B = 0 (the adapted model is the base): give every adapter weight a
    random value so that the adapters change the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _trainable(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


# --- parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize(("adapter", "expected"), [
    # per layer: 4 attention (32 -> 32) + gate, up (32 -> 64) + down (64 -> 32), r (in + out)
    (AdapterConfig(lora_r=4), LAYERS * 4 * (4 * 64 + 2 * 96 + 96)),
    (AdapterConfig(lora_r=2, lora_target_modules=("q_proj", "v_proj")), LAYERS * 2 * 2 * 64),
    # all-linear is every linear layer but the head; lm_head adds r (H + V) for V = 320 rows
    (AdapterConfig(lora_r=2, lora_target_modules=("all-linear", "lm_head")),
     LAYERS * 2 * (4 * 64 + 2 * 96 + 96) + 2 * (32 + 320)),
    # DoRA adds one magnitude per output row of each adapted layer
    (AdapterConfig(lora_r=4, use_dora=True), LAYERS * (4 * (4 * 64 + 2 * 96 + 96)
                                                       + 4 * 32 + 2 * 64 + 32)),
], ids=["default", "q-v", "all-linear-and-head", "dora"])
def test_only_the_adapters_train(tiny_cache: Path, tiny_student_dir: Path,
                                 adapter: AdapterConfig, expected: int) -> None:
    student = open_student(open_cache(tiny_cache), CPU, student=str(tiny_student_dir),
                           adapter=adapter)
    trainable = _trainable(student.model)
    assert sum(trainable.values()) == expected
    assert all("lora_" in name for name in trainable)
    head_adapted = "lm_head" in adapter.lora_target_modules
    assert isinstance(student.parts.head, peft.tuners.lora.Linear) == head_adapted
    assert student.adapter_base is not None
    assert student.adapter_base["base_model"] == str(tiny_student_dir.resolve())
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    assert student.adapter_base["base_fingerprint"] == adapters.base_fingerprint(base)


def test_default_targets_cover_every_projection(tiny_cache: Path, tiny_student_dir: Path
                                                ) -> None:
    student = open_student(open_cache(tiny_cache), CPU, student=str(tiny_student_dir),
                           adapter=AdapterConfig(lora_r=4))
    config = student.model.peft_config["default"]  # type: ignore[union-attr, index]
    assert sorted(config.target_modules) == sorted(ATTENTION_MLP)
    assert config.lora_alpha == 8  # 2 r
    assert set(adapters.DEFAULT_TARGETS["llama"]) == set(ATTENTION_MLP)


def test_gpt2_conv1d_layers_are_adapted(tiny_cache: Path, tiny_gpt2_dir: Path) -> None:
    """GPT-2's linear layers are transformers' Conv1D (weights stored transposed): the
    default targets reach them and the adapted model passes the body/head split check."""
    student = open_student(open_cache(tiny_cache), CPU, student=str(tiny_gpt2_dir),
                           adapter=AdapterConfig(lora_r=2))
    config = student.model.peft_config["default"]  # type: ignore[union-attr, index]
    assert sorted(config.target_modules) == ["c_attn", "c_fc", "c_proj"]
    assert config.fan_in_fan_out
    # per layer: c_attn 32 -> 96, attn c_proj 32 -> 32, c_fc 32 -> 128, mlp c_proj 128 -> 32
    assert sum(_trainable(student.model).values()) == 2 * 2 * (128 + 64 + 160 + 160)


# --- the chunked KD head: frozen or adapted ------------------------------------------------

@pytest.mark.parametrize("targets", [(), ("all-linear", "lm_head")], ids=["head-frozen",
                                                                           "head-adapted"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_chunked_kd_equals_the_adapted_model(tiny_cache: Path, tiny_student_dir: Path,
                                             targets: tuple[str, ...], dora: bool) -> None:
    """The trainer's loss (body through the PeftModel, head in chunks) and its gradients
    equal those of the adapted model's own full logits; a frozen head gets no gradient."""
    cache = open_cache(tiny_cache)
    student = open_student(cache, CPU, student=str(tiny_student_dir), adapter=AdapterConfig(
        lora_r=4, lora_target_modules=targets, use_dora=dora))
    _randomise_adapters(student.model)
    index = build_index(cache)
    cfg = LossConfig(temperature=2.0, chunk_size=16)
    columns = columns_for(cache, teacher=True, temperature=2.0)
    with BatchLoader(index, index.sample_ids[:3], columns, 3, 1, 1) as loader:
        (batch,) = [b.micro[0] for b in loader]
    lam = torch.full((batch.num_targets,), 0.7)
    params = [p for p in student.model.parameters() if p.requires_grad]

    out = call(StudentObjective(student.parts, cache.manifest.vocab_size), batch, lam, cfg)
    grads = torch.autograd.grad(out.total, params)

    logits = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask
                           ).logits[batch.target_mask]  # (N, V)
    total, ce, kd, _ = unchunked(logits, torch.nn.Identity(), batch.labels, lam, cfg,
                                 batch.teacher, vocab=cache.manifest.vocab_size)
    expected = torch.autograd.grad(total, params)
    assert float(out.total.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    assert float(out.kd) == pytest.approx(float(kd.detach()), rel=1e-5)
    assert float(out.ce) == pytest.approx(float(ce.detach()), rel=1e-5)
    for found, want in zip(grads, expected, strict=True):  # float32: to 1e-4 of their scale
        torch.testing.assert_close(found, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    head = student.parts.head
    head_weight = getattr(head, "base_layer", head).weight
    assert not head_weight.requires_grad  # the head's own weights never train


def test_padded_tied_head_with_an_adapter(qwen2: Family, qwen2_cache: Path) -> None:
    """Qwen2: the softmax leaves the head's padding rows out whether or not the head has an
    adapter, and they are suppressed in generate()."""
    cache = open_cache(qwen2_cache)
    student = open_student(cache, CPU, student=str(qwen2.student),
                           adapter=AdapterConfig(lora_r=2, lora_target_modules=("lm_head",
                                                                                  "q_proj")))
    assert student.parts.head.weight.shape[0] == 432  # type: ignore[union-attr]
    assert list(student.model.generation_config.suppress_tokens) == list(range(VOCAB, 432))
    _randomise_adapters(student.model)
    index = build_index(cache)
    cfg = LossConfig(chunk_size=8)
    columns = columns_for(cache, teacher=True, temperature=1.0)
    with BatchLoader(index, index.sample_ids[:2], columns, 2, 1, 0) as loader:
        (batch,) = [b.micro[0] for b in loader]
    lam = torch.full((batch.num_targets,), 0.5)
    out = call(StudentObjective(student.parts, VOCAB), batch, lam, cfg)
    logits = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask
                           ).logits[batch.target_mask]
    total, *_ = unchunked(logits, torch.nn.Identity(), batch.labels, lam, cfg, batch.teacher,
                          vocab=VOCAB)
    assert float(out.total.detach()) == pytest.approx(float(total.detach()), rel=1e-5)


# --- training, resume, final/ -------------------------------------------------------------

def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_resume_is_exact(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path) -> None:
    """Adapter dropout draws random numbers: the RNG state comes back too."""
    full = tmp_path / "full"
    cfg = small_config(tiny_cache, full, student=str(tiny_student_dir), max_steps=6,
                       save_every=3, eval_fraction=0.25, lora_r=4, lora_dropout=0.1,
                       use_dora=True)
    uninterrupted = train(cfg)
    layout = RunLayout(full)
    checkpoint = layout.checkpoint(3)
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is not copied
    assert (checkpoint / "adapter_model.safetensors").is_file()
    record = json.loads((checkpoint / adapters.BASE_RECORD_NAME).read_text())
    assert record["base_model"] == str(tiny_student_dir.resolve())

    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(RunLayout(crashed).checkpoint(6))
    shutil.rmtree(RunLayout(crashed).final)
    RunLayout(crashed).final_metrics.unlink()
    resumed = train(replace(cfg, out=str(crashed), resume=True))
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert resumed["eval_ce"] == uninterrupted["eval_ce"]
    assert _strip(_jsonl(crashed / "metrics.jsonl")) == _strip(_jsonl(full / "metrics.jsonl"))
    a = load_file(layout.final / "adapter_model.safetensors")
    b = load_file(RunLayout(crashed).final / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Resuming without the adapter options (or with others) names what differs.
    plain = replace(cfg, out=str(crashed), resume=True, max_steps=8,
                    adapter=AdapterConfig())
    with pytest.raises(ConfigError, match=r"different lora_r \(run: 4, now: 0\), lora_dropout "
                                          r"\(run: 0.1, now: 0.0\), use_dora"):
        train(plain)


def test_peft_config_file_resumes_and_must_not_change(tmp_path: Path, tiny_cache: Path,
                                                      tiny_student_dir: Path) -> None:
    """--peft-config FILE trains as the flags that say the same; a file edited before
    --resume is refused rather than resumed with other settings."""
    spec = tmp_path / "lora.json"
    spec.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                "target_modules": ["q_proj", "v_proj"]}))
    by_file = train(small_config(tiny_cache, tmp_path / "file", student=str(tiny_student_dir),
                                 max_steps=2, peft_config=str(spec)))
    by_flags = train(small_config(tiny_cache, tmp_path / "flags", student=str(tiny_student_dir),
                                  max_steps=2, lora_r=4, lora_target_modules=("q_proj",
                                                                              "v_proj")))
    assert by_file["train_loss"] == by_flags["train_loss"]
    spec.write_text(json.dumps({"r": 4, "lora_alpha": 16, "target_modules": ["q_proj",
                                                                             "v_proj"]}))
    with pytest.raises(ConfigError, match=r"other settings: lora_alpha \(run: 8, now: 16\)"):
        train(small_config(tiny_cache, tmp_path / "file", student=str(tiny_student_dir),
                           max_steps=3, peft_config=str(spec), resume=True))


def test_final_and_merged_load_with_peft_and_transformers(tmp_path: Path, qwen2: Family,
                                                          qwen2_cache: Path) -> None:
    """final/ is a peft adapter folder, final/merged/ a plain model; both give the adapted
    model's logits. Qwen2's head is tied to its embeddings and adapted here: the merged model
    gets its own head, and keeps the base's embeddings."""
    run = tmp_path / "run"
    train(small_config(qwen2_cache, run, student=str(qwen2.student), max_steps=3, lr=3e-2,
                       lora_r=2, lora_target_modules=("all-linear", "lm_head"),
                       merge_adapter=True))
    final = RunLayout(run).final
    assert (final / "adapter_config.json").is_file() and (final / "trainer_state.json").is_file()
    assert not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert all("lora_" in key for key in saved)  # no copy of the frozen head or embeddings

    base = AutoModelForCausalLM.from_pretrained(qwen2.student)
    adapted = peft.PeftModel.from_pretrained(base, final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / adapters.MERGED_DIR).eval()
    plain = AutoModelForCausalLM.from_pretrained(qwen2.student).eval()
    ids = torch.arange(2, 30)[None, :]
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert not torch.allclose(want, plain(input_ids=ids).logits, atol=1e-3)  # it trained
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged.get_input_embeddings().weight,
                               plain.get_input_embeddings().weight)
    assert merged.generation_config.suppress_tokens == list(range(VOCAB, 432))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(final / adapters.MERGED_DIR)
    assert len(tokenizer) == VOCAB


def test_evaluate_an_adapter_folder(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                    tiny_gpt2_dir: Path) -> None:
    run = tmp_path / "run"
    train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=3, lr=3e-2,
                       lora_r=4, merge_adapter=True))
    final = RunLayout(run).final
    options = dict(cache=str(tiny_cache), device="cpu", max_samples=12, chunk_size=64)
    adapted = evaluate(EvalConfig.from_options(student=str(final), **options))
    merged = evaluate(EvalConfig.from_options(student=str(final / "merged"), **options))
    base = evaluate(EvalConfig.from_options(student=str(tiny_student_dir), **options))
    for key in ("ce", "kd", "loss"):
        assert adapted[key] == pytest.approx(merged[key], rel=1e-5), key
    assert adapted["kd"] != pytest.approx(base["kd"], rel=1e-4)

    # The base moved: the folder's name for it fails, --base gives the new place.
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_student_dir, moved)
    copied = tmp_path / "adapters"
    shutil.copytree(final, copied)
    record = json.loads((copied / adapters.BASE_RECORD_NAME).read_text())
    record["base_model"] = str(tmp_path / "gone")
    (copied / adapters.BASE_RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"--student .*adapters: its base .*gone: cannot load "
                                          r"a causal LM \(.*\); pass --base where the base is"):
        evaluate(EvalConfig.from_options(student=str(copied), **options))
    moved_base = evaluate(EvalConfig.from_options(student=str(copied), base=str(moved),
                                                  **options))
    assert moved_base["kd"] == pytest.approx(adapted["kd"], rel=1e-6)
    # Another model as the base: refused by the fingerprint of the base's weights.
    other = tmp_path / "other-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(other)
    with pytest.raises(ConfigError, match="adapters were trained on .* other weights"):
        evaluate(EvalConfig.from_options(student=str(final), base=str(other), **options))
    with pytest.raises(ConfigError, match="--base .* holds no adapter_config.json"):
        evaluate(EvalConfig.from_options(student=str(tiny_gpt2_dir), base=str(other),
                                         **options))


# --- bad inputs: one line each ------------------------------------------------------------

def _problems(tiny_cache: Path, tmp_path: Path, **options: Any) -> str:
    cfg = small_config(tiny_cache, tmp_path / "run", **options)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    return str(info.value)


def test_bad_adapter_options_are_refused(tmp_path: Path, tiny_cache: Path,
                                         tiny_student_dir: Path, student_config_file: Path
                                         ) -> None:
    student = str(tiny_student_dir)
    message = _problems(tiny_cache, tmp_path, student=student, lora_r=4,
                        lora_target_modules=("q_proj", "qproj", "mlp_up"))
    assert "has no module named qproj (did you mean 'q_proj'?); mlp_up" in message
    assert ("its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
            "up_proj, v_proj (or give all-linear)") in message
    assert ("LoRA adapts linear layers (and embeddings), but mlp is a LlamaMLP; its linear "
            "layers are") in _problems(tiny_cache, tmp_path, student=student, lora_r=4,
                                       lora_target_modules=("q_proj", "mlp"))
    assert "--student-config starts from random weights" in _problems(
        tiny_cache, tmp_path, student_config=str(student_config_file), lora_r=4)
    assert "--merge-adapter merges LoRA adapters into the student: it needs --lora-r" in \
        _problems(tiny_cache, tmp_path, student=student, merge_adapter=True)
    assert "--lora-alpha, --use-dora shape(s) LoRA adapters: add --lora-r N" in _problems(
        tiny_cache, tmp_path, student=student, lora_alpha=8, use_dora=True)
    spec = tmp_path / "lora.json"
    spec.write_text(json.dumps({"r": 4}))
    assert "give --peft-config or the --lora-* flags, not both (--lora-r" in _problems(
        tiny_cache, tmp_path, student=student, lora_r=4, peft_config=str(spec))
    spec.write_text(json.dumps({"peft_type": "IA3"}))
    assert "peft_type 'IA3'; kdpipe trains LoRA and DoRA adapters only" in _problems(
        tiny_cache, tmp_path, student=student, peft_config=str(spec))
    spec.write_text(json.dumps({"r": 4, "lora_alpah": 8}))
    assert "unknown LoraConfig field(s) lora_alpah (did you mean 'lora_alpha'?)" in _problems(
        tiny_cache, tmp_path, student=student, peft_config=str(spec))
    spec.write_text("{r: 4")
    assert f"--peft-config {spec}: not a JSON file" in _problems(
        tiny_cache, tmp_path, student=student, peft_config=str(spec))
    assert f"--peft-config {tmp_path / 'none.json'}: no such file" in _problems(
        tiny_cache, tmp_path, student=student, peft_config=str(tmp_path / "none.json"))


def test_an_adapter_folder_is_no_student_for_new_adapters(tmp_path: Path, tiny_cache: Path,
                                                          tiny_student_dir: Path) -> None:
    run = tmp_path / "first"
    train(small_config(tiny_cache, run, student=str(tiny_student_dir), max_steps=1, lora_r=2))
    final = RunLayout(run).final
    assert "is a folder of adapters; --lora-r puts new adapters on a plain model" in _problems(
        tiny_cache, tmp_path, student=str(final), lora_r=2)
    # Without adapters, training starts from the adapted model (merged) and trains it all.
    full = train(small_config(tiny_cache, tmp_path / "full", student=str(final), max_steps=1))
    assert full["step"] == 1


def test_missing_peft_is_one_line(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if not installed
    code, _, err = run_cli(["train-student", "--cache", str(tiny_cache), "--out",
                            str(tmp_path / "run"), "--student", str(tiny_student_dir),
                            "--device", "cpu", "--lora-r", "4"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert "kdpipe needs peft for LoRA/DoRA adapters, and it is not installed: pip install " \
        "'kdpipe[peft]'" in lines[0]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"pip install 'kdpipe\[peft\]'"):
        adapters.require_peft()


def test_fingerprint_tells_bases_apart(tiny_student_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    first = adapters.base_fingerprint(model)
    assert adapters.base_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_student_dir)
                                     ) == first
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)
    assert adapters.base_fingerprint(model) != first
    assert len(first) == 64


# --- torchrun: DDP and FSDP ---------------------------------------------------------------

@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_adapters_like_one(tmp_path: Path, tiny_cache: Path,
                                               tiny_student_dir: Path, fsdp: bool) -> None:
    """Under torchrun the adapters train as on one process with the same global batch: every
    rank initialises the same adapters (FSDP keeps each rank's shard of its own draw), FSDP
    shards blocks that mix frozen base weights and trainable adapters, gathers only the
    adapters into checkpoints and final/, and --resume continues exactly."""
    from .test_distributed import EVAL_FRACTION, _flags, _metrics, _records, torchrun

    lora: dict[str, Any] = dict(lora_r=4, use_dora=True, lora_target_modules="all-linear,lm_head")
    one = tmp_path / "one"
    train(small_config(tiny_cache, one, student=str(tiny_student_dir), batch_size=4,
                       max_steps=4, eval_fraction=EVAL_FRACTION, save_every=2,
                       **{**lora, "lora_target_modules": ("all-linear", "lm_head")}))
    many = tmp_path / "many"
    options: dict[str, Any] = dict(batch_size=1, grad_accum=2, max_steps=4, save_every=2,
                                   fsdp=fsdp, **lora)
    torchrun(_flags(tiny_cache, many, tiny_student_dir, **options))

    def same(a: Path, b: Path) -> None:
        assert _records(a, "order.jsonl") == _records(b, "order.jsonl")
        for x, y in zip(_metrics(a), _metrics(b), strict=True):
            for key in ("loss", "ce", "kd", "grad_norm"):
                if key in x:
                    assert x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], key)
        wa = load_file(RunLayout(a).final / "adapter_model.safetensors")
        wb = load_file(RunLayout(b).final / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and all("lora_" in k for k in wa)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5

    same(one, many)
    if not fsdp:  # DDP resumes as one process does; FSDP gathers and scatters the state
        return
    crashed = tmp_path / "crashed"
    shutil.copytree(many, crashed)
    layout = RunLayout(crashed)
    shutil.rmtree(layout.checkpoint(4))
    shutil.rmtree(layout.final)
    layout.final_metrics.unlink()
    torchrun(_flags(tiny_cache, crashed, tiny_student_dir, **options, resume=True))
    same(many, crashed)


def test_bf16_master_with_adapters_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig.from_options(cache=str(tmp_path), out=str(tmp_path / "run"),
                                   student=str(tmp_path), lora_r=4, precision="bf16-master")
    assert any("--precision bf16-master with LoRA/DoRA" in p for p in cfg.problems())
