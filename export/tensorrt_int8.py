"""INT8 engines of the encoder: ``--int8-method`` resolved, calibration (TensorRT's entropy calibrator
or Q/DQ nodes from ONNX Runtime's quantizer), the build, and the accuracy check against FP16."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalygpt_edge.engines.device_key import DeviceKey
from anomalygpt_edge.engines.manifest import Manifest
from anomalygpt_edge.export.tensorrt_plan import (
    DEFAULT_MAX_SHOTS,
    INT8_METHODS,
    QDQ_ENCODER,
    BuildError,
    ProfileShape,
    build_plan,
    log,
    plan_name,
)


def int8_method(requested: str, tensorrt_version: str) -> str:
    """Resolve ``--int8-method``: ``auto`` is the calibrator on TensorRT 10, Q/DQ on 11 (no calibrators)."""
    major = int(tensorrt_version.split(".")[0])
    if requested == "auto":
        return "calibrator" if major < 11 else "qdq"
    if requested == "calibrator" and major >= 11:
        raise BuildError(f"--int8-method calibrator: TensorRT {tensorrt_version} has no calibrators; use qdq (or auto)")
    if requested not in INT8_METHODS:
        raise BuildError(f"--int8-method must be one of {INT8_METHODS}")
    return requested


def build_int8_encoder(
    args: argparse.Namespace, bundle: Any, key: DeviceKey, profiles: Mapping[str, ProfileShape], cache: Path
) -> tuple[Path, float, dict[str, Any], Any]:
    """Calibrate and build the INT8 encoder; returns (plan, seconds, record extras, accuracy inputs)."""
    from anomalygpt_edge.calibration import int8

    manifest: Manifest = bundle.manifest
    entry = manifest.graphs["encoder"]
    input_name = entry.inputs[0].name
    paths = int8.list_images(args.calib_images)
    calib_paths, held_paths = int8.split_holdout(paths)
    log(f"INT8: {len(calib_paths)} calibration image(s), {len(held_paths)} held out for the accuracy check")
    calib_images = int8.load_preprocessed(calib_paths, manifest.preprocess)
    batch = min(args.max_batch, 8, len(calib_images))
    batches = int8.calibration_batches(calib_images, batch)
    meta = {
        "bundle_sha256": key.bundle_sha256,
        "images_sha256": int8.images_digest(calib_paths),
        "batch_size": batch,
        "tensorrt_version": key.tensorrt_version,
    }
    method = int8_method(getattr(args, "int8_method", "auto"), key.tensorrt_version)
    meta["method"] = method
    plan = bundle.path / plan_name("encoder", "int8")
    if method == "calibrator":
        ccache = int8.CalibrationCache(bundle.path / "encoder.int8.calib")
        log("INT8: calibration cache " + ("reused" if ccache.load(meta) else "will be computed (entropy)"))
        calibrator = int8.make_entropy_calibrator(batches, input_name, ccache, meta)
        shape = (batch, *(int(v) for v in entry.inputs[0].shape[1:]))
        seconds = build_plan(
            bundle.path / entry.file,
            plan,
            profiles,
            cache,
            args.workspace_gb,
            True,
            calibrator,
            {input_name: shape},
        )
        source = entry.file
    else:
        qdq = bundle.path / QDQ_ENCODER
        ccache = int8.CalibrationCache(bundle.path / "encoder.int8.ranges.json")
        log("INT8: inserting Q/DQ nodes (entropy calibration with ONNX Runtime) ...")
        with contextlib.redirect_stdout(sys.stderr):  # the quantizer prints progress to stdout
            reused = int8.quantize_qdq(
                bundle.path / entry.file, qdq, batches, input_name, ccache, meta, bool(entry.external_data)
            )
        log(f"INT8: wrote {qdq.name} (calibration ranges {'reused' if reused else 'computed'})")
        # TensorRT 10: weakly typed so layers outside Q/DQ pairs run FP16; 11: strongly typed only.
        weak = int(key.tensorrt_version.split(".")[0]) < 11
        seconds = build_plan(qdq, plan, profiles, cache, args.workspace_gb, weak)
        source = qdq.name
    extras = {
        "source_onnx": source,
        "calibration": {"images": len(calib_paths), "held_out": len(held_paths), **meta},
    }
    return plan, seconds, extras, (calib_images, held_paths)


def int8_accuracy_report(bundle: Any, fp16_plan: Path, int8_plan: Path, calib_images: list, held_paths: list) -> str:
    """Encode held-out images with both engines and compare scores against an FP16 bank."""
    import numpy as np

    from anomalygpt_edge.calibration import int8
    from anomalygpt_edge.engines.tensorrt_backend import PlanRunner

    manifest: Manifest = bundle.manifest
    name = manifest.graphs["encoder"].inputs[0].name
    metric = str(manifest.matching.get("metric", "cosine"))
    fp16, quant = PlanRunner(fp16_plan, cuda_graph=False), PlanRunner(int8_plan, cuda_graph=False)
    held = int8.load_preprocessed(held_paths, manifest.preprocess)
    reports = []
    for layer in manifest.patch_layers:
        bank = np.concatenate(
            [fp16.run({name: x[None]})[layer.name][0] for x in calib_images[:DEFAULT_MAX_SHOTS]]
        ).astype(np.float32)
        ref = np.stack([fp16.run({name: x[None]})[layer.name][0] for x in held])
        cand = np.stack([quant.run({name: x[None]})[layer.name][0] for x in held])
        report = int8.compare_int8(ref, cand, bank, metric)
        reports.append(f"[{layer.name}] " + int8.format_report(report, [p.name for p in held_paths]))
    fp16.close()
    quant.close()
    return "\n".join(reports)


def calibration_identity(args: argparse.Namespace, tensorrt_version: str) -> dict[str, str]:
    """What an INT8 engine was calibrated from; a change means recalibrating and rebuilding."""
    from anomalygpt_edge.calibration import int8

    calib, _held = int8.split_holdout(int8.list_images(args.calib_images))
    return {
        "images_sha256": int8.images_digest(calib),
        "method": int8_method(getattr(args, "int8_method", "auto"), tensorrt_version),
    }
