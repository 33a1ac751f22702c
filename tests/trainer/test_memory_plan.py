"""`train-student --dry-run`: exact parameter counts from a meta model, bytes per parameter per
precision and optimizer, FSDP's division, LoRA's trainable count as peft reports it, the
activation formula against what autograd keeps, no weights read, nothing written, one-line
errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.manifest import read_manifest
from kdpipe.trainer import adapters
from kdpipe.trainer.config import TrainConfig
from kdpipe.trainer.memory_plan import (
    FLOAT32,
    Block,
    MemoryPlan,
    meta_student,
    optimizer_state_bytes,
    plan_memory,
    planned_world_size,
    shard,
)

from ..conftest import run_cli

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def _cfg(cache: Path, out: Path, **options: Any) -> TrainConfig:
    return TrainConfig.from_options(cache=str(cache), out=str(out), device="cpu",
                                    progress=False, **options).with_cache_defaults()


def _plan(cfg: TrainConfig, world: int = 1, precision: str = "fp32") -> MemoryPlan:
    manifest = read_manifest(cfg.cache[0])
    return plan_memory(cfg, manifest, meta_student(cfg, manifest), world, precision, "cpu")


def _part(plan: MemoryPlan, name: str) -> int:
    parts = {p.name: p.bytes for p in (*plan.held, plan.gradients, *plan.other)}
    return parts.get(name, 0)


@pytest.fixture()
def weightless_student(tmp_path: Path, tiny_student_dir: Path) -> Path:
    """The tiny student's folder without any weight file: config and tokenizer only."""
    out = tmp_path / "config-only"
    shutil.copytree(tiny_student_dir, out)
    for pattern in WEIGHT_FILES:
        for path in out.glob(pattern):
            path.unlink()
    return out


def test_parameter_counts_are_exact(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                                    student_config_file: Path) -> None:
    real = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    plan = _plan(_cfg(tiny_cache, tmp_path / "a", student=str(tiny_student_dir)))
    assert plan.total_params == plan.trainable_params == sum(p.numel() for p in
                                                              real.parameters())
    cfg = _cfg(tiny_cache, tmp_path / "b", student_config=str(student_config_file))
    manifest = read_manifest(tiny_cache)
    meta = meta_student(cfg, manifest)
    assert all(p.device.type == "meta" for p in meta.parameters())
    from kdpipe.trainer.model import student_model_config

    built = AutoModelForCausalLM.from_config(student_model_config(
        str(student_config_file), manifest, {}))
    assert _plan(cfg).total_params == sum(p.numel() for p in built.parameters())


def test_gpt2_counts_and_its_lora_targets(tmp_path: Path, tiny_cache: Path,
                                         tiny_gpt2_dir: Path) -> None:
    """Another architecture: tied head, Conv1D layers, a non-gated MLP."""
    real = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    plan = _plan(_cfg(tiny_cache, tmp_path / "a", student=str(tiny_gpt2_dir)))
    assert plan.total_params == sum(p.numel() for p in real.parameters())
    assert not Block.of(real.config).gated
    pytest.importorskip("peft")
    cfg = _cfg(tiny_cache, tmp_path / "b", student=str(tiny_gpt2_dir), lora_r=4)
    adapted = adapters.new_adapters(real, cfg.adapter, adapters.lora_config(cfg.adapter, real))
    trainable, _ = adapted.get_nb_trainable_parameters()  # type: ignore[operator]
    assert _plan(cfg).trainable_params == trainable


@pytest.mark.parametrize(("precision", "optimizer", "momentum", "per_param"), [
    ("fp32", "adamw", 0.0, 4 + 4 + 8), ("bf16-mixed", "adamw", 0.0, 4 + 4 + 8),
    ("bf16-master", "adamw", 0.0, 2 + 2 + 4 + 8), ("fp32", "sgd", 0.0, 4 + 4),
    ("fp32", "sgd", 0.9, 4 + 4 + 4), ("bf16-master", "sgd", 0.9, 2 + 2 + 4 + 4)])
def test_bytes_per_parameter(tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path,
                             precision: str, optimizer: str, momentum: float,
                             per_param: int) -> None:
    """weights + gradients + masters + optimizer state, as docs/training.md's table; AdamW
    adds a 4-byte step count per tensor."""
    cfg = _cfg(tiny_cache, tmp_path / "run", student=str(tiny_student_dir), optimizer=optimizer,
               momentum=momentum)
    plan = _plan(cfg, precision=precision)
    n, tensors = plan.total_params, len(list(meta_student(cfg, read_manifest(tiny_cache))
                                            .parameters()))
    steps = 4 * tensors if optimizer == "adamw" else 0
    counted = (_part(plan, "weights") + _part(plan, "gradients") + _part(plan, "float32 masters")
               + _part(plan, "optimizer state"))
    assert counted == per_param * n + steps


