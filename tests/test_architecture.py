"""House rules that keep the two sides apart: they meet only through `kdpipe.schemas`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdpipe"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_trainer_never_imports_pipeline() -> None:
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p)
                                                     if m.startswith("kdpipe.pipeline"))
                 for p in (PACKAGE / "trainer").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_schemas_depend_on_nothing_heavy() -> None:
    allowed_roots = {"kdpipe", "pyarrow", "numpy", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    for path in (PACKAGE / "schemas").rglob("*.py"):
        for module in imported_modules(path):
            root = module.split(".")[0]
            assert root in allowed_roots or root in stdlib, f"{path.name} imports {module}"
            assert not module.startswith(("kdpipe.pipeline", "kdpipe.trainer")), path.name


def test_training_loads_no_teacher_side_module() -> None:
    """Importing the whole trainer (what train-student runs) never imports the teacher stage."""
    code = ("import sys, kdpipe.trainer.train, kdpipe.trainer.evaluate, kdpipe.trainer.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('kdpipe.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
