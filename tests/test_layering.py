"""The package's layers: no import cycle between modules, and dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import diffpilot

ROOT = Path(diffpilot.__file__).parent


def _graph() -> dict[str, set[str]]:
    """Module -> the diffpilot modules it imports (at module level or inside functions)."""
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ("diffpilot",) + f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f

    def resolve(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else ""

    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffpilot"):
                for alias in node.names:
                    deps.add(resolve(f"{node.module}.{alias.name}"))
            elif isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.startswith("diffpilot"))
        graph[name] = {d for d in deps if d and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_one_way():
    graph = _graph()
    below = {  # a layer may import only these (besides itself)
        "diffpilot.policy.generative": ("diffpilot.policy.generative",),
        "diffpilot.data": ("diffpilot.data", "diffpilot.fileio", "diffpilot.parallel"),
        "diffpilot.policy": ("diffpilot.policy", "diffpilot.data", "diffpilot.stl", "diffpilot.planning", "diffpilot.fileio"),
        "diffpilot.train": ("diffpilot.train", "diffpilot.policy", "diffpilot.data", "diffpilot.sim", "diffpilot.fileio"),
    }
    bad = []
    for mod, deps in graph.items():
        layer = max((k for k in below if mod == k or mod.startswith(k + ".")), key=len, default=None)
        if layer is None:
            continue
        bad += [f"{mod} -> {d}" for d in deps if not any(d == ok or d.startswith(ok + ".") for ok in below[layer])]
    assert bad == []
