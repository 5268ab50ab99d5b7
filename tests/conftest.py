"""Shared fixtures: the embedded default bundle is exported once per test session; a test that
damages a bundle gets its own copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real EfficientNet-Lite0 bundle exported by the product's own exporter, with its defaults."""
    from anomalygpt_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "default"
    assert main(["export", "vision", "--source", "efficientnet-lite0", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def bundle_copy(default_bundle_dir: Path, tmp_path: Path) -> Path:
    """A copy of the default bundle in this test's folder, free to damage or rebuild."""
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir, dst)
    return dst
