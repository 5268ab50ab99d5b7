"""TensorRT backend (``tensorrt``): runs the ``.plan`` engines built on this device by
``anomalygpt-edge export engines``. TensorRT + cuda-python only; no torch.

Written against the documented TensorRT 10/11 Python API (name-based I/O tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and cuda-python's runtime API
(``cudart``). Neither can be installed on CI, so this module imports without them and only the
pure parts (profile checks, dtype mapping) are tested there; see engines/TENSORRT.md.

How a call runs: inputs are copied into pinned host buffers, then (on one non-blocking stream)
host-to-device copies, ``execute_async_v3`` and device-to-host copies are queued and the stream is
synchronised once. Host and device buffers are kept per tensor across calls and only grown (never
shrunk) when a larger shape arrives, so steady-state inference allocates nothing. For a batch-1
call whose shapes repeat (the line inspecting one part at a time, a fixed memory bank), the whole
sequence is captured once into a CUDA graph and replayed, which removes the per-kernel launch cost.

The bundle hands this backend a graph's ``.onnx`` path; the engine built from that graph is found
through ``engines.json`` beside the manifest, and refused when its recorded key (GPU, compute
capability, TensorRT version, bundle sha256) does not match this device.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from anomalygpt_edge.atomic_files import sha256_bytes, sha256_file
from anomalygpt_edge.engines.base import DTYPES, BackendOptions, Engine, EngineError, TensorSpec, register_backend
from anomalygpt_edge.engines.device_key import (
    DeviceKey,
    EngineRecordError,
    check_key,
    normalise_gpu_name,
    read_engine_records,
    record_for,
)
from anomalygpt_edge.engines.manifest import Manifest, ManifestError, read_manifest

try:  # cuda-python >= 12.6 moved the runtime bindings; older releases have cuda.cudart
    from cuda.bindings import runtime as _cuda_runtime
except ImportError:
    try:
        from cuda import cudart as _cuda_runtime
    except ImportError:
        _cuda_runtime = None

#: cuda-python's runtime API, or None without cuda-python. Bound by assignment, not import, so that
#: it is part of this module's interface: calibration/int8.py allocates its calibration buffer with it.
cudart = _cuda_runtime

#: Every tensor's (name, shape), sorted: a captured CUDA graph is valid for exactly one of these.
_ShapeSignature = tuple[tuple[str, tuple[int, ...]], ...]

#: Why TensorRT is missing, in the words tests and ``why_not`` use.
TENSORRT_MISSING = "tensorrt is not installed (TensorRT comes from JetPack or NVIDIA's index)"


class TensorRTOptions(BackendOptions):
    """``tensorrt``: the engines built on this device by ``anomalygpt-edge export engines``."""

    type: Literal["tensorrt"] = "tensorrt"
    # Which GPU runs the engines; an engine built for another GPU model is refused by its key.
    device_id: Annotated[int, Field(ge=0, le=63, strict=True)] = 0
    # Capture batch-1 runs into a CUDA graph and replay it (saves the per-kernel launch cost).
    cuda_graph: Annotated[bool, Field(strict=True)] = True
    # Check each plan's size and sha256 against engines.json before loading it (reads the whole plan).
    verify_plan: Annotated[bool, Field(strict=True)] = True


def _tensorrt() -> Any:
    """Import TensorRT on first use: it takes a second or more on a Jetson, and most runs never need it."""
    import tensorrt as trt

    return trt


def cuda_call(result: Any) -> Any:
    """Unwrap a cuda-python call: ``(err, value...)`` -> value(s); raise :class:`EngineError` on error."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    ok = err == cudart.cudaError_t.cudaSuccess if cudart is not None else int(err) == 0
    if not ok:
        name = cudart.cudaGetErrorName(err)[1] if cudart is not None else str(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise EngineError(f"CUDA call failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def probe_device(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability ``"major.minor"``) of CUDA device ``device``."""
    if cudart is None:
        raise EngineError("cuda-python is not installed (pip install cuda-python)")
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    return normalise_gpu_name(props.name), f"{props.major}.{props.minor}"


def current_key(bundle_sha256: str, device: int = 0) -> DeviceKey:
    """This machine's engine key for a bundle: the GPU, its compute capability, TensorRT's version."""
    name, cc = probe_device(device)
    return DeviceKey(name, cc, _tensorrt().__version__, bundle_sha256)


def check_profile_shape(name: str, shape: Sequence[int], profile: Sequence[Sequence[int]]) -> None:
    """Refuse a shape outside the engine's optimisation profile ``(min, opt, max)``, naming the axis.

    TensorRT would reject it too, but with a terse log line; this says which flag rebuilds it.
    """
    lo, _opt, hi = (tuple(int(v) for v in p) for p in profile)
    if len(shape) != len(lo):
        raise EngineError(f"input '{name}' has rank {len(shape)}, the engine expects rank {len(lo)}")
    for axis, (v, a, b) in enumerate(zip(shape, lo, hi, strict=True)):
        if not a <= v <= b:
            hint = "--max-shots" if name.startswith("bank") else "--max-batch"
            raise EngineError(
                f"input '{name}' axis {axis} is {v}, outside the engine's profile [{a}, {b}]; rebuild with "
                f"`anomalygpt-edge export engines {hint} N` for larger inputs"
            )


def graph_for_file(manifest: Manifest, file: str) -> str:
    """Name of the graph whose FP32 or FP16 ONNX file (or built plan) is ``file``."""
    for name, g in manifest.graphs.items():
        if file in (g.file, g.fp16_file):
            return name
    stem = file.split(".", 1)[0]
    if file.endswith(".plan") and stem in manifest.graphs:
        return stem
    raise EngineError(f"{file} is not a graph of this bundle ({', '.join(sorted(manifest.graphs))})")


class _HostDeviceBuffer:
    """One tensor's pinned host buffer and device buffer, grown on demand and reused across calls."""

    def __init__(self) -> None:
        self.capacity = 0
        self.host_ptr = 0
        self.device_ptr = 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; returns True when the addresses changed (captured graphs go stale)."""
        if nbytes <= self.capacity:
            return False
        self.free()
        # Grow by 1.5x so a bank that grows one image at a time does not reallocate every call.
        size = max(nbytes, int(self.capacity * 1.5), 256)
        self.host_ptr = cuda_call(cudart.cudaMallocHost(size))
        self.device_ptr = cuda_call(cudart.cudaMalloc(size))
        self.capacity = size
        return True

    def host_view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy array over the pinned host memory (no copy)."""
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = (ctypes.c_uint8 * max(count, 1)).from_address(int(self.host_ptr))
        return np.frombuffer(memoryview(raw), dtype=np.uint8, count=count).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.capacity and cudart is not None:
            cudart.cudaFreeHost(self.host_ptr)
            cudart.cudaFree(self.device_ptr)
        self.capacity = 0
        self.host_ptr = self.device_ptr = 0


class PlanRunner:
    """A deserialised TensorRT engine with its context, stream, buffers and batch-1 CUDA graph."""

    def __init__(self, plan: Path, cuda_graph: bool = True, batch_inputs: Sequence[str] | None = None, device: int = 0):
        """Deserialise ``plan`` on CUDA device ``device``. ``batch_inputs``: inputs whose axis 0 is the batch
        (default: every input with a dynamic axis 0 except ``bank*``); calls with batch 1 on all of them
        use the CUDA graph.
        """
        trt = _tensorrt()
        self.plan = Path(plan)
        self.device = device
        # The current device is per host thread: set here for the engine, stream and buffers made
        # now, and again by each run (the inspection workers are other threads).
        cuda_call(cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT could not deserialise {self.plan} (built by another TensorRT version or for "
                f"another GPU?); rebuild with `anomalygpt-edge export engines`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profiles = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.input_names}
        if batch_inputs is None:
            batch_inputs = [
                n
                for n in self.input_names
                if int(self.profiles[n][0][0]) != int(self.profiles[n][2][0]) and not n.startswith("bank")
            ]
        self.batch_inputs = list(batch_inputs)
        self.stream = cuda_call(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.buffers = {n: _HostDeviceBuffer() for n in names}
        self.use_cuda_graph = cuda_graph
        self._graph_exec: Any = None
        self._graph: Any = None
        self._graph_signature: _ShapeSignature | None = None
        self._last_shapes: dict[str, tuple[int, ...]] = {}
        self.capture_error: str | None = None
        self._lock = threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on ``feeds`` (cast to the engine's I/O types); outputs are fresh arrays.

        Serialised by a lock: the bundle shares one engine between cameras, and the context,
        buffers and captured graph are single-use at a time.
        """
        with self._lock:
            cuda_call(cudart.cudaSetDevice(self.device))
            return self._run_locked(feeds)

    def _run_locked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(int(d) for d in feeds[n].shape) for n in self.input_names}
        for name in self.input_names:
            check_profile_shape(name, shapes[name], self.profiles[name])
        if shapes != self._last_shapes:
            for name in self.input_names:
                if not self.context.set_input_shape(name, shapes[name]):
                    raise EngineError(f"{self.plan.name}: TensorRT refused shape {shapes[name]} for '{name}'")
            self._last_shapes = shapes
        out_shapes = {n: tuple(int(d) for d in self.context.get_tensor_shape(n)) for n in self.output_names}
        all_shapes = {**shapes, **out_shapes}
        moved = False
        for name, shape in all_shapes.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
            moved |= self.buffers[name].ensure(nbytes)
        if moved:
            self._drop_graph()  # a captured graph holds the old addresses, freed just now
        for name in self.input_names:
            np.copyto(self.buffers[name].host_view(shapes[name], self.dtypes[name]), feeds[name], casting="unsafe")
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, int(buf.device_ptr))

        batch_one = all(shapes[n][0] == 1 for n in self.batch_inputs)
        signature = tuple(sorted(all_shapes.items()))
        if self.use_cuda_graph and batch_one and (self._graph_exec is None or signature != self._graph_signature):
            try:
                self._capture(all_shapes, signature)
            except EngineError as exc:
                # Some engines cannot be captured (data-dependent shapes, some plugins): run them
                # eagerly from now on rather than fail the inspection.
                self.use_cuda_graph = False
                self.capture_error = str(exc)
        if self.use_cuda_graph and batch_one:
            cuda_call(cudart.cudaGraphLaunch(self._graph_exec, self.stream))
        else:
            self._enqueue(all_shapes)
        cuda_call(cudart.cudaStreamSynchronize(self.stream))
        return {n: self.buffers[n].host_view(out_shapes[n], self.dtypes[n]).copy() for n in self.output_names}

    def _enqueue(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.input_names:
            buf, n = (
                self.buffers[name],
                int(np.prod(shapes[name], dtype=np.int64)) * self.dtypes[name].itemsize,
            )
            cuda_call(cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, n, h2d, self.stream))
        # The cudaStream_t object itself, as NVIDIA's samples pass it (it converts to the handle).
        if not self.context.execute_async_v3(self.stream):
            raise EngineError(f"{self.plan.name}: TensorRT execution failed (see the TensorRT log above)")
        for name in self.output_names:
            buf, n = (
                self.buffers[name],
                int(np.prod(shapes[name], dtype=np.int64)) * self.dtypes[name].itemsize,
            )
            cuda_call(cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, n, d2h, self.stream))

    def _capture(self, shapes: Mapping[str, tuple[int, ...]], signature: _ShapeSignature) -> None:
        """Capture copies + inference for these shapes and addresses into a CUDA graph."""
        self._drop_graph()
        # TensorRT defers some shape-dependent setup to the first enqueue after a shape change;
        # one uncaptured run flushes it, as the TensorRT docs require before stream capture.
        self._enqueue(shapes)
        cuda_call(cudart.cudaStreamSynchronize(self.stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(cudart.cudaStreamBeginCapture(self.stream, mode))
        try:
            self._enqueue(shapes)
        finally:
            graph = cuda_call(cudart.cudaStreamEndCapture(self.stream))
        self._graph = graph
        self._graph_exec = cuda_call(cudart.cudaGraphInstantiate(graph, 0))
        self._graph_signature = signature

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
            cudart.cudaGraphDestroy(self._graph)
        self._graph_exec = self._graph = self._graph_signature = None

    def close(self) -> None:
        """Free the graph, buffers and stream (also done when the runner is garbage-collected)."""
        if cudart is None:
            return
        cudart.cudaSetDevice(self.device)
        self._drop_graph()
        for buf in self.buffers.values():
            buf.free()
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        # At interpreter shutdown cudart may already be gone; nothing useful to report then.
        with contextlib.suppress(Exception):
            self.close()


@register_backend("tensorrt", options=TensorRTOptions)
class TensorRTEngine(Engine):
    """A bundle graph run by the TensorRT engine built for it on this device.

    ``path`` is the graph's ``.onnx`` file in the bundle (as :meth:`EngineBundle.engine` passes it)
    or a ``.plan`` beside it. Inputs are cast to the engine's types and outputs back to the types
    the caller asked for, so FP32 callers can run an FP16 or INT8 engine unchanged.
    """

    options: TensorRTOptions

    def __init__(
        self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], options: BackendOptions | None = None
    ):
        super().__init__(path, inputs, outputs, options)
        device = self.options.device_id
        bundle_dir = self.path.parent
        try:
            manifest, raw = read_manifest(bundle_dir)
        except ManifestError as exc:
            raise EngineError(str(exc)) from exc
        graph = graph_for_file(manifest, self.path.name)
        self.record = record_for(read_engine_records(bundle_dir, manifest.engines), graph, bundle_dir)
        plan = bundle_dir / self.record["plan"]
        recorded = DeviceKey.from_json(self.record["key"])
        check_key(plan.name, recorded, current_key(sha256_bytes(raw), device), bundle_dir)
        if not plan.is_file():
            raise EngineRecordError(f"{plan} is recorded in engines.json but missing; rebuild the engines")
        if self.options.verify_plan and (
            plan.stat().st_size != int(self.record["plan_size"]) or sha256_file(plan) != self.record["plan_sha256"]
        ):
            raise EngineRecordError(f"{plan} does not match its record in engines.json (truncated or replaced)")
        batch = [s.name for s in inputs if s.shape and s.shape[0] == "batch"]
        self.runner = PlanRunner(plan, cuda_graph=self.options.cuda_graph, batch_inputs=batch, device=device)
        want_in, want_out = {s.name for s in inputs}, {s.name for s in outputs}
        if set(self.runner.input_names) != want_in or not want_out <= set(self.runner.output_names):
            raise EngineError(
                f"{plan.name} does not match the manifest: engine inputs {sorted(self.runner.input_names)} "
                f"outputs {sorted(self.runner.output_names)}, manifest {sorted(want_in)} / {sorted(want_out)}"
            )
        self.precision = str(self.record.get("precision", "?"))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.runner.run(feeds)
        return {s.name: values[s.name].astype(DTYPES[s.dtype], copy=False) for s in self.outputs}

    def describe(self) -> str:
        return f"tensorrt {self.precision} ({self.record['key'].get('gpu_name', '?')}, {self.runner.plan.name})"

    @classmethod
    def why_not(cls) -> str | None:
        try:
            found = importlib.util.find_spec("tensorrt") is not None
        except (ImportError, ValueError):  # a broken install reads as absent, never as a crash
            found = False
        if not found:
            return TENSORRT_MISSING
        if cudart is None:
            return "cuda-python is not installed (pip install cuda-python)"
        try:
            count = cuda_call(cudart.cudaGetDeviceCount())
        except EngineError as exc:
            return f"no usable CUDA device: {exc}"
        return None if count else "no CUDA device is visible"
