"""The embedded corpus: the Python standard library's source, split by file into train/held-out.

Every machine with Python has it (`sysconfig.get_paths()["stdlib"]`, ~30 MB of `.py`) and no
one here wrote it. A file goes to held-out when crc32 of its relative path falls in the first
`HELDOUT_PERCENT` of 100 buckets, so the split never depends on the budget, the Python
version's file list or the order files are read in; a held-out file is never trained on. Tests,
vendored packages and generated data tables are left out (they read like data, not code), and
files are visited in a hash order so any budget samples the whole library, not the letter `a`.
"""

from __future__ import annotations

import json
import logging
import sys
import sysconfig
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from kdpipe.schemas.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

HELDOUT_PERCENT = 5
MAX_FILE_CHARS = 100_000  # larger files are generated tables (unicode data, pydoc topics)
SKIPPED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
INFO_NAME = "corpus.json"
TRAIN_NAME, HELDOUT_NAME = "train.jsonl", "heldout.jsonl"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The library's own .py files, in a stable pseudo-random order (crc32 of the path)."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py")
             if not SKIPPED_PARTS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: (zlib.crc32(b"order:" + _name(p, root).encode()),
                                        _name(p, root)))


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def is_heldout(name: str) -> bool:
    """The split rule: a stable hash of the file's path inside the library."""
    return zlib.crc32(name.encode()) % 100 < HELDOUT_PERCENT


@dataclass(frozen=True)
class CorpusInfo:
    """What `corpus.json` records: the budgets asked for and what was written."""

    train_chars: int  # budget asked for
    heldout_chars: int
    python: str
    stdlib: str
    train_files: int = 0
    heldout_files: int = 0
    train_chars_written: int = 0
    heldout_chars_written: int = 0


def write_corpus(out: Path, train_chars: int, heldout_chars: int) -> tuple[Path, Path]:
    """Write OUT/train.jsonl and OUT/heldout.jsonl ({"text", "path"} per file); skip when done.

    Whole files are taken until each split's character budget is reached (the last one may
    overshoot it by less than one file).
    """
    out.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = out / TRAIN_NAME, out / HELDOUT_NAME
    root = stdlib_root()
    asked = CorpusInfo(train_chars=train_chars, heldout_chars=heldout_chars,
                       python=sys.version.split()[0], stdlib=str(root))
    info_path = out / INFO_NAME
    if info_path.is_file() and train_path.is_file() and heldout_path.is_file():
        done = json.loads(info_path.read_text(encoding="utf-8"))
        if {k: done.get(k) for k in ("train_chars", "heldout_chars", "python", "stdlib")} == \
                {k: getattr(asked, k) for k in ("train_chars", "heldout_chars", "python",
                                                "stdlib")}:
            return train_path, heldout_path
    budget = {True: heldout_chars, False: train_chars}
    written = {True: 0, False: 0}
    files = {True: 0, False: 0}
    with atomic_path(train_path) as train_tmp, atomic_path(heldout_path) as heldout_tmp, \
            open(train_tmp, "w", encoding="utf-8") as train_f, \
            open(heldout_tmp, "w", encoding="utf-8") as heldout_f:
        for path in stdlib_files(root):
            name = _name(path, root)
            held = is_heldout(name)
            if written[held] >= budget[held]:
                if written[not held] >= budget[not held]:
                    break
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip() or len(text) > MAX_FILE_CHARS:
                continue
            (heldout_f if held else train_f).write(json.dumps({"text": text, "path": name})
                                                   + "\n")
            written[held] += len(text)
            files[held] += 1
    info = CorpusInfo(train_chars=train_chars, heldout_chars=heldout_chars,
                      python=asked.python, stdlib=asked.stdlib, train_files=files[False],
                      heldout_files=files[True], train_chars_written=written[False],
                      heldout_chars_written=written[True])
    atomic_write_json(info_path, asdict(info))
    log.info("corpus: %d train files (%d chars), %d held-out files (%d chars) from %s",
             files[False], written[False], files[True], written[True], root)
    return train_path, heldout_path
