"""Packaging: one import package over the customer's folders, and a runtime that never needs torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_FOLDERS = ("engines", "runtime", "calibration")


def _packages_on_disk() -> set[str]:
    found = {"anomalygpt_edge"}
    for folder in ("export", *RUNTIME_FOLDERS):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("anomalygpt_edge", *rel)))
    return found


def test_every_subpackage_is_listed_so_a_built_wheel_is_complete() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() <= listed, sorted(_packages_on_disk() - listed)


def test_every_runtime_module_imports_with_torch_absent() -> None:
    modules = sorted(
        ".".join(("anomalygpt_edge", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for folder in RUNTIME_FOLDERS
        for p in (ROOT / folder).rglob("*.py")
    )
    code = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx', 'tensorrt'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
assert 'torch' not in sys.modules
print('imported', len({modules!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(modules)}" in result.stdout


def test_command_line_help_works_without_torch_and_lists_every_job() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from anomalygpt_edge.cli import main
sys.argv = ['anomalygpt-edge', '--help']
main()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("export", "enroll", "calibrate", "inspect", "evaluate", "bench", "ask", "run", "demo"):
        assert command in result.stdout, command
    module = subprocess.run([sys.executable, "-m", "anomalygpt_edge", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and "anomalygpt-edge 0.1.0" in module.stdout


def _mypy_config() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def _product_modules() -> set[str]:
    """Every product module by import name (what ./edge test's type stage must cover)."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if any(p in ("tests", "build", "dist") or p.startswith(".") for p in rel.parts[:-1]):
            continue
        found.add(".".join(("anomalygpt_edge", *rel.with_suffix("").parts)).removesuffix(".__init__"))
    return found


def test_the_type_check_covers_every_product_module() -> None:
    config = _mypy_config()
    packages, modules = config["packages"], set(config["modules"])
    unchecked = sorted(
        m for m in _product_modules() if m not in modules and not any(m == p or m.startswith(p + ".") for p in packages)
    )
    assert not unchecked, f"add to [tool.mypy] packages or modules: {unchecked}"


def test_every_module_the_type_check_exempts_still_exists() -> None:
    # mypy only notes a stale override; a module split or deleted must leave the not-yet-clean lists.
    product = _product_modules()
    named = {m for o in _mypy_config().get("overrides", []) for m in o["module"] if m.startswith("anomalygpt_edge")}
    stale = sorted(m for m in named if not m.endswith(".*") and m not in product)
    assert not stale, f"[tool.mypy] overrides name modules that are gone: {stale}"
