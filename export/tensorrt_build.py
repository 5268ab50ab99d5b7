"""``anomalygpt-edge export engines``: build TensorRT ``.plan`` files from a bundle, on the target device.

Engines are tied to the GPU model and TensorRT version, so they are built where they run (a
Jetson at first boot, a workstation after a driver/TensorRT upgrade) and recorded in
``engines.json`` with their :class:`~anomalygpt_edge.engines.device_key.DeviceKey`. Rebuilding is
skipped for graphs whose record still matches, so the boot-time oneshot is cheap when nothing
changed.

* **Precision** comes from the graph (strongly typed networks): the FP16 ONNX variants carry FP16
  weights and activations with FP32 kept for the ops in ``export.onnx_tools.FP32_OPS``. TensorRT 11
  builds strongly typed only; on 10.x the ``STRONGLY_TYPED`` creation flag is passed.
* **INT8** (``--precision int8 --calib-images DIR``): only the encoder; other graphs stay FP16.
  Two ways, both entropy calibration on golden images (``calibration/int8.py``), chosen by
  ``--int8-method``: ``calibrator`` (TensorRT 10.x: weakly typed build of the FP32 graph with the
  INT8+FP16 flags and ``IInt8EntropyCalibrator2``) or ``qdq`` (Q/DQ nodes inserted into the ONNX
  by ONNX Runtime's quantizer, then a build that reads INT8 from the graph: the only way on
  TensorRT 11, which has no calibrators). ``auto`` picks the calibrator on 10.x, Q/DQ on 11.
* **Profiles**: one optimisation profile per graph; ``batch`` axes span 1..``--max-batch`` with
  batch 1 as the optimum (one part at a time on a line), the bank matcher's ``bank`` axes span 1 to
  ``--max-shots`` golden images worth of patches.
* A persisted **timing cache** (per TensorRT version and GPU) makes rebuilds and the other graphs'
  builds much faster; a modest default **workspace** (1 GB) keeps Jetsons from running out of memory.

No torch is imported here: the target device may only have the runtime installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.engines.device_key import (
    DeviceKey,
    read_engine_records,
    write_engine_record,
)
from anomalygpt_edge.engines.manifest import GraphEntry

# One engine's build and the INT8 path are modules of their own; the command line and the tests
# import these names from here.
from anomalygpt_edge.export.tensorrt_int8 import (
    build_int8_encoder,
    calibration_identity,
    int8_accuracy_report,
    int8_method,
)
from anomalygpt_edge.export.tensorrt_plan import (
    BANK_AXIS,
    BATCH_AXIS,
    DEFAULT_BUNDLE,
    DEFAULT_MAX_SHOTS,
    DEFAULT_OPT_SHOTS,
    INT8_METHODS,
    PRECISIONS,
    QDQ_ENCODER,
    BuildError,
    ProfileShape,
    build_plan,
    log,
    plan_name,
    profile_shapes,
    timing_cache_name,
)

__all__ = [
    "BANK_AXIS", "BATCH_AXIS", "DEFAULT_BUNDLE", "DEFAULT_MAX_SHOTS", "DEFAULT_OPT_SHOTS", "INT8_METHODS", "PRECISIONS",
    "QDQ_ENCODER", "BuildError", "ProfileShape", "build_plan", "int8_method", "needs_rebuild", "plan_name",
    "profile_shapes", "run", "timing_cache_name",
]  # fmt: skip


def needs_rebuild(
    record: Mapping[str, Any] | None,
    key: DeviceKey,
    precision: str,
    profiles: Mapping[str, ProfileShape],
    bundle_dir: Path,
    calibration: Mapping[str, str] | None = None,
) -> str | None:
    """Why ``record`` cannot be reused for this build (``None``: the engine is up to date).

    ``calibration`` (INT8 builds): the images digest and method the engine must have been
    calibrated with.
    """
    if record is None:
        return "not built yet"
    try:
        recorded = DeviceKey.from_json(record["key"])
    except Exception:
        return "record has no valid key"
    if recorded != key:
        differs = [
            f
            for f in ("gpu_name", "compute_capability", "tensorrt_version", "bundle_sha256")
            if getattr(recorded, f) != getattr(key, f)
        ]
        return f"built for another {', '.join(differs).replace('_', ' ')}"
    if record.get("precision") != precision:
        return f"precision was {record.get('precision')}, now {precision}"
    if record.get("profiles") != {n: p.to_json() for n, p in profiles.items()}:
        return "optimisation profiles changed"
    if calibration is not None:
        recorded_cal = record.get("calibration", {})
        changed = [k for k, v in calibration.items() if recorded_cal.get(k) != v]
        if changed:
            return f"calibration changed ({', '.join(changed)})"
    plan = Path(bundle_dir) / str(record.get("plan", ""))
    if not plan.is_file() or plan.stat().st_size != record.get("plan_size"):
        return "plan file missing or truncated"
    if sha256_file(plan) != record.get("plan_sha256"):
        return "plan file altered"
    return None


def _record(
    graph: str,
    onnx: str,
    plan: Path,
    precision: str,
    key: DeviceKey,
    profiles: Mapping[str, ProfileShape],
    seconds: float,
    workspace_gb: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "graph": graph,
        "onnx": onnx,
        "plan": plan.name,
        "plan_size": plan.stat().st_size,
        "plan_sha256": sha256_file(plan),
        "precision": precision,
        "key": key.to_json(),
        "profiles": {n: p.to_json() for n, p in profiles.items()},
        "build_seconds": round(seconds, 1),
        "workspace_gb": workspace_gb,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def _source_onnx(entry: GraphEntry, precision: str) -> tuple[str, str]:
    """(ONNX file, precision label) to build from: the FP16 variant, or FP32 when a bundle has none."""
    if precision == "int8":
        return entry.file, "int8"
    if entry.fp16_file:
        return entry.fp16_file, "fp16"
    log(f"{entry.file}: the bundle has no FP16 variant; building FP32 (re-export without --no-fp16 for speed)")
    return entry.file, "fp32"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``export engines``; returns the exit code."""
    from anomalygpt_edge.calibration.int8 import CalibrationError
    from anomalygpt_edge.engines.base import EngineError
    from anomalygpt_edge.engines.tensorrt_backend import TENSORRT_MISSING

    if args.precision not in PRECISIONS:
        raise SystemExit(f"--precision must be one of {PRECISIONS}")
    if args.precision == "int8" and args.calib_images is None:
        raise SystemExit("--precision int8 needs --calib-images DIR (golden images of the part)")
    if not 0.125 <= args.workspace_gb <= 64:
        raise SystemExit(f"--workspace-gb must be between 0.125 and 64, got {args.workspace_gb}")
    if importlib.util.find_spec("tensorrt") is None:
        raise SystemExit(f"export engines: {TENSORRT_MISSING}; see engines/TENSORRT.md")
    try:
        return _build_all(args)
    except (BuildError, CalibrationError, EngineError) as exc:
        # Expected failures (bad bundle, stale records, parser errors): a message, not a traceback.
        raise SystemExit(f"export engines: {exc}") from None


