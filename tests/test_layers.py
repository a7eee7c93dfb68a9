"""The package's layers only point down, and no module imports itself back (docs/architecture.md).

Every ``import`` of a ``dkvb`` module is read with :mod:`ast` (module-level and function-level
imports alike, since a lazy import is still a dependency) and checked against :data:`LAYERS`:
a module may import from its own layer or a lower one, never a higher one, and the import graph
has no cycle. A new module must be given a layer here, so its place is a deliberate choice.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dkvb"

# Lowest first. A name is a module (``dkvb.<name>``) or a subpackage with every module in it.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "validate", "io", "distributed", "data", "datasets", "encoders", "flops", "cache", "threads", "timing", "workers", "provenance"}),
    ("models", {"keys", "selection", "value_start", "bottleneck", "classifier", "models"}),
    ("training", {"train", "value_init", "shards", "evaluate", "forgetting_quality"}),
    ("unlearning", {"unlearn"}),
    ("application", {"config", "experiment", "forgetting_eval", "verify", "report", "store", "audit", "request", "replay",
                     "embeddings_io", "served", "service", "serve"}),
    ("interface", {"cli", "__main__", ""}),  # "" is the package facade, dkvb/__init__.py
]


def module_name(path: Path) -> str:
    parts = ("dkvb",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a ``dkvb`` module, found by its first name under ``dkvb``."""
    top = module.split(".")[1] if "." in module else ""
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py and docs/architecture.md")


def imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported dkvb module) for every import in ``path``, at any depth of the syntax tree.

    ``from X import name`` imports ``X.name`` when that is a module (``from . import store``),
    else ``X`` itself.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dkvb"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "dkvb":
                continue
            for alias in node.names:
                found.append((node.lineno, f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source))
    return found


def graph() -> dict[str, list[tuple[int, str]]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_imports_only_point_down():
    upward = [
        f"{module} (layer {LAYERS[layer_of(module)][0]}) line {line} imports {target} "
        f"(layer {LAYERS[layer_of(target)][0]})"
        for module, targets in graph().items()
        for line, target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    """One import cycle as [m0, m1, ..., m0], or [] when the graph has none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = "open"
        stack.append(m)
        for _, t in edges.get(m, []):
            if t == m:
                continue  # "from . import x" inside a package's own __init__ resolves to itself
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = "done"
        stack.pop()
        return []

    for m in edges:
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_no_import_cycle():
    edges = graph()
    cycle = find_cycle(edges)
    steps = [f"{a} line {next(line for line, t in edges[a] if t == b)} imports {b}" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle:\n" + "\n".join(steps)


def test_the_checks_catch_a_lazy_upward_import_and_a_cycle(tmp_path):
    """The walker sees imports inside functions, and the cycle search finds a planted loop."""
    planted = tmp_path / "models.py"
    planted.write_text("def f():\n    from .unlearn import create_unlearner\n    from . import train\n")
    found = imports("dkvb.models", planted, set(modules()))
    assert found == [(2, "dkvb.unlearn"), (3, "dkvb.train")]
    assert all(layer_of(target) > layer_of("dkvb.models") for _, target in found)
    loop = {"dkvb.a": [(1, "dkvb.b")], "dkvb.b": [(2, "dkvb.c")], "dkvb.c": [(3, "dkvb.a")]}
    assert find_cycle(loop) == ["dkvb.a", "dkvb.b", "dkvb.c", "dkvb.a"]
    assert find_cycle({"dkvb.a": [(1, "dkvb.b")], "dkvb.b": []}) == []
