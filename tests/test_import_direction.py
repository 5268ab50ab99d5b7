"""Imports point one way: each room may import only the rooms declared below it, and no import-time cycle.

The order is the product's data flow, lowest first: the shared file helpers and the engines (the
bundle's contract), calibration, the runtime's value types, inspection, recipes, evaluation,
cameras, delivery, explain, the line daemon, the station, the offline exporter, the tools (demo,
benchmarks) and the command line on top. A module may import its own room freely; an import of a
room further up the list is an edge against the flow and fails here, as does any import-time cycle
between modules (imports inside functions are dependencies too, but a lazy registry import is not
a cycle at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import anomalygpt_edge

ROOT = Path(anomalygpt_edge.__file__).parent
PKG = "anomalygpt_edge"

#: Rooms, lowest first. A module belongs to the longest room name that prefixes it.
ROOMS = (
    "anomalygpt_edge",  # __init__, atomic_files: shared helpers with no product knowledge
    "anomalygpt_edge.engines",
    "anomalygpt_edge.calibration",
    "anomalygpt_edge.runtime",  # values, defaults, secrets: what every room of the runtime shares
    "anomalygpt_edge.runtime.inspection",  # frame -> features -> scores -> verdict record: the maths
    # a recipe enrolled (store, enrollment) and at work (inspector)
    "anomalygpt_edge.runtime.recipes",
    "anomalygpt_edge.runtime.evaluation",
    "anomalygpt_edge.runtime.cameras",
    "anomalygpt_edge.runtime.delivery",
    "anomalygpt_edge.runtime.explain",
    "anomalygpt_edge.runtime.line",
    "anomalygpt_edge.runtime.web",
    "anomalygpt_edge.export",
    "anomalygpt_edge.runtime.tools",
    "anomalygpt_edge.runtime.cli",
    "anomalygpt_edge.cli",  # the top-level command line and __main__
)
TOP = {"anomalygpt_edge.cli", "anomalygpt_edge.__main__"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"tests", ".venv", "build"} or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join((PKG, *rel.with_suffix("").parts)).removesuffix(".__init__")
        mods[name] = path
    return mods


def _room(module: str) -> str:
    if module in TOP:
        return "anomalygpt_edge.cli"
    return max((r for r in ROOMS if module == r or module.startswith(r + ".")), key=len)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(module, line, at_import_time)`` for every import of a product module in ``path``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: not a dependency at run time
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith(PKG):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in mods else child.module, child.lineno, top_level))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top_level) for a in child.names if a.name.startswith(PKG))
            inner = top_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return found


def test_every_import_points_down_the_declared_order_of_rooms():
    mods = _modules()
    rank = {room: i for i, room in enumerate(ROOMS)}
    against = []
    for name, path in sorted(mods.items()):
        here = _room(name)
        for target, line, _ in _imports(path, mods):
            there = _room(target)
            if rank[there] > rank[here]:
                against.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {target} ({there})")
    assert not against, "imports against the declared order of rooms:\n" + "\n".join(against)


def test_no_module_imports_itself_back_at_import_time():
    mods = _modules()
    graph = {
        name: {t for t, _, top in _imports(path, mods) if top and t in mods and t != name}
        for name, path in mods.items()
    }
    # A package's __init__ importing its own modules is how packages export; the module importing
    # its package back for those names is the usual cycle Python resolves, so packages are skipped.
    packages = {n for n, p in mods.items() if p.name == "__init__.py"}
    graph = {n: {t for t in deps if t not in packages} for n, deps in graph.items() if n not in packages}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import-time cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_declared_rooms_are_the_packages_on_disk():
    packages = {n for n, p in _modules().items() if p.name == "__init__.py"}
    assert packages == set(ROOMS) - {"anomalygpt_edge.cli"}, "a package was added or removed: declare it in ROOMS"
