"""The architecture as a test: imports only point down the layers, and no module imports
itself back through others.

It reads the sources (ast), so imports inside functions count too. The layers, bottom up:
the IR; core semantics (tiles, the element-wise rule, run-time routing, the oracle); the
analysis (plans, closed forms, counts); the simulator and the backends, side by side; the
op, its dispatch and the public API; the tools on top (command line, benchmarks). A module
may import its own layer or any below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"patterngen": ROOT / "patterngen", "patterngen.ir": ROOT / "ir", "patterngen.backends": ROOT / "backends"}

LAYERS = [  # (layer, module name prefixes), bottom first; the longest matching prefix decides
    ("ir", ["patterngen.ir", "patterngen.version"]),
    ("routing", ["patterngen.routing"]),
    ("core", ["patterngen.core"]),
    ("analysis", ["patterngen.analysis"]),
    ("sim+backends", ["patterngen.sim", "patterngen.backends"]),
    ("api", ["patterngen.registry", "patterngen.dispatch", "patterngen.op", "patterngen.api", "patterngen.aot",
             "patterngen.integrations", "patterngen"]),
    ("tools", ["patterngen.tools"]),
]

# Sideways or upward imports that exist today, each with why; the test fails when one
# disappears (remove it here) or a new one appears.
KNOWN: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "patterngen" and parts and parts[0] in ("ir", "backends"):
                continue  # not a real location
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The patterngen modules `name` imports (a `from package import name` that names a
    submodule counts as that submodule)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("patterngen") and t != name:
                found.add(t)
    return found


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return rank


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_imports_point_down():
    graph = _graph()
    sim = _layer("patterngen.sim")
    bad, used = [], set()
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = _layer(module), _layer(target)
            sideways = (a == b == sim and module.split(".")[:2] != target.split(".")[:2]
                        and "backends" in module and "backends" not in target)
            if b > a or sideways:
                key = (module, "sim" if target.startswith("patterngen.sim") else target)
                if key in KNOWN:
                    used.add(key)
                else:
                    bad.append(f"{module} ({LAYERS[a][0]}) imports {target} ({LAYERS[b][0]})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)
    assert used == set(KNOWN), f"KNOWN lists imports that are gone: {sorted(set(KNOWN) - used)}"


def test_no_import_cycles():
    """Strongly connected components of the module graph (Tarjan), package roots aside:
    a package's __init__ re-exports its modules, which is not a cycle of dependence."""
    graph = {m: {t for t in ts if t not in PACKAGE_DIRS and not _is_package(t)} for m, ts in _graph().items()
             if m not in PACKAGE_DIRS and not _is_package(m)}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _is_package(name: str) -> bool:
    path = _modules().get(name)
    return path is not None and path.name == "__init__.py"
