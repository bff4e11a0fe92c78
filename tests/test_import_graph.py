"""The house's floors (README "Layout"): every ``titok_jax`` import, at module level or inside a
function, goes down a floor or stays inside its own package, and no modules import each other in
a cycle. Read from the source with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
import os

import titok_jax

ROOT = os.path.dirname(os.path.abspath(titok_jax.__file__))
PKG = "titok_jax"

# Top (0) to bottom. A module may import its own package (room) or any package on a lower floor.
FLOORS = {
    "titok_jax": 0, "__main__": 0,                             # package root (lazy load()), python -m
    "cli": 1, "commands": 2,                                   # the `titok-jax` command
    "train": 3, "api": 3, "generation": 3,                     # trainer and inference API
    "tasks": 4,                                                # one task per family
    "convert": 5,                                              # PyTorch weights -> our params
    "video_files": 5,                                          # GIF / mp4 in and out (commands, generate)
    "models": 6, "generators": 6,                              # tokenizers and generators
    "quantizers": 7, "flow": 7, "losses": 7, "evaluation": 7, "data": 7, "checkpoint": 7,
    "nets": 8,                                                 # frozen feature networks
    "checkpoint_integrity": 8, "checkpoint_quiet": 8,          # checkpoint's file checks, Orbax's noise
    "nn": 9, "trees": 9,                                       # layers; flat param trees
    "outputs": 9,                                              # output files: refuse, stage, rename
    "errors": 10,                                              # user errors vs bugs (imports nothing)
}

# PENDING (issue 10): edges in files owned by others, allowed until they move. Each entry is
# (importer, imported module); remove it with the import. The test fails on a stale entry.
ALLOWED_PENDING: set[tuple[str, str]] = set()


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def all_modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                out[module_name(os.path.join(d, f))] = os.path.join(d, f)
    return out


def _resolve(name: str, importer: str, level: int, is_package: bool) -> str:
    if not level:
        return name
    base = importer.split(".")
    base = base[:len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def import_edges(modules: dict[str, str]) -> set[tuple[str, str]]:
    """``(importer, imported)`` for every ``titok_jax`` import statement anywhere in a module.
    ``from P import n`` counts as an import of ``P.n`` when that is a module, else of ``P``; the
    implicit import of the importer's own ancestor packages is not an edge."""
    edges = set()
    for mod, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", mod, node.level, is_package)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            for t in targets:
                if t != mod and (t == PKG or t.startswith(PKG + ".")) and not mod.startswith(t + "."):
                    edges.add((mod, t))
    return edges


def package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor_violations(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    bad = set()
    for a, b in edges:
        pa, pb = package(a), package(b)
        if pa != pb and FLOORS[pb] <= FLOORS[pa]:
            bad.add((a, b))
    return bad


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_floor():
    modules = all_modules()
    assert {package(m) for m in modules} <= set(FLOORS), sorted({package(m) for m in modules} - set(FLOORS))


def test_no_upward_or_sideways_import():
    bad = floor_violations(import_edges(all_modules())) - ALLOWED_PENDING
    assert not bad, "imports that do not go down a floor:\n" + "\n".join(
        f"  {a} -> {b}  ({package(a)} floor {FLOORS[package(a)]}, {package(b)} floor {FLOORS[package(b)]})"
        for a, b in sorted(bad))


def test_no_import_cycle():
    found = cycles(import_edges(all_modules()) - ALLOWED_PENDING)
    assert not found, "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in found)


def test_pending_allowances_are_still_needed():
    stale = ALLOWED_PENDING - import_edges(all_modules())
    assert not stale, f"remove these from ALLOWED_PENDING, the imports are gone: {sorted(stale)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """A function-level upward import in a low module and a two-module cycle are both found."""
    modules = dict(all_modules())
    low = tmp_path / "low.py"
    low.write_text("def f():\n    from titok_jax.train import loop\n")
    modules["titok_jax.nn.low"] = str(low)
    edges = import_edges(modules)
    assert ("titok_jax.nn.low", "titok_jax.train.loop") in floor_violations(edges)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from titok_jax.nn import b\n")
    b.write_text("from titok_jax.nn.a import x\n")
    assert ["titok_jax.nn.a", "titok_jax.nn.b"] in cycles(
        import_edges({"titok_jax.nn.a": str(a), "titok_jax.nn.b": str(b)}))
