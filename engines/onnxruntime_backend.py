"""ONNX Runtime backends: ``onnxruntime`` (CPU) and ``onnxruntime-cuda`` (CUDA execution provider).

Both read the same ``.onnx`` files. The CUDA variant exists only when onnxruntime-gpu is
installed and reports the CUDA provider; otherwise ``auto`` falls back to the CPU one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from anomalygpt_edge.engines.base import BackendOptions, Engine, EngineError, TensorSpec, register_backend

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a hard dependency; kept for clear errors
    ort = None

#: A CUDA device ordinal: a whole number, 0 the first GPU.
DeviceId = Annotated[int, Field(ge=0, le=63, strict=True)]


class OnnxRuntimeOptions(BackendOptions):
    """``onnxruntime`` (the CPU)."""

    type: Literal["onnxruntime"] = "onnxruntime"
    # Intra-op threads of each session; 0 = the backend's default, every core. In the daemon's config
    # `engines.threads` is the shorthand for this (see runtime/line/config.py, EnginesConfig).
    threads: Annotated[int, Field(ge=0, le=256, strict=True)] = 0


class OnnxRuntimeCudaOptions(BackendOptions):
    """``onnxruntime-cuda`` (onnxruntime-gpu's CUDA execution provider). Its CPU thread pool only runs
    the nodes CUDA does not take, so it keeps the default (every core)."""

    type: Literal["onnxruntime-cuda"] = "onnxruntime-cuda"
    device_id: DeviceId = 0  # which GPU runs the graph


#: A provider as ONNX Runtime takes it: a name, or a name with its provider options.
Provider = str | tuple[str, dict[str, str]]


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Default to every core: a line PC runs one inspection at a time per camera.
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class _OnnxRuntimeSession(Engine):
    """What both ONNX Runtime backends share: one session over the graph, checked against the manifest.

    ``providers`` names the execution providers the backend needs (``why_not`` checks them);
    :meth:`_providers` gives them with their options, :meth:`_threads` the intra-op thread count.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(
        self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], options: BackendOptions | None = None
    ):
        super().__init__(path, inputs, outputs, options)
        if not self.path.is_file():
            raise EngineError(f"graph file {self.path} does not exist")
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=_session_options(self._threads()), providers=self._providers()
            )
        except Exception as exc:  # ORT raises its own exception types; name the file either way
            raise EngineError(f"cannot load graph {self.path}: {exc}") from exc
        self._check_signature()
        self._output_names = [o.name for o in self.outputs]

    def _threads(self) -> int:
        """Intra-op threads (0 = every core)."""
        return 0

    def _providers(self) -> list[Provider]:
        return list(self.providers)

    def _check_signature(self) -> None:
        """The graph's own inputs/outputs must match the manifest, or the bundle is inconsistent."""
        got_in = {i.name for i in self.session.get_inputs()}
        got_out = {o.name for o in self.session.get_outputs()}
        want_in = {s.name for s in self.inputs}
        want_out = {s.name for s in self.outputs}
        if got_in != want_in or not want_out <= got_out:
            raise EngineError(
                f"graph {self.path} does not match its manifest entry: graph inputs {sorted(got_in)} "
                f"outputs {sorted(got_out)}, manifest inputs {sorted(want_in)} outputs {sorted(want_out)}"
            )

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise EngineError(f"{self.name}: inference failed: {exc}") from exc
        return dict(zip(self._output_names, values))

    def describe(self) -> str:
        return f"{self.backend} ({', '.join(self.session.get_providers())})"

    @classmethod
    def why_not(cls) -> str | None:
        if ort is None:
            return "onnxruntime is not installed"
        missing = [p for p in cls.providers if p not in ort.get_available_providers()]
        if missing:
            return f"onnxruntime lacks {', '.join(missing)} (install onnxruntime-gpu for CUDA)"
        return None


@register_backend("onnxruntime", options=OnnxRuntimeOptions)
class OnnxRuntimeEngine(_OnnxRuntimeSession):
    """A graph run by ONNX Runtime on the CPU."""

    options: OnnxRuntimeOptions

    def _threads(self) -> int:
        return self.options.threads


@register_backend("onnxruntime-cuda", options=OnnxRuntimeCudaOptions)
class OnnxRuntimeCudaEngine(_OnnxRuntimeSession):
    """A graph run by ONNX Runtime's CUDA execution provider (onnxruntime-gpu) on ``device_id``."""

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    options: OnnxRuntimeCudaOptions

    def _providers(self) -> list[Provider]:
        return [("CUDAExecutionProvider", {"device_id": str(self.options.device_id)}), "CPUExecutionProvider"]
