"""``anomalygpt-edge export int8``: add the encoder's CPU INT8 variant (``encoder.int8.onnx``) to a bundle.

Static QDQ quantization for ONNX Runtime's CPU provider (``calibration/ort_int8.py``), calibrated on
golden images preprocessed exactly as the runtime does; every fifth image is held out and encoded
with both graphs to print how far INT8 moves the features and image scores. The graph is recorded
in the manifest's optional ``int8`` record and ``files`` (so ``EngineBundle.open`` verifies its
sha256); the bundle's FP32 identity does not change, so recipes enrolled at FP32 stay valid.
A line selects it with ``engines.precision: int8``; ``inspect``/``evaluate``/``bench vision`` with
``--precision int8``.

Light at import (argument parsing only): ONNX Runtime and OpenCV load when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.defaults import DEFAULT_BUNDLE

#: The INT8 encoder's file name inside the bundle.
INT8_ENCODER = "encoder.int8.onnx"
#: ``--calib-method`` choices (kept here so ``--help`` needs no ONNX Runtime; checked against ort_int8's).
CALIB_METHODS = ("minmax", "percentile", "entropy")


def add_export_target(targets: argparse._SubParsersAction) -> None:
    """Add the ``int8`` target to ``anomalygpt-edge export``."""
    e = targets.add_parser(
        "int8",
        help="add the encoder's static INT8 variant for ONNX Runtime's CPU provider to a bundle",
        description="Quantize the bundle's encoder to INT8 (QDQ, per-channel weights, U8S8) calibrated on golden "
        "images, check it against FP32 on held-out images, and record encoder.int8.onnx in the manifest. Select it "
        "with engines.precision: int8 (or --precision int8); it needs a CPU with VNNI (x86) or dot-product (ARM) "
        "instructions.",
    )
    e.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"bundle folder (default {DEFAULT_BUNDLE})")
    e.add_argument(
        "--calib-images", type=Path, required=True, help="folder of golden images (every 5th held out to check)"
    )
    e.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax", help="activation ranges (default minmax)")
    e.add_argument("--force", action="store_true", help="re-quantize when the bundle already has an int8 variant")
    e.set_defaults(handler="anomalygpt_edge.export.int8_export:run")


def _quantize(bundle: Any, calib_dir: Path, method: str) -> tuple[dict[str, Any], str]:
    """Calibrate, write the INT8 graph under a temporary name, check it; (calibration record, report)."""
    from anomalygpt_edge.calibration import int8, ort_int8

    manifest = bundle.manifest
    entry = manifest.graphs["encoder"]
    if entry.external_data:
        raise int8.CalibrationError("the encoder keeps its weights in external data; export int8 handles single files")
    calib_paths, held_paths = int8.split_holdout(int8.list_images(calib_dir))
    print(f"int8: {len(calib_paths)} calibration image(s), {len(held_paths)} held out", file=sys.stderr)
    calib = int8.load_preprocessed(calib_paths, manifest.preprocess)
    held = int8.load_preprocessed(held_paths, manifest.preprocess)
    src, tmp = bundle.path / entry.file, bundle.path / (INT8_ENCODER + ".tmp")
    try:
        settings = ort_int8.quantize_cpu(src, tmp, calib, entry.inputs[0].name, method)
        reports = ort_int8.compare_held_out(
            src,
            tmp,
            calib[:16],
            held,
            entry.inputs[0].name,
            [layer.name for layer in manifest.patch_layers],
            str(manifest.matching.get("metric", "cosine")),
        )
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written graph must not look like a result
        raise
    names = [p.name for p in held_paths]
    hint = "engines.precision fp32"
    text = "\n".join(f"[{k}] " + int8.format_report(r, names, "FP32", hint) for k, r in reports.items())
    record = {**settings, "images_sha256": int8.images_digest(calib_paths), "held_out": len(held_paths)}
    os.replace(tmp, bundle.path / INT8_ENCODER)
    return record, text


def _record(bundle: Any, calibration: dict[str, Any]) -> Any:
    """The manifest with the ``int8`` record and the INT8 graph's ``files`` entry."""
    from anomalygpt_edge.atomic_files import sha256_file
    from anomalygpt_edge.calibration import ort_int8
    from anomalygpt_edge.engines.manifest import INT8_RECORD_VERSION, FileEntry, Int8Variant

    path = bundle.path / INT8_ENCODER
    variant = Int8Variant(
        version=INT8_RECORD_VERSION,
        file=INT8_ENCODER,
        format="qdq",
        activation_type=ort_int8.ACTIVATION_TYPE,
        weight_type=ort_int8.WEIGHT_TYPE,
        per_channel=True,
        calibration=calibration,
    )
    base = bundle.manifest.without_int8()
    files = {**base.files, INT8_ENCODER: FileEntry(INT8_ENCODER, sha256_file(path), path.stat().st_size)}
    return replace(base, int8=variant, files=files)


def _write_manifest(bundle: Any, manifest: Any) -> str:
    """Validate and atomically replace ``manifest.json``; returns the bundle's FP32 identity afterwards."""
    from anomalygpt_edge.atomic_files import atomic_write_bytes
    from anomalygpt_edge.engines.bundle import bundle_identity
    from anomalygpt_edge.engines.manifest import MANIFEST_NAME, parse_manifest

    text = manifest.dumps()
    parse_manifest(json.loads(text))  # what we write must be what the runtime reads
    path = bundle.path / MANIFEST_NAME
    mode = path.stat().st_mode & 0o777
    atomic_write_bytes(path, text.encode())
    path.chmod(mode)  # the temporary file is private; the bundle stays readable as exported
    return bundle_identity(manifest, text.encode(), "fp32")


def _summary(bundle: Any, fp32_identity: str) -> list[str]:
    """What was written, the bundle identities and whether this CPU would run the variant."""
    from anomalygpt_edge.engines.cpu_int8 import int8_flags, why_not_int8

    fp32_mb = (bundle.path / bundle.manifest.graphs["encoder"].file).stat().st_size / 2**20
    int8_mb = (bundle.path / INT8_ENCODER).stat().st_size / 2**20
    lines = [f"wrote {bundle.path / INT8_ENCODER} ({int8_mb:.1f} MB; FP32 encoder {fp32_mb:.1f} MB)"]
    if fp32_identity != bundle.sha256:
        lines.append(
            f"warning: the bundle's FP32 identity changed ({bundle.sha256[:12]} -> {fp32_identity[:12]}: its manifest "
            "was not in the canonical form); re-enroll recipes made with it"
        )
    why = why_not_int8()
    lines.append(why if why else f"this CPU runs it fast: {', '.join(int8_flags())}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Entry point of ``export int8``."""
    from anomalygpt_edge.calibration.int8 import CalibrationError
    from anomalygpt_edge.engines.bundle import BundleError, EngineBundle
    from anomalygpt_edge.engines.preprocess import ImageError

    try:
        bundle = EngineBundle.open(args.bundle)  # every file's sha256 checked before building on it
        if bundle.manifest.int8 is not None and not args.force:
            done = bundle.manifest.int8
            print(f"{args.bundle}: already has {done.file} ({done.calibration.get('images')} images); --force redoes")
            return 0
        calibration, report = _quantize(bundle, args.calib_images, args.calib_method)
        fp32_identity = _write_manifest(bundle, _record(bundle, {**calibration}))
    except (BundleError, CalibrationError, ImageError) as exc:
        print(f"error: export int8: {exc}", file=sys.stderr)
        return 2
    print(report)
    print("\n".join(_summary(bundle, fp32_identity)))
    return 0
