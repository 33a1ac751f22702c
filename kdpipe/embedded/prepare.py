"""The demo's teacher side: corpus → tokenizer → teacher → caches, each stage skipped when done.

1. corpus: the stdlib's source split by file into train and held-out JSON lines (`corpus.py`),
   or, for a chat preset, conversations answered by its docstrings, split by module
   (`chat.py`);
2. tokenizer: a byte-level BPE trained on the train split (`tokenizer.py`; ChatML tokens and
   chat template for a chat preset);
3. token cache: `train-student` reads only caches, so a throw-away 1-layer model "caches" the
   train split at k = 1 — only its token ids are used (`--mode ce` reads no teacher column);
4. teacher: a small Llama trained by `train(TrainConfig.from_options(mode="ce"))`, the student
   trainer itself;
5. caches: `cache_teacher` with the trained teacher over train and held-out, at the preset's k;
6. with `second_teacher`, a teacher B (`second_teacher.py`): its own token cache when it
   learns from half the train split, its training, and its caches over the same train and
   held-out sequences as A's, under OUT/teacher-b/.

Chat presets cache conversations (`--format messages`, packed: conversations are short)
with assistant-only targets (`--train-on assistant`), so the students and the held-out
numbers see only the assistant's replies. The teacher's token cache uses
`CHAT_TEACHER_TRAIN_ON` (see there).

Every stage is the same Python function the CLI calls, and every one is idempotent, so an
interrupted demo resumes where it stopped. `kdpipe experiment` uses this for `setup: embedded`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

from kdpipe.embedded.chat import write_chat_corpus
from kdpipe.embedded.corpus import write_corpus
from kdpipe.embedded.models import ModelSize, init_model, write_spec
from kdpipe.embedded.presets import Preset
from kdpipe.embedded.second_teacher import (
    SecondTeacher,
    check_second_teacher,
    leading_documents,
    second_teacher_spec,
)
from kdpipe.embedded.timing import TIMINGS_NAME, StageClock
from kdpipe.embedded.tokenizer import train_tokenizer
from kdpipe.schemas.errors import ConfigError
from kdpipe.schemas.io import atomic_write_json
from kdpipe.schemas.manifest import MANIFEST_NAME
from kdpipe.schemas.run_layout import RunLayout

log = logging.getLogger(__name__)

READER = ModelSize(hidden=16, layers=1, heads=1)  # the token cache's throw-away model
TEACHER_RUN = "teacher-run"
TEACHER_B = "teacher-b"  # everything of the second teacher
PRESET_NAME = "preset.json"  # the preset a folder was prepared with
# The chat teacher learns every token of the rendered conversations, user turns too: they are
# all the text a teacher trained from scratch ever sees (a real one was pretrained on far more
# before it learned to chat), and they name the objects the replies describe. Measured on
# `--preset chat` (docs/results.md): held-out assistant-token NLL 4.947 against 4.975 for a
# teacher trained on the replies only, at the same steps (256-token sequences) and 17% more CPU;
# a small difference, one seed. The students learn the replies only.
CHAT_TEACHER_TRAIN_ON = "all"


@dataclass(frozen=True)
class Prepared:
    """Paths of everything the teacher side made (inputs of every student run)."""

    root: Path
    train_corpus: Path
    heldout_corpus: Path
    tokenizer: Path
    teacher: Path  # the trained teacher (a transformers model folder)
    cache: Path  # train split, top-k
    heldout_cache: Path  # held-out split, top-k
    student_config: Path  # the preset's student shape (--student-config)
    # The second teacher and its caches, aligned with `cache` and `heldout_cache` sample for
    # sample; None without `second_teacher`.
    teacher_b: Path | None = None
    cache_b: Path | None = None
    heldout_b: Path | None = None


def cache_complete(path: Path) -> bool:
    """Whether a cache folder holds a finished manifest (cheap: no shard is opened)."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return False
    return bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))


def _defaults() -> dict[str, object]:
    return {f.name: f.default for f in fields(Preset) if f.default is not MISSING}


def check_preset(root: Path, preset: Preset, second: SecondTeacher | None = None) -> None:
    """One preset per folder: stages skip work whose output exists, so mixing two would mix
    a tokenizer or teacher of one preset with the corpus of another. Likewise one second
    teacher (`check_second_teacher`), when `second` is given. ConfigError otherwise."""
    _check_preset(root, preset)
    if second is not None:
        check_second_teacher(root, second)


def _check_preset(root: Path, preset: Preset) -> None:
    recorded = root / PRESET_NAME
    if recorded.is_file():
        # A field added since the folder was prepared held its default value then.
        previous = {**_defaults(), **json.loads(recorded.read_text(encoding="utf-8"))}
        if previous != asdict(preset):
            raise ConfigError(f"{root} was prepared with --preset {previous.get('name')} (other "
                              "settings); choose another folder or delete it")
        return
    if root.is_dir() and any(p.name != TIMINGS_NAME for p in root.iterdir()):
        raise ConfigError(f"{root} holds files but no {PRESET_NAME} (made by an older kdpipe "
                          "or by hand?); choose a new folder")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recorded, asdict(preset))


