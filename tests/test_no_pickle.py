"""The runtime loads model files only as safetensors/npz/ONNX/GGUF: no pickle anywhere in it.

A static check over every module the line device runs (runtime/, engines/, calibration/), so a
future ``np.load`` without ``allow_pickle=False`` or a ``torch.load`` fails here rather than in an
audit: a pickled file runs arbitrary code when it is loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("runtime", "engines", "calibration")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def runtime_modules() -> list[Path]:
    return sorted(p for pkg in RUNTIME_PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_the_scan_covers_the_runtime() -> None:
    names = {p.name for p in runtime_modules()}
    assert {"spool.py", "archive.py", "memory_bank.py", "bundle.py", "threshold.py"} <= names


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_in_runtime_module(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = {a.name.split(".")[0] for a in node.names} & PICKLING_MODULES
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in PICKLING_MODULES, f"{path.name}:{node.lineno}"
    for call in _calls(tree):
        name = _dotted(call.func)
        assert name not in ("torch.load", "torch.jit.load"), f"{path.name}:{call.lineno} calls {name}"
        if name in ("np.load", "numpy.load"):
            flags = {k.arg: k.value for k in call.keywords}
            value = flags.get("allow_pickle")
            assert isinstance(value, ast.Constant) and value.value is False, (
                f"{path.name}:{call.lineno}: np.load without allow_pickle=False"
            )
        assert not name.endswith("read_pickle"), f"{path.name}:{call.lineno} calls {name}"


def test_runtime_folder_never_imports_torch() -> None:
    # The runtime is what a device runs: torch belongs to export/ (the exporters, the GPU bench).
    for path in sorted((REPO / "runtime").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            assert not any(m.split(".")[0] == "torch" for m in mods), f"{path.name}:{node.lineno} imports torch"
