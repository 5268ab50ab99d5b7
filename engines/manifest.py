"""The engine bundle's ``manifest.json``: everything the runtime needs to use the exported graphs.

Like anomalib's deploy metadata, the manifest sits beside the graphs and carries a schema version.
A bundle from a newer exporter is refused with an "upgrade" message; an older one is migrated when
a migration exists, otherwise refused with the command that re-exports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomalygpt_edge.engines.base import TensorSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
RESIZE_MODES = ("shorter_side_crop", "squash", "letterbox")
INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")
#: Bank-matcher metrics: AnomalyGPT's cosine (1 - max similarity) and PatchCore's L2 (min distance).
MATCH_METRICS = ("cosine", "l2")


class ManifestError(ValueError):
    """The manifest is missing, malformed, or of a schema this runtime cannot read."""


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle, relative to the bundle folder, with its size and sha256."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph: its ONNX file (plus external data, if any) and its signature."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[str] = field(default_factory=list)
    #: The FP16 variant of the same graph (strongly typed; FP32 kept where FP16 would overflow).
    fp16_file: str | None = None
    fp16_external_data: list[str] = field(default_factory=list)

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.file)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.file)


def _by_name(specs: list[TensorSpec], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"{where} has no tensor '{name}'")


@dataclass(frozen=True)
class Preprocess:
    """How a camera image becomes the encoder's ``pixel_values``.

    The image is converted to ``color`` order, resized to ``size`` (H, W) by ``resize`` mode with
    ``interpolation``, scaled by ``scale`` and normalised as ``(x - mean) / std`` per channel.
    """

    size: tuple[int, int]
    resize: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str = "RGB"
    scale: float = 1.0 / 255.0


@dataclass(frozen=True)
class PatchLayer:
    """One patch-feature output of the encoder: ``grid`` (rows, cols) of ``dim``-d tokens, row-major."""

    name: str
    grid: tuple[int, int]
    dim: int


@dataclass(frozen=True)
class Manifest:
    """Parsed ``manifest.json`` of an engine bundle."""

    schema_version: int
    source: dict[str, Any]
    exporter: dict[str, Any]
    created_at: str
    preprocess: Preprocess
    patch_layers: list[PatchLayer]
    map_size: tuple[int, int]
    graphs: dict[str, GraphEntry]
    files: dict[str, FileEntry]
    matching: dict[str, Any] = field(default_factory=dict)
    #: Encoder outputs only a recipe's defect head reads (beside the patch layers), never the bank.
    head_layers: list[PatchLayer] = field(default_factory=list)
    text_features: dict[str, Any] | None = None
    llm: dict[str, Any] | None = None
    engines: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["graphs"] = {
            k: {
                **{kk: vv for kk, vv in asdict(g).items() if kk not in ("inputs", "outputs")},
                "inputs": [s.to_json() for s in g.inputs],
                "outputs": [s.to_json() for s in g.outputs],
            }
            for k, g in self.graphs.items()
        }
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


#: Migrations from schema N to N+1, applied in order to raw JSON. Empty while only v1 exists.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "manifest") -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing key '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: '{key}' must be {names}, got {type(value).__name__}")
    return value


def parse_manifest(data: Any, origin: str = "manifest.json") -> Manifest:
    """Validate raw manifest JSON (migrating old schemas) and return a :class:`Manifest`."""
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: must be a JSON object")
    version = _require(data, "schema_version", int, origin)
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{origin}: schema_version {version} was written by a newer exporter; this runtime reads "
            f"schema {SCHEMA_VERSION} and older. Upgrade anomalygpt-edge on this device."
        )
    while version < SCHEMA_VERSION:
        migrate = MIGRATIONS.get(version)
        if migrate is None:
            raise ManifestError(
                f"{origin}: schema_version {version} has no migration to {SCHEMA_VERSION}; re-export the "
                f"bundle with `anomalygpt-edge export vision`."
            )
        data = migrate(data)
        version = data["schema_version"]

    try:
        pre = _require(data, "preprocess", dict, origin)
        preprocess = Preprocess(
            size=tuple(int(v) for v in _require(pre, "size", list, "preprocess")),
            resize=_require(pre, "resize", str, "preprocess"),
            interpolation=_require(pre, "interpolation", str, "preprocess"),
            mean=tuple(float(v) for v in _require(pre, "mean", list, "preprocess")),
            std=tuple(float(v) for v in _require(pre, "std", list, "preprocess")),
            color=pre.get("color", "RGB"),
            scale=float(pre.get("scale", 1.0 / 255.0)),
        )
        if preprocess.resize not in RESIZE_MODES:
            raise ManifestError(f"{origin}: preprocess.resize must be one of {RESIZE_MODES}, got '{preprocess.resize}'")
        if preprocess.interpolation not in INTERPOLATIONS:
            raise ManifestError(
                f"{origin}: preprocess.interpolation must be one of {INTERPOLATIONS}, got '{preprocess.interpolation}'"
            )
        if len(preprocess.size) != 2 or len(preprocess.mean) != 3 or len(preprocess.std) != 3:
            raise ManifestError(f"{origin}: preprocess: size needs 2 values, mean and std 3 each")
        layers = [
            PatchLayer(str(p["name"]), (int(p["grid"][0]), int(p["grid"][1])), int(p["dim"]))
            for p in _require(data, "patch_layers", list, origin)
        ]
        head_layers = [
            PatchLayer(str(p["name"]), (int(p["grid"][0]), int(p["grid"][1])), int(p["dim"]))
            for p in data.get("head_layers", [])
        ]
        if any(h.grid != layers[0].grid for h in head_layers):
            raise ManifestError(f"{origin}: head_layers must share the patch layers' grid {layers[0].grid}")
        graphs = {
            str(name): GraphEntry(
                file=_require(g, "file", str, f"graphs.{name}"),
                inputs=[TensorSpec.from_json(s) for s in _require(g, "inputs", list, f"graphs.{name}")],
                outputs=[TensorSpec.from_json(s) for s in _require(g, "outputs", list, f"graphs.{name}")],
                external_data=list(g.get("external_data", [])),
                fp16_file=g.get("fp16_file"),
                fp16_external_data=list(g.get("fp16_external_data", [])),
            )
            for name, g in _require(data, "graphs", dict, origin).items()
        }
        files = {
            str(name): FileEntry(str(name), str(f["sha256"]), int(f["size"]))
            for name, f in _require(data, "files", dict, origin).items()
        }
        map_size = tuple(int(v) for v in _require(data, "map_size", list, origin))
        manifest = Manifest(
            schema_version=version,
            source=_require(data, "source", dict, origin),
            exporter=_require(data, "exporter", dict, origin),
            created_at=_require(data, "created_at", str, origin),
            preprocess=preprocess,
            patch_layers=layers,
            map_size=(map_size[0], map_size[1]),
            graphs=graphs,
            files=files,
            matching=dict(data.get("matching", {})),
            head_layers=head_layers,
            text_features=data.get("text_features"),
            llm=data.get("llm"),
            engines=dict(data.get("engines", {})),
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ManifestError(f"{origin}: malformed entry: {exc!r}") from exc
    for name, graph in manifest.graphs.items():
        for f in [graph.file, *graph.external_data, *filter(None, [graph.fp16_file]), *graph.fp16_external_data]:
            if f not in manifest.files:
                raise ManifestError(f"{origin}: graph '{name}' refers to '{f}', which is not listed in files")
    if "encoder" not in manifest.graphs:
        raise ManifestError(f"{origin}: a bundle needs an 'encoder' graph")
    return manifest


def read_manifest(bundle_dir: Path) -> tuple[Manifest, bytes]:
    """Read and validate ``bundle_dir/manifest.json``; also return its raw bytes (for hashing)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{bundle_dir} is not an engine bundle: {MANIFEST_NAME} is missing")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    return parse_manifest(data, str(path)), raw
