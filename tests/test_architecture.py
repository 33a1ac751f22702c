"""House rules: what each package may import, no import cycle, and the two sides apart.

The teacher stage (`pipeline`) and the student stage (`trainer`) meet only through `schemas`
and files on disk; docs/architecture.md draws the arrows this file checks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdpipe"
SHARED = {"schemas", "options", "tokenizer_identity", "torch_runtime", "extras", "progress",
          "log_setup", "packing", "model_parts", "hf_errors"}
# Package (or top-level module) -> the kdpipe packages it may import, besides itself and the
# root `kdpipe` (its version).
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "options": {"schemas"},
    "tokenizer_identity": {"schemas", "hf_errors"},
    "torch_runtime": {"schemas"},
    "extras": {"schemas"},
    "progress": set(),
    "log_setup": set(),  # one line per record, and no warning about nothing kdpipe uses
    "packing": {"schemas"},  # packed documents kept apart, in the teacher's pass and the student's
    "model_parts": {"packing"},  # body and head, each side computing the head in chunks
    "hf_errors": set(),  # transformers' refusals as one line, for every loader
    "pipeline": SHARED,
    "trainer": SHARED,
    "curriculum": SHARED | {"trainer"},  # a student's scoring pass over the cache
    "embedded": SHARED | {"pipeline", "trainer"},  # caches and trains the embedded teacher
    "experiments": SHARED | {"embedded", "curriculum", "trainer"},
    "demo": SHARED | {"embedded", "experiments"},
    "reports": SHARED | {"curriculum"},
    "cli": SHARED | {"pipeline", "trainer", "curriculum", "embedded", "experiments", "demo",
                     "reports"},
    "__main__": {"cli"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def module_graph() -> dict[str, set[str]]:
    """kdpipe module -> the kdpipe modules it imports."""
    known = modules()
    return {name: {m for m in imported_modules(path) if m in known and m != name}
            for name, path in known.items()}


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_package_imports_only_what_it_may() -> None:
    graph = module_graph()
    offenders = {}
    for module, targets in graph.items():
        source = package(module)
        assert source in ALLOWED or source == "kdpipe", f"{module}: add its package to ALLOWED"
        allowed = ALLOWED.get(source, set()) | {source, "kdpipe"}
        bad = sorted(t for t in targets if package(t) not in allowed)
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_no_import_cycle() -> None:
    graph = module_graph()
    assert cycles(graph) == []
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        packages[package(module)].update(package(t) for t in targets
                                         if package(t) != package(module))
    assert cycles(packages) == []
    # the detector works
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_schemas_depend_on_nothing_heavy() -> None:
    allowed_roots = {"kdpipe", "pyarrow", "numpy", "fsspec", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    for path in (PACKAGE / "schemas").rglob("*.py"):
        for module in imported_modules(path):
            root = module.split(".")[0]
            assert root in allowed_roots or root in stdlib, f"{path.name} imports {module}"


def test_training_loads_no_teacher_side_module() -> None:
    """Importing the whole trainer (what train-student runs) never imports the teacher stage."""
    code = ("import sys, kdpipe.trainer.train, kdpipe.trainer.evaluate, kdpipe.trainer.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('kdpipe.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
