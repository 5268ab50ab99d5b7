"""Building one TensorRT engine: the optimisation profiles of a graph's inputs, the plan and timing
cache names, and the build itself (strongly typed, or weakly typed INT8 on TensorRT 10.x).

No torch is imported here: the target device may only have the runtime installed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.engines.device_key import DeviceKey
from anomalygpt_edge.engines.manifest import GraphEntry

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


def _parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path, weak_int8: bool) -> tuple[Any, Any]:
    """The network parsed from ``onnx_path`` and its parser (which owns the weights until the build)."""
    major = int(trt.__version__.split(".")[0])
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
    return network, parser


def _set_int8(
    trt: Any,
    builder: Any,
    config: Any,
    profiles: Mapping[str, ProfileShape],
    calibrator: Any,
    calibration_shapes: Mapping[str, tuple[int, ...]] | None,
) -> None:
    """Weakly typed INT8 (FP16 fallback) and, with a calibrator, its fixed-shape calibration profile."""
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

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if calibrator is not None and not weak_int8:
        raise BuildError("an INT8 calibrator needs a weakly typed INT8 build (weak_int8=True)")
    network, _parser = _parse_network(trt, builder, logger, onnx_path, weak_int8)
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
        _set_int8(trt, builder, config, profiles, calibrator, calibration_shapes)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    atomic_write_bytes(plan_path, bytes(memoryview(serialized)))
    atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return seconds
