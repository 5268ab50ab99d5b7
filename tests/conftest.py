"""Shared fixtures: the embedded default bundle is exported once per test session."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real EfficientNet-Lite0 bundle exported by the product's own exporter."""
    from anomalygpt_edge.export import vision

    out = tmp_path_factory.mktemp("bundles") / "default"
    args = argparse.Namespace(
        source="efficientnet-lite0", out=out, overwrite=False, image_size=224, metric="l2",
        smoothing_sigma=4.0, no_fp16=False, imagebind=None, anomalygpt=None, pandagpt_delta=None,
        random_weights=False,
    )
    assert vision.run(args) == 0
    return out
