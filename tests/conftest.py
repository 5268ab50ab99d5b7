"""Shared fixtures: the embedded default bundle is exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real EfficientNet-Lite0 bundle exported by the product's own exporter, with its defaults."""
    from anomalygpt_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "default"
    assert main(["export", "vision", "--source", "efficientnet-lite0", "--out", str(out)]) == 0
    return out