def _build_all(args: argparse.Namespace) -> int:
    import tensorrt as trt

    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.engines.tensorrt_backend import current_key

    bundle = EngineBundle.open(args.bundle)  # every graph's sha256 checked before building on it
    key = current_key(bundle.sha256)
    log(f"device: {key.describe()}; bundle {bundle.path}")
    calibration = calibration_identity(args, trt.__version__) if args.precision == "int8" else None
    if calibration:
        log(f"INT8 method: {calibration['method']}")
    cache = bundle.path / timing_cache_name(key)
    log(f"timing cache: {cache} ({'reused' if cache.is_file() else 'new'})")
    records = read_engine_records(bundle.path)
    summary: list[tuple[str, str, str, str]] = []
    report = ""
    for graph, entry in bundle.manifest.graphs.items():
        profiles = profile_shapes(entry, max_batch=args.max_batch, max_shots=args.max_shots)
        int8_here = args.precision == "int8" and graph == "encoder"
        onnx, precision = _source_onnx(entry, "int8" if int8_here else "fp16")
        reason = needs_rebuild(
            records.get(graph), key, precision, profiles, bundle.path, calibration if int8_here else None
        )
        if reason is None and not args.force:
            log(f"{graph}: up to date ({records[graph]['plan']})")
            summary.append((graph, records[graph]["plan"], precision, "up to date"))
            continue
        log(f"{graph}: building {precision} engine from {onnx} ({reason or 'forced'}) ...")
        if int8_here:
            fp16_onnx, _ = _source_onnx(entry, "fp16")
            fp16_plan = bundle.path / plan_name(graph, "fp16")
            log(f"{graph}: building the FP16 reference engine first (for the INT8 accuracy check)")
            build_plan(bundle.path / fp16_onnx, fp16_plan, profiles, cache, args.workspace_gb)
            plan, seconds, extras, (calib_images, held) = build_int8_encoder(args, bundle, key, profiles, cache)
            report = int8_accuracy_report(bundle, fp16_plan, plan, calib_images, held)
            extras["fp16_plan"] = fp16_plan.name
        else:
            plan = bundle.path / plan_name(graph, precision)
            seconds = build_plan(bundle.path / onnx, plan, profiles, cache, args.workspace_gb)
            extras = {}
        write_engine_record(
            bundle.path,
            graph,
            _record(graph, onnx, plan, precision, key, profiles, seconds, args.workspace_gb, extras),
        )
        log(f"{graph}: wrote {plan.name} ({plan.stat().st_size / 2**20:.1f} MB, {seconds:.0f} s)")
        summary.append((graph, plan.name, precision, f"built in {seconds:.0f} s"))
    rows = [("graph", "engine", "precision", "status"), *summary]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows))
    print(f"engines recorded in {bundle.path / 'engines.json'} for {key.describe()}")
    if report:
        print(report)
    return 0