def test_optimizer_state_formulas() -> None:
    assert optimizer_state_bytes((100, 50), "adamw", 0.0, 5000) == 8 * 5000 + 4
    # 8-bit: two uint8 moments, a float32 scale per 256 values each, two 1 KiB code books
    assert optimizer_state_bytes((100, 50), "adamw-8bit", 0.0, 5000) == (
        2 * 5000 + 2 * 4 * math.ceil(5000 / 256) + 2048)
    assert optimizer_state_bytes((64, 16), "adamw-8bit", 0.0, 1024) == 8 * 1024  # < 4096
    assert optimizer_state_bytes((100, 50), "adafactor", 0.0, 5000) == 4 * (100 + 50) + 4
    assert optimizer_state_bytes((50,), "adafactor", 0.0, 50) == 4 * 50 + 4
    assert optimizer_state_bytes((100, 50), "sgd", 0.0, 5000) == 0
    assert optimizer_state_bytes((100, 50), "sgd", 0.9, 5000) == 4 * 5000


def test_fsdp_divides_by_the_world_size(tmp_path: Path, tiny_cache: Path,
                                        tiny_student_dir: Path) -> None:
    assert shard((10, 3), 4) == 3 * 3  # ⌈10 / 4⌉ rows, as FSDP2 pads them
    assert shard((8, 3), 4) == 2 * 3 and shard((7,), 1) == 7
    one = _plan(_cfg(tiny_cache, tmp_path / "a", student=str(tiny_student_dir), fsdp=True))
    four = _plan(_cfg(tiny_cache, tmp_path / "b", student=str(tiny_student_dir), fsdp=True),
                 world=4)
    for name in ("weights", "gradients"):
        assert _part(four, name) == pytest.approx(_part(one, name) / 4, rel=0.02)
    state = _part(four, "optimizer state")
    assert state == pytest.approx(_part(one, "optimizer state") / 4, rel=0.05)
    assert _part(four, "FSDP gathered parameters") > 0
    assert four.total_params == one.total_params  # the counts are the model's, not a shard's
    ddp = _plan(_cfg(tiny_cache, tmp_path / "c", student=str(tiny_student_dir)), world=4)
    assert _part(ddp, "weights") == _part(one, "weights")  # DDP replicates
    assert _part(ddp, "DDP gradient buckets") == _part(ddp, "gradients")


@pytest.mark.parametrize("options", [{"lora_r": 4}, {"lora_r": 8, "use_dora": True},
                                     {"lora_r": 2, "lora_target_modules": ("q_proj", "lm_head")}])
def test_lora_trainable_count_is_peft_s(tmp_path: Path, tiny_cache: Path,
                                        tiny_student_dir: Path, options: dict[str, Any]) -> None:
    pytest.importorskip("peft")
    cfg = _cfg(tiny_cache, tmp_path / "run", student=str(tiny_student_dir), **options)
    real = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    adapted = adapters.new_adapters(real, cfg.adapter, adapters.lora_config(cfg.adapter, real))
    trainable, total = adapted.get_nb_trainable_parameters()  # type: ignore[operator]
    plan = _plan(cfg)
    assert (plan.trainable_params, plan.total_params) == (trainable, total)


