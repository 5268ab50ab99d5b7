"""Code shape: no product module over 500 lines, no function over 60.

Big modules and long functions are where this product's bugs hid (a function doing three jobs is
tested for one). A module that must stay big says why in a ``# shape: <why>`` comment in its first
lines, and is then exempt from both limits. A failure lists every offender with its size.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
#: Folders that are not product code: the tests, build outputs, the venv and tool caches.
SKIP_DIRS = {"tests", "build", "dist", "__pycache__"}
#: How far down the exemption comment may sit (it may follow a shebang or the docstring's start).
HEAD_LINES = 10
SHAPE_COMMENT = re.compile(r"^#\s*shape:\s*(?P<why>.*)$")


def product_modules() -> list[Path]:
    """Every .py file of the product, hidden folders (.venv, .git, caches) and egg-info left out."""
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts[:-1]
        if any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        found.append(path)
    return sorted(found)


def shape_reason(text: str) -> str | None:
    """The ``# shape: <why>`` reason in the module's first lines, or None (empty reasons count as given
    here and are refused by their own test)."""
    for line in text.splitlines()[:HEAD_LINES]:
        match = SHAPE_COMMENT.match(line.strip())
        if match:
            return match.group("why").strip()
    return None


def long_functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function over the limit; nested functions and
    methods are measured on their own (their lines also count in the function around them)."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append((name, child.lineno, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_walk_sees_the_product_and_not_the_tests() -> None:
    names = {_rel(p) for p in product_modules()}
    assert {"cli.py", "engines/bundle.py", "runtime/values.py"} <= names
    assert not any(n.startswith(("tests/", ".venv/", "build/")) for n in names)


def test_no_product_module_over_500_lines_without_a_shape_reason() -> None:
    offenders = []
    for path in product_modules():
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES and shape_reason(text) is None:
            offenders.append((n, _rel(path)))
    listing = "\n".join(f"  {path}: {n} lines" for n, path in sorted(offenders, reverse=True))
    assert not offenders, (
        f"{len(offenders)} module(s) over {MAX_MODULE_LINES} lines (split them, or say why in a "
        f"'# shape: <why>' comment in the first {HEAD_LINES} lines):\n{listing}"
    )


def test_no_product_function_over_60_lines_without_a_shape_reason() -> None:
    offenders = []
    for path in product_modules():
        text = path.read_text(encoding="utf-8")
        if shape_reason(text) is not None:
            continue
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as exc:  # listed with the rest rather than hiding them
            offenders.append((0, f"{_rel(path)}:{exc.lineno} does not parse ({exc.msg})"))
            continue
        for name, line, length in long_functions(tree):
            offenders.append((length, f"{_rel(path)}:{line} {name}"))
    listing = "\n".join(f"  {where}: {n} lines" for n, where in sorted(offenders, reverse=True))
    assert not offenders, (
        f"{len(offenders)} function(s) over {MAX_FUNCTION_LINES} lines (split into named helpers, or "
        f"say why in the module's '# shape: <why>' comment):\n{listing}"
    )


def test_every_shape_exemption_gives_its_reason() -> None:
    bare = [_rel(p) for p in product_modules() if shape_reason(p.read_text(encoding="utf-8")) == ""]
    assert not bare, f"'# shape:' with no reason in: {', '.join(bare)}"


def test_function_lengths_are_measured_per_function_nested_ones_on_their_own() -> None:
    # The measuring rule itself: end_lineno - lineno + 1, methods and nested functions included.
    inner = "\n".join(f"        x{i} = {i}" for i in range(59))  # def line + 59 = 60: at the limit
    source = (
        "class C:\n"
        "    def method(self):\n" + "\n".join(f"        y{i} = {i}" for i in range(60)) + "\n"
        "def outer():\n"
        "    def inner():\n" + inner + "\n"
        "    return inner\n"
    )
    found = {name: length for name, _, length in long_functions(ast.parse(source))}
    assert found == {"C.method": 61, "outer": 62}


def test_a_shape_comment_in_the_first_lines_exempts_a_module() -> None:
    assert shape_reason('"""Doc."""\n# shape: one state machine, read top to bottom\nx = 1\n') == (
        "one state machine, read top to bottom"
    )
    assert shape_reason("\n" * HEAD_LINES + "# shape: too far down\n") is None
    assert shape_reason("# shape:\n") == ""
