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
import contextlib
import datetime as dt
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalygpt_edge.atomic_files import atomic_write_bytes, sha256_file
from anomalygpt_edge.engines.device_key import (
    DeviceKey,
    read_engine_records,
    write_engine_record,
)
from anomalygpt_edge.engines.manifest import GraphEntry, Manifest

BATCH_AXIS = "batch"
BANK_AXIS = "bank"
PRECISIONS = ("fp16", "int8")
INT8_METHODS = ("auto", "calibrator", "qdq")
#: The encoder with INT8 Q/DQ nodes, written beside the bundle's graphs by ``--int8-method qdq``.
QDQ_ENCODER = "encoder.int8.qdq.onnx"
DEFAULT_BUNDLE = Path(os.environ.get("ANOMALYGPT_EDGE_BUNDLE", "/var/lib/anomalygpt-edge/bundle"))
#: Golden images a bank is built from at most / typically (the bank's profile max / opt).
DEFAULT_MAX_SHOTS = 32
DEFAULT_OPT_SHOTS = 4


class BuildError(RuntimeError):
    """An engine could not be built; the message says which graph and why."""


def log(message: str) -> None:
    """Progress line on stderr (stdout keeps the summary and the INT8 report)."""
    print(f"[engines] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ProfileShape:
    """One input's optimisation-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> list[list[int]]:
        return [list(self.min), list(self.opt), list(self.max)]


def _patches_for_bank(entry: GraphEntry, bank_name: str) -> int:
    """Patches per golden image for a bank input: axis 1 of the query input of the same layer.

    The matcher names its inputs ``q_<l>`` (B, N, C) and ``bank_<l>`` (M, C); a bank of k images
    holds k*N rows, so N turns a number of golden images into a bank length.
    """
    suffix = bank_name.split("_", 1)[1] if "_" in bank_name else ""
    for spec in entry.inputs:
        if spec.name == f"q_{suffix}" and len(spec.shape) == 3 and isinstance(spec.shape[1], int):
            return int(spec.shape[1])
    raise BuildError(f"graph {entry.file}: cannot tell patches per image for '{bank_name}' (no matching q_{suffix})")


def profile_shapes(
    entry: GraphEntry,
    max_batch: int = 8,
    opt_batch: int = 1,
    max_shots: int = DEFAULT_MAX_SHOTS,
    opt_shots: int = DEFAULT_OPT_SHOTS,
) -> dict[str, ProfileShape]:
    """min/opt/max shapes of every input of ``entry`` for one optimisation profile.

    Fixed axes are pinned; ``batch`` spans ``1..max_batch`` around ``opt_batch``; ``bank`` spans one
    patch up to ``max_shots`` images of patches around ``opt_shots`` images. Any other named axis
    is an error, so a new dynamic axis gets a deliberate range rather than a silent guess.
    """
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise BuildError(f"need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    if max_shots < 1 or opt_shots < 1:
        raise BuildError(f"need at least 1 golden image in the bank profile (opt {opt_shots}, max {max_shots})")
    opt_shots = min(opt_shots, max_shots)
    shapes: dict[str, ProfileShape] = {}
    for spec in entry.inputs:
        axes: list[tuple[int, int, int]] = []  # (min, opt, max) per axis
        for axis in spec.shape:
            if isinstance(axis, int):
                axes.append((axis, axis, axis))
            elif axis == BATCH_AXIS:
                axes.append((1, opt_batch, max_batch))
            elif axis == BANK_AXIS:
                n = _patches_for_bank(entry, spec.name)
                axes.append((1, n * opt_shots, n * max_shots))
            else:
                raise BuildError(
                    f"graph {entry.file}: input '{spec.name}' has dynamic axis '{axis}' with no profile rule "
                    f"(known: {BATCH_AXIS}, {BANK_AXIS})"
                )
        lo, opt, hi = (tuple(a[i] for a in axes) for i in range(3))
        shapes[spec.name] = ProfileShape(lo, opt, hi)
    return shapes


def plan_name(graph: str, precision: str) -> str:
    """File name of a built engine: ``<graph>.<precision>.plan``."""
    return f"{graph}.{precision}.plan"


def timing_cache_name(key: DeviceKey) -> str:
    """Timing caches are per TensorRT version and GPU; the name says which, so a swap never mixes them."""
    gpu = "".join(c if c.isalnum() else "-" for c in key.gpu_name).strip("-").lower() or "gpu"
    return f"timing-cache.trt{key.tensorrt_version}.sm{key.compute_capability}.{gpu}.bin"


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


def _progress_monitor(trt: Any) -> Any:
    """An ``IProgressMonitor`` that logs phases (TensorRT 10+); ``None`` where the API is absent."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from its own threads
            self._depth: dict[str, int] = {}
            self._steps: dict[str, int] = {}
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name], self._steps[phase_name] = depth, num_steps
                if depth <= 1:
                    log(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                now = time.monotonic()
                if self._depth.get(phase_name, 0) <= 1 and now - self._last > 10.0:
                    self._last = now
                    log(f"  {phase_name}: {step + 1}/{self._steps.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._depth.pop(phase_name, None)

    return _Monitor()


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    profiles: Mapping[str, ProfileShape],
    timing_cache: Path,
    workspace_gb: float = 1.0,
    weak_int8: bool = False,
    calibrator: Any = None,
    calibration_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> float:
    """Build one engine with TensorRT and write it atomically; returns the build time in seconds.

    Default: strongly typed, precision is what the ONNX graph declares (FP16 variant, or a Q/DQ
    graph on TensorRT 11). ``weak_int8`` (TensorRT 10.x only): weakly typed with the INT8 and FP16
    flags, for a Q/DQ graph whose other layers should run FP16, or with ``calibrator`` for
    implicit (calibrated) INT8.
    """
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if calibrator is not None and not weak_int8:
        raise BuildError("an INT8 calibrator needs a weakly typed INT8 build (weak_int8=True)")
    if weak_int8:
        if major >= 11:
            raise BuildError(
                f"TensorRT {trt.__version__} builds strongly typed networks only (no INT8 flag, no "
                "calibrators); use --int8-method qdq"
            )
        flags = 0
    else:
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = 1 << int(strongly) if strongly is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so ONNX external-data files beside the graph are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, shape in profiles.items():
        profile.set_shape(name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    if weak_int8:
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot take fall back to FP16, not FP32
    if calibrator is not None:
        config.int8_calibrator = calibrator
        # With dynamic shapes the calibrator runs at the calibration profile's shapes: one fixed
        # shape equal to the calibration batch.
        calib = builder.create_optimization_profile()
        for name, shape in profiles.items():
            fixed = tuple((calibration_shapes or {}).get(name, shape.opt))
            calib.set_shape(name, fixed, fixed, fixed)
        config.set_calibration_profile(calib)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    atomic_write_bytes(plan_path, bytes(memoryview(serialized)))
    atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return seconds


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


def _int8_encoder(
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


def _int8_accuracy(bundle: Any, fp16_plan: Path, int8_plan: Path, calib_images: list, held_paths: list) -> str:
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
    fp16.close(), quant.close()
    return "\n".join(reports)


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


def _calibration_identity(args: argparse.Namespace, tensorrt_version: str) -> dict[str, str]:
    """What an INT8 engine was calibrated from; a change means recalibrating and rebuilding."""
    from anomalygpt_edge.calibration import int8

    calib, _held = int8.split_holdout(int8.list_images(args.calib_images))
    return {
        "images_sha256": int8.images_digest(calib),
        "method": int8_method(getattr(args, "int8_method", "auto"), tensorrt_version),
    }


def _build_all(args: argparse.Namespace) -> int:
    import tensorrt as trt

    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.engines.tensorrt_backend import current_key

    bundle = EngineBundle.open(args.bundle)  # every graph's sha256 checked before building on it
    key = current_key(bundle.sha256)
    log(f"device: {key.describe()}; bundle {bundle.path}")
    calibration = _calibration_identity(args, trt.__version__) if args.precision == "int8" else None
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
            plan, seconds, extras, (calib_images, held) = _int8_encoder(args, bundle, key, profiles, cache)
            report = _int8_accuracy(bundle, fp16_plan, plan, calib_images, held)
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
