"""The packages import in layers: no module reaches back up into one that imports it.

Counts every import statement a module runs, at the top or inside a function (a lazy import is
still a dependency), and skips only ``if TYPE_CHECKING:`` blocks (annotations). A cycle makes the
modules in it one unit that cannot be read, tested or replaced apart (issue 16).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("geoshare", "solver", "service", "hessian_worker")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for b in node.body for n in ast.walk(b)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            # `from pkg import sub` depends on pkg.sub; `from pkg import name` on pkg itself
            found |= submodules if len(submodules) == len(node.names) else {base, *submodules}
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = defaultdict(set, {name: _imports(name, path, modules) for name, path in modules.items()})
    cycles = _cycles(graph)
    detail = "\n".join(" <-> ".join(c) + "\n    " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
                       for c in cycles)
    assert not cycles, f"import cycles:\n{detail}"


def test_the_cycle_finder_finds_cycles():
    assert _cycles(defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})) == [["a", "b", "c"]]
    assert _cycles(defaultdict(set, {"a": {"b"}, "b": set()})) == []


def test_lower_layers_do_not_import_upper_ones():
    modules = _modules()
    for name, path in modules.items():
        imported = _imports(name, path, modules)
        if name.startswith("solver"):  # the bottom: pure Python + OR-Tools
            assert not {m for m in imported if m.split(".")[0] in ("hessian_worker", "service", "geoshare")}, name
        if name.startswith("hessian_worker"):
            assert not {m for m in imported if m.split(".")[0] in ("service", "geoshare")}, name
