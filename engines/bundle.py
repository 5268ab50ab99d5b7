"""EngineBundle: an exported folder of graphs plus its manifest, verified before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomalygpt_edge.atomic_files import sha256_bytes, sha256_file
from anomalygpt_edge.engines.base import Engine, EngineError, create_engine
from anomalygpt_edge.engines.manifest import GraphEntry, Manifest, ManifestError, read_manifest


class BundleError(EngineError):
    """The bundle on disk does not match its manifest (missing, truncated or altered file)."""


class EngineBundle:
    """An engine bundle opened from disk.

    ``sha256`` identifies the bundle: the hash of its manifest, which itself lists the hash of
    every file, so any change to any graph changes it. Memory banks record it, and a bank built
    with another bundle is refused.
    """

    def __init__(self, path: Path, manifest: Manifest, sha256: str, backend: str = "auto"):
        self.path = Path(path)
        self.manifest = manifest
        self.sha256 = sha256
        self.backend = backend
        self._engines: dict[tuple[str, str], Engine] = {}

    @classmethod
    def open(cls, path: Path | str, backend: str = "auto", verify: bool = True) -> EngineBundle:
        """Read the manifest and (by default) check every file's size and sha256 against it."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"engine bundle {path} does not exist or is not a folder")
        try:
            manifest, raw = read_manifest(path)
        except ManifestError as exc:
            raise BundleError(str(exc)) from exc
        bundle = cls(path, manifest, sha256_bytes(raw), backend)
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

    def engine(self, graph: str, precision: str = "fp32", backend: str | None = None) -> Engine:
        """The loaded engine for ``graph``; loaded once and shared by every caller (and camera)."""
        key = (graph, precision)
        if key not in self._engines:
            entry = self.graph(graph)
            if precision == "fp32":
                file, inputs, outputs = entry.file, entry.inputs, entry.outputs
            elif precision == "fp16":
                if entry.fp16_file is None:
                    raise BundleError(f"bundle {self.path}: graph '{graph}' has no fp16 variant")
                file = entry.fp16_file
                inputs = [
                    type(s)(s.name, s.shape, "float16" if s.dtype == "float32" else s.dtype) for s in entry.inputs
                ]
                outputs = [
                    type(s)(s.name, s.shape, "float16" if s.dtype == "float32" else s.dtype) for s in entry.outputs
                ]
            else:
                raise BundleError(f"precision must be fp32 or fp16, got '{precision}'")
            self._engines[key] = create_engine(self.path / file, inputs, outputs, backend or self.backend)
        return self._engines[key]

    def text_features(self) -> dict[str, np.ndarray]:
        """Per-class [normal, abnormal] text features (2, D), for bundles with the text decoder."""
        info = self.manifest.text_features
        if not info:
            raise BundleError(f"bundle {self.path} carries no text features (export it with --source anomalygpt)")
        with np.load(self.path / info["file"], allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