def prepare(preset: Preset, root: Path, clock: StageClock | None = None, device: str = "auto",
            progress: bool = True, second_teacher: str | None = None) -> Prepared:
    """Run (or find finished) stages 1-5 of the module docstring under `root`, and stage 6
    with `second_teacher` ("half" or "small"). ConfigError when `root` was prepared with
    another preset or second teacher."""
    from kdpipe.pipeline.cache_stage import CacheTeacherConfig, cache_teacher
    from kdpipe.trainer.config import TrainConfig
    from kdpipe.trainer.train import train

    second = None if second_teacher is None else second_teacher_spec(preset, second_teacher)
    check_preset(root, preset, second)
    clock = clock or StageClock(root)
    chat = preset.corpus == "chat"
    corpus_dir, tokenizer_dir = root / "corpus", root / "tokenizer"
    with clock.stage("corpus", done=(corpus_dir / "corpus.json").is_file()):
        train_jsonl, heldout_jsonl = (write_chat_corpus if chat else write_corpus)(
            corpus_dir, preset.train_chars, preset.heldout_chars)
    with clock.stage("tokenizer", done=(tokenizer_dir / "tokenizer.json").is_file()):
        train_tokenizer(train_jsonl, tokenizer_dir, preset.vocab_size, chat=chat)

    def cache(model: Path, data: Path, out: Path, top_k: int, train_on: str = "assistant"
              ) -> Path:
        chat_options = {"format": "messages", "train_on": train_on} if chat else {}
        cache_teacher(CacheTeacherConfig(teacher=str(model), data=(str(data),), out=str(out),
                                         top_k=top_k, pack=True, max_length=preset.max_length,
                                         batch_size=32, shard_size=512, device=device,
                                         progress=progress, **chat_options))  # type: ignore[arg-type]
        return out

    def train_teacher(stage: str, tokens: Path, shape: ModelSize, init: Path, run: Path
                      ) -> Path:
        """Train a teacher of `shape` on the token cache `tokens`: the final model."""
        finished = RunLayout(run).final_metrics.is_file()
        with clock.stage(stage, done=finished):
            teacher_init = init_model(tokenizer_dir, init, shape, preset.max_length)
            steps = preset.teacher_steps
            cfg = TrainConfig.from_options(
                cache=str(tokens), out=str(run), student=str(teacher_init), mode="ce",
                lr=preset.teacher_lr, warmup_steps=max(1, steps // 10),
                batch_size=preset.teacher_batch_size, max_steps=steps,
                save_every=max(1, steps // 3), keep_last=1, snapshots=False, device=device,
                progress=progress, resume=RunLayout(run).config.is_file() and not finished)
            # The folder records its preset and second teacher: a finished run is this one.
            if not finished:
                train(cfg)
        return RunLayout(run).final

    def reader() -> Path:
        return init_model(tokenizer_dir, root / "models" / "token-reader", READER,
                          preset.max_length)

    token_cache = root / "token-cache"
    with clock.stage("token cache", done=cache_complete(token_cache)):
        cache(reader(), train_jsonl, token_cache, top_k=1, train_on=CHAT_TEACHER_TRAIN_ON)
    teacher = train_teacher("teacher training", token_cache, preset.teacher,
                            root / "models" / "teacher-init", root / TEACHER_RUN)
    cache_dir, heldout_dir = root / "cache", root / "heldout-cache"
    with clock.stage("teacher cache (train)", done=cache_complete(cache_dir)):
        cache(teacher, train_jsonl, cache_dir, preset.top_k)
    with clock.stage("teacher cache (held-out)", done=cache_complete(heldout_dir)):
        cache(teacher, heldout_jsonl, heldout_dir, preset.top_k)
    student_config = write_spec(root / "models" / "student.json", preset.student,
                                preset.max_length)
    prepared = Prepared(root=root, train_corpus=train_jsonl, heldout_corpus=heldout_jsonl,
                        tokenizer=tokenizer_dir, teacher=teacher, cache=cache_dir,
                        heldout_cache=heldout_dir, student_config=student_config)
    if second is None:
        return prepared
    b_root = root / TEACHER_B
    b_tokens = token_cache
    if second.train_share < 1:
        b_tokens = b_root / "token-cache"
        with clock.stage("teacher B token cache", done=cache_complete(b_tokens)):
            b_train = leading_documents(train_jsonl, b_root / "train-leading.jsonl",
                                        second.train_share)
            cache(reader(), b_train, b_tokens, top_k=1, train_on=CHAT_TEACHER_TRAIN_ON)
    teacher_b = train_teacher("teacher B training", b_tokens, second.shape, b_root / "init",
                              b_root / "run")
    cache_b, heldout_b = b_root / "cache", b_root / "heldout-cache"
    with clock.stage("teacher B cache (train)", done=cache_complete(cache_b)):
        cache(teacher_b, train_jsonl, cache_b, preset.top_k)
    with clock.stage("teacher B cache (held-out)", done=cache_complete(heldout_b)):
        cache(teacher_b, heldout_jsonl, heldout_b, preset.top_k)
    return replace(prepared, teacher_b=teacher_b, cache_b=cache_b, heldout_b=heldout_b)
