"""The package's shape, read from its source with ``ast``: imports run one way between units
(entry points -> checkpoint -> policies -> sharding -> comm -> kernels, with plan, runtime and
util at the bottom), no two modules import each other however indirectly (lazy and
TYPE_CHECKING imports count), and only runtime.py reads the environment (the launcher and the
benchmark, which start processes, may read theirs). Each checker is also run on a small
made-up package that breaks its rule, so the checks are seen to fail."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autotp"

# higher may import lower; equal only within the same unit, or between entry points
RANKS = {"__init__": 6, "api": 6, "cli": 6, "launcher": 6, "bench": 6, "generate": 6,
         "checkpoint": 5, "policies": 4, "sharding": 3, "comm": 2, "kernels": 1,
         "plan": 0, "plan_table": 0, "runtime": 0, "util": 0}
ENTRY_RANK = 6
MAY_READ_ENV = ("runtime", "launcher", "bench")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file."""
    top = name.split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == top and t in known)
    found.discard(name)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layering_problems(root: Path) -> list[str]:
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    problems = [f"import cycle between modules: {c}" for c in cycles(graph)]
    units: dict[str, set[str]] = {}
    for source, targets in graph.items():
        for target in targets:
            a, b = unit(source), unit(target)
            if a == b:
                continue
            units.setdefault(a, set()).add(b)
            if a not in RANKS or b not in RANKS:
                problems.append(f"{source} -> {target}: unit {a if a not in RANKS else b!r} has no place in RANKS")
            elif RANKS[a] < RANKS[b] or RANKS[a] == RANKS[b] != ENTRY_RANK and RANKS[a] != 0:
                problems.append(f"{source} imports {target}: {a} (rank {RANKS[a]}) may not import {b} "
                                f"(rank {RANKS[b]})")
    problems += [f"import cycle between units: {c}" for c in cycles(units)]
    return problems


def environment_reads(root: Path, allowed: tuple[str, ...]) -> list[str]:
    """Places outside ``allowed`` units that read or write os.environ / os.getenv."""
    found = []
    for name, path in modules(root).items():
        if unit(name) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            hit = (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "unsetenv")
                   and isinstance(node.value, ast.Name) and node.value.id == "os") or \
                  (isinstance(node, ast.ImportFrom) and node.module == "os"
                   and any(a.name in ("environ", "getenv") for a in node.names))
            if hit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_imports_run_one_way_and_never_in_a_cycle():
    assert layering_problems(PACKAGE) == []
    assert {unit(m) for m in modules(PACKAGE)} <= set(RANKS)


def test_only_runtime_reads_the_environment():
    assert environment_reads(PACKAGE, MAY_READ_ENV) == []


def make_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files,expect", [
    ({"__init__.py": "", "plan.py": "def f():\n    from autotp import plan_table\n",
      "plan_table.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from autotp.plan import Plan\n"},
     "import cycle between modules"),
    ({"__init__.py": "", "kernels/__init__.py": "from autotp.sharding import layers\n",
      "sharding/__init__.py": "", "sharding/layers.py": ""}, "kernels (rank 1) may not import sharding"),
    ({"__init__.py": "", "policies/__init__.py": "from autotp.checkpoint.loader import x\n",
      "checkpoint/__init__.py": "", "checkpoint/loader.py": ""}, "policies (rank 4) may not import checkpoint"),
    ({"__init__.py": "", "gadgets.py": "from autotp import plan\n", "plan.py": ""}, "has no place in RANKS"),
])
def test_negative_control_the_layering_check_catches_each_kind_of_problem(tmp_path, files, expect):
    root = make_package(tmp_path / "autotp", files)
    problems = layering_problems(root)
    assert any(expect in p for p in problems), problems


def test_negative_control_the_environment_check_catches_reads(tmp_path):
    root = make_package(tmp_path / "autotp", {
        "__init__.py": "", "runtime.py": "import os\nX = os.environ.get('A')\n",
        "comm/__init__.py": "import os\ndef f():\n    return os.environ['AUTOTP_COMM']\n",
        "kernels/__init__.py": "from os import getenv\n"})
    assert environment_reads(root, MAY_READ_ENV) == ["autotp/comm/__init__.py:3", "autotp/kernels/__init__.py:1"]
