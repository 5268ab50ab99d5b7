"""``anomalygpt-edge export engines`` arguments (light: no TensorRT, torch or onnx at import).

Registered through ``export.cli.EXPORT_TARGET_MODULES``; the work is done by
``export/tensorrt_build.py``, imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalygpt_edge.export.tensorrt_build import (
    DEFAULT_BUNDLE,
    DEFAULT_MAX_SHOTS,
    INT8_METHODS,
    PRECISIONS,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_export_target(targets: argparse._SubParsersAction) -> None:
    """Add the ``engines`` target to ``anomalygpt-edge export``."""
    e = targets.add_parser(
        "engines",
        help="build TensorRT engines for this GPU from a bundle (run on the target device; needs tensorrt)",
        description="Build TensorRT .plan files from the bundle's ONNX graphs on this device and record "
        "their keys (GPU, compute capability, TensorRT version, bundle hash) in engines.json. Graphs whose "
        "engine is up to date are skipped. First builds take minutes on a Jetson.",
    )
    e.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"bundle folder (default {DEFAULT_BUNDLE})")
    e.add_argument("--precision", choices=PRECISIONS, default="fp16", help="fp16 (default) or int8 encoder")
    e.add_argument("--calib-images", type=Path, help="golden images for INT8 calibration (20%% held out to check)")
    e.add_argument(
        "--workspace-gb",
        type=float,
        default=1.0,
        help="builder workspace limit, GB (default 1; Jetsons run out above)",
    )
    e.add_argument("--max-batch", type=_positive_int, default=8, help="largest batch the engines accept (default 8)")
    e.add_argument(
        "--max-shots",
        type=_positive_int,
        default=DEFAULT_MAX_SHOTS,
        help=f"golden images a memory bank may hold; sets the bank profile (default {DEFAULT_MAX_SHOTS})",
    )
    e.add_argument(
        "--int8-method",
        choices=INT8_METHODS,
        default="auto",
        help="calibrator (TensorRT 10) or qdq (Q/DQ nodes; TensorRT 10 and 11); auto: by TensorRT version",
    )
    e.add_argument("--force", action="store_true", help="rebuild even when an engine is up to date")
    e.set_defaults(handler="anomalygpt_edge.export.tensorrt_build:run")
