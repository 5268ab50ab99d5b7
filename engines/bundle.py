"""EngineBundle: an exported folder of graphs plus its manifest, verified before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomalygpt_edge.atomic_files import sha256_bytes, sha256_file
from anomalygpt_edge.engines.base import (
    BackendOptions,
    Engine,
    EngineError,
    TensorSpec,
    backend_options,
    create_engine,
)
from anomalygpt_edge.engines.cpu_int8 import why_not_int8
from anomalygpt_edge.engines.manifest import GraphEntry, Manifest, ManifestError, read_manifest


class BundleError(EngineError):
    """The bundle on disk does not match its manifest (missing, truncated or altered file)."""


class EngineBundle:
    """An engine bundle opened from disk.

    ``sha256`` identifies the bundle: the hash of its manifest, which itself lists the hash of
    every file, so any change to any graph changes it. Memory banks record it, and a bank built
    with another bundle is refused.

    ``precision`` is the encoder's: ``fp32`` or ``int8`` (the CPU INT8 variant of ``export int8``).
    The two compute different features, so each has its own identity: at ``fp32`` the manifest
    without its ``int8`` record (a recipe enrolled before ``export int8`` stays valid), at ``int8``
    the whole manifest (a recipe enrolled at one precision is refused at the other: re-enroll).

    ``backend`` is the backend's options object (:func:`~anomalygpt_edge.engines.base.backend_options`)
    or its key, the shorthand for that backend's defaults; every graph loads with it (the INT8
    encoder excepted: ONNX Runtime on the CPU, with these options when they are that backend's).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        sha256: str,
        backend: str | BackendOptions = "auto",
        precision: str = "fp32",
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.sha256 = sha256
        self.options = backend_options(backend)
        self.backend = self.options.type  # the key, for logs and the status
        self.precision = precision
        self._engines: dict[tuple[str, str], Engine] = {}

    @classmethod
    def open(
        cls, path: Path | str, backend: str | BackendOptions = "auto", verify: bool = True, precision: str = "fp32"
    ) -> EngineBundle:
        """Read the manifest and (by default) check every file's size and sha256 against it."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"engine bundle {path} does not exist or is not a folder")
        try:
            manifest, raw = read_manifest(path)
        except ManifestError as exc:
            raise BundleError(str(exc)) from exc
        _check_precision(path, manifest, precision)
        bundle = cls(path, manifest, bundle_identity(manifest, raw, precision), backend, precision)
        bundle.check_files(hashes=verify)
        return bundle

    def check_files(self, hashes: bool = True) -> None:
        """Raise :class:`BundleError` naming the first file that is missing, truncated or altered."""
        for entry in self.manifest.files.values():
            file = self.path / entry.path
            if not file.is_file():
                raise BundleError(f"bundle {self.path}: file '{entry.path}' listed in the manifest is missing")
            size = file.stat().st_size
            if size != entry.size:
                raise BundleError(
                    f"bundle {self.path}: file '{entry.path}' is {size} bytes, the manifest says {entry.size} "
                    f"(truncated or replaced)"
                )
            if hashes and sha256_file(file) != entry.sha256:
                raise BundleError(f"bundle {self.path}: file '{entry.path}' does not match its sha256 in the manifest")

    def has(self, graph: str) -> bool:
        return graph in self.manifest.graphs

    def graph(self, graph: str) -> GraphEntry:
        try:
            return self.manifest.graphs[graph]
        except KeyError:
            raise BundleError(
                f"bundle {self.path} has no '{graph}' graph (it has {', '.join(sorted(self.manifest.graphs))})"
            ) from None

    def engine(self, graph: str, precision: str | None = None, backend: str | BackendOptions | None = None) -> Engine:
        """The loaded engine for ``graph``; loaded once and shared by every caller (and camera).

        ``precision`` defaults to the bundle's for the encoder and ``fp32`` for every other graph.
        """
        if precision is None:
            precision = self.precision if graph == "encoder" else "fp32"
        key = (graph, precision)
        if key not in self._engines:
            self._engines[key] = create_engine(*self.variant(graph, precision, backend))
        return self._engines[key]

    def variant(
        self, graph: str, precision: str | None = None, backend: str | BackendOptions | None = None
    ) -> tuple[Path, list[TensorSpec], list[TensorSpec], BackendOptions]:
        """(file, inputs, outputs, backend options) of ``graph`` at ``precision`` (default: as :meth:`engine`).

        For callers that load the graph themselves: they must load the file of the bundle's
        precision, not the FP32 one.
        """
        if precision is None:
            precision = self.precision if graph == "encoder" else "fp32"
        entry = self.graph(graph)
        backend = self.options if backend is None else backend_options(backend)
        if precision == "fp32":
            return self.path / entry.file, entry.inputs, entry.outputs, backend
        if precision == "fp16":
            if entry.fp16_file is None:
                raise BundleError(f"bundle {self.path}: graph '{graph}' has no fp16 variant")
            return self.path / entry.fp16_file, _as_fp16(entry.inputs), _as_fp16(entry.outputs), backend
        if precision == "int8":
            file = self._int8_file(graph, backend.type)
            cpu = backend if backend.type == "onnxruntime" else backend_options("onnxruntime")
            return self.path / file, entry.inputs, entry.outputs, cpu
        raise BundleError(f"precision must be fp32, fp16 or int8, got '{precision}'")

    def _int8_file(self, graph: str, backend: str) -> str:
        """The INT8 variant's file; it is the encoder's only and runs on ONNX Runtime's CPU provider."""
        variant = self.manifest.int8
        if graph != "encoder" or variant is None:
            raise BundleError(f"bundle {self.path}: graph '{graph}' has no int8 variant")
        if backend not in ("auto", "onnxruntime"):
            raise BundleError(
                f"bundle {self.path}: the int8 encoder runs on ONNX Runtime's CPU provider, not backend '{backend}'"
            )
        return variant.file

    def text_features(self) -> dict[str, np.ndarray]:
        """Per-class [normal, abnormal] text features (2, D), for bundles with the text decoder."""
        info = self.manifest.text_features
        if not info:
            raise BundleError(f"bundle {self.path} carries no text features (export it with --source anomalygpt)")
        with np.load(self.path / info["file"], allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


def _as_fp16(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The FP16 variant's signature: float32 tensors become float16, the others stay."""
    return [TensorSpec(s.name, s.shape, "float16" if s.dtype == "float32" else s.dtype) for s in specs]


def bundle_identity(manifest: Manifest, raw: bytes, precision: str = "fp32") -> str:
    """The bundle's sha256 at ``precision`` (see :class:`EngineBundle`); ``raw`` is manifest.json's bytes."""
    if precision == "int8" or manifest.int8 is None:
        return sha256_bytes(raw)
    return sha256_bytes(manifest.without_int8().dumps().encode())


def _check_precision(path: Path, manifest: Manifest, precision: str) -> None:
    """Refuse an encoder precision the bundle lacks, or INT8 on a CPU without 8-bit dot products."""
    if precision == "fp32":
        return
    if precision != "int8":
        raise BundleError(f"engines.precision must be fp32 or int8, got '{precision}'")
    if manifest.int8 is None:
        raise BundleError(
            f"bundle {path} has no int8 encoder: run `anomalygpt-edge export int8 --bundle {path} "
            f"--calib-images DIR` (golden images) first, or use fp32"
        )
    if (why := why_not_int8()) is not None:
        raise BundleError(why)