def _saved_bytes(layers: int, tokens: int) -> int:
    """Bytes autograd keeps for backward over a Llama body's forward (parameters aside)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(input_ids=torch.randint(0, 64, (1, tokens)),
                    attention_mask=torch.ones(1, tokens, dtype=torch.long))
    return sum(n for key, n in seen.items() if key not in params)


def test_activation_formula_counts_what_autograd_keeps() -> None:
    """One more layer keeps exactly Block.kept_per_token bytes per token (fp32, SDPA)."""
    tokens = 48
    config = LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    per_layer = _saved_bytes(2, tokens) - _saved_bytes(1, tokens)
    assert per_layer == Block.of(config).kept_per_token(FLOAT32, tokens, False, False) * tokens


def test_dry_run_reads_no_weights_and_writes_nothing(
        tmp_path: Path, tiny_cache: Path, tiny_student_dir: Path, weightless_student: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cache_files = sorted(p.relative_to(tiny_cache) for p in tiny_cache.rglob("*"))
    out = tmp_path / "run"
    code, text, err = run_cli(["train-student", "--cache", str(tiny_cache), "--out", str(out),
                               "--student", str(weightless_student), "--device", "cpu",
                               "--dry-run", "--batch-size", "2", "--max-steps", "5"], capsys)
    assert code == 0, err
    real = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    count = sum(p.numel() for p in real.parameters())
    assert f"parameters  {count:,}, trainable {count:,}" in text
    assert "peak estimate" in text and "steps       5 (--max-steps)" in text
    manifest = read_manifest(tiny_cache)
    assert f"{2 * manifest.max_length:,} tokens" in text
    assert not out.exists()
    assert sorted(p.relative_to(tiny_cache) for p in tiny_cache.rglob("*")) == cache_files


def test_dry_run_lora_on_a_weightless_student(tmp_path: Path, tiny_cache: Path,
                                              weightless_student: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    code, text, err = run_cli(["train-student", "--cache", str(tiny_cache), "--out",
                               str(tmp_path / "run"), "--student", str(weightless_student),
                               "--device", "cpu", "--dry-run", "--lora-r", "4",
                               "--gradient-checkpointing"], capsys)
    assert code == 0, err
    assert "LoRA r 4" in text and "gradient checkpointing on" in text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("options", "expected"), [
    (["--lora-r", "4", "--lora-target-modules", "q_proj,qproj"],
     "has no module named qproj (did you mean 'q_proj'?); its linear layers are"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_input_is_one_line(tmp_path: Path, tiny_cache: Path, weightless_student: Path,
                               capsys: pytest.CaptureFixture[str], options: list[str],
                               expected: str) -> None:
    if "--lora-r" in options:
        pytest.importorskip("peft")
    code, _, err = run_cli(["train-student", "--cache", str(tiny_cache), "--out",
                            str(tmp_path / "run"), "--student", str(weightless_student),
                            "--device", "cpu", "--dry-run", *options], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "run").exists()


def test_bad_student_config_is_one_line(tmp_path: Path, tiny_cache: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "student.json"
    spec.write_text('{"hidden_size": 32}')
    code, _, err = run_cli(["train-student", "--cache", str(tiny_cache), "--out",
                            str(tmp_path / "run"), "--student-config", str(spec),
                            "--device", "cpu", "--dry-run"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "needs a JSON object with 'model_type'" in lines[0]


def test_world_size_comes_from_torchrun_s_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert planned_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert planned_world_size() == 8
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(ConfigError, match="WORLD_SIZE='eight' is not an integer"):
        planned_world_size()


def test_train_refuses_a_dry_run(tmp_path: Path, tiny_cache: Path,
                                 tiny_student_dir: Path) -> None:
    from kdpipe.trainer.train import train

    with pytest.raises(ConfigError, match="--dry-run plans the run without training it"):
        train(_cfg(tiny_cache, tmp_path / "run", student=str(tiny_student_dir), dry_run=True))
    assert not (tmp_path / "run").exists()


def test_head_part_follows_the_path_the_run_takes(tmp_path: Path, tiny_cache: Path,
                                                  tiny_student_dir: Path) -> None:
    """Fused (forward KL, CE): one (chunk, V) float32 buffer (two at τ ≠ 1) and the head's
    gradient held through backward; checkpointed (other divergences): six buffers."""
    manifest = read_manifest(tiny_cache)
    head_rows, hidden = 320, 32  # the tiny student's head, untied
    chunk = min(64, manifest.max_length)

    def head(**options: Any) -> tuple[int, str]:
        cfg = _cfg(tiny_cache, tmp_path / "run", student=str(tiny_student_dir), chunk_size=64,
                   **options)
        part = _plan(cfg).head_chunks
        return part.bytes, part.how

    held = FLOAT32 * head_rows * hidden
    assert head() == (FLOAT32 * chunk * manifest.vocab_size + held, head()[1])
    assert "fused" in head()[1] and "fused" in head(mode="ce")[1]
    assert head(temperature=2.0)[0] == 2 * FLOAT32 * chunk * manifest.vocab_size + held
    jsd_bytes, jsd_how = head(loss="jsd")
    assert jsd_bytes == 6 * FLOAT32 * chunk * head_rows and "checkpointed" in jsd_how


def test_dry_run_refuses_an_out_a_real_run_refuses(tmp_path: Path, tiny_cache: Path,
                                                   tiny_student_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from kdpipe.trainer.train import train

    run = tmp_path / "run"
    train(_cfg(tiny_cache, run, student=str(tiny_student_dir), max_steps=1))
    before = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()  # the training run's own output
    code, _, err = run_cli(["train-student", "--cache", str(tiny_cache), "--out", str(run),
                            "--student", str(tiny_student_dir), "--device", "cpu",
                            "--max-steps", "1", "--lr", "1", "--dry-run"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "different" in lines[0], err
    assert sorted(p.name for p in run.rglob("*")) == before
