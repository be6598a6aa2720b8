"""Imports point down: no cycle between forge's packages, counting function-level imports.

A function-level import can hide a cycle (`a` imports `b` at module level, `b` imports `a` inside a
function): both import fine, yet neither package can be understood, tested or replaced without
the other. The unit is the top-level package (`forge.controller`, `forge.observability`, ...) or
module (`forge.types`): importing any module of a package runs its `__init__`, so that is where
a cycle bites. `if TYPE_CHECKING:` imports do not run and are not counted; string imports
(`importlib.import_module("forge.x")`) are.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(src: Path, pkg: str) -> dict[str, Path]:
    out = {}
    for p in (src / pkg).rglob("*.py"):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: dict[str, Path], pkg: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for each import of `pkg` by module `name`."""
    is_pkg = path.name == "__init__.py"
    found: list[tuple[int, str, bool]] = []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: None if is_pkg else -1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return [node.args[0].value]
        return []

    def visit(node: ast.AST, in_fn: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for c in child.orelse:
                    visit_one(c, in_fn)
                continue
            visit_one(child, in_fn)

    def visit_one(child: ast.AST, in_fn: bool) -> None:
        for t in targets(child):
            if t == pkg or t.startswith(pkg + "."):
                found.append((child.lineno, t, in_fn))
        visit(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def package_cycles(src: Path, pkg: str) -> list[str]:
    """Each import (module:line -> target) that closes a cycle between `pkg`'s top-level units."""
    known = _modules(src, pkg)

    def unit(mod: str) -> str:
        return ".".join(mod.split(".")[:2])

    edges: dict[str, dict[str, list[str]]] = {}
    for name, path in known.items():
        for line, target, in_fn in _imports(name, path, known, pkg):
            a, b = unit(name), unit(target)
            if a != b and b != pkg:
                where = f"{name}:{line} -> {target}" + (" (in a function)" if in_fn else "")
                edges.setdefault(a, {}).setdefault(b, []).append(where)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges.get(todo.pop(), {}):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return sorted({w for a, outs in edges.items() for b, ws in outs.items() if reaches(b, a) for w in ws})


def test_no_cycle_between_forge_packages():
    cycles = package_cycles(SRC, "forge")
    assert not cycles, "imports that close a cycle between forge packages:\n  " + "\n  ".join(cycles)


def test_the_check_sees_a_cycle_hidden_in_a_function(tmp_path):
    """The checker itself: a function-level import back up is a cycle; TYPE_CHECKING is not."""
    for rel, text in {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.core import f\n",
        "pkg/low/core.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.high\n"
                           "def f():\n    return 1\n",
        "pkg/high.py": "from pkg.low import f\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert package_cycles(tmp_path, "pkg") == []
    (tmp_path / "pkg/low/core.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    assert package_cycles(tmp_path, "pkg") == ["pkg.high:1 -> pkg.low", "pkg.low.core:2 -> pkg.high (in a function)"]
    (tmp_path / "pkg/low/core.py").write_text(
        "import importlib\ndef f():\n    return importlib.import_module('pkg.high')\n")
    assert "pkg.low.core:3 -> pkg.high (in a function)" in package_cycles(tmp_path, "pkg")


def test_every_forge_package_imports():
    """Every top-level package imports, in a fresh interpreter, on CPU without optional extras."""
    units = sorted({p.stem if p.is_file() else p.name for p in (SRC / "forge").iterdir()
                    if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()})
    code = "import importlib, sys\nfor u in sys.argv[1:]:\n    importlib.import_module('forge.' + u)\n"
    out = subprocess.run([sys.executable, "-c", code, *units], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
