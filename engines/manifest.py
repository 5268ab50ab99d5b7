"""The engine bundle's ``manifest.json``: everything the runtime needs to use the exported graphs.

Like anomalib's deploy metadata, the manifest sits beside the graphs and carries a schema version.
A bundle from a newer exporter is refused with an "upgrade" message; an older one is migrated when
a migration exists, otherwise refused with the command that re-exports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from anomalygpt_edge.engines.base import TensorSpec

SCHEMA_VERSION = 1
#: Version of the optional ``int8`` record (the encoder's CPU INT8 variant). A record newer than this
#: runtime reads is refused with "upgrade"; bundles without one are unaffected.
INT8_RECORD_VERSION = 1
MANIFEST_NAME = "manifest.json"
ResizeMode = Literal["shorter_side_crop", "squash", "letterbox"]
Interpolation = Literal["bicubic", "bilinear", "area", "nearest"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
#: Bank-matcher metrics: AnomalyGPT's cosine (1 - max similarity) and PatchCore's L2 (min distance).
MATCH_METRICS = ("cosine", "l2")

# The manifest is written by this package's exporter only: a key it does not know is a bundle
# from another tool or a damaged file, never something to skip.
_FORBID = ConfigDict(extra="forbid")


class ManifestError(ValueError):
    """The manifest is missing, malformed, or of a schema this runtime cannot read."""


@dataclass(frozen=True, config=_FORBID)
class FileEntry:
    """A file of the bundle, relative to the bundle folder, with its size and sha256."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True, config=_FORBID)
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
        """The input tensor called ``name`` (KeyError naming the graph file otherwise)."""
        return _by_name(self.inputs, name, self.file)

    def output(self, name: str) -> TensorSpec:
        """The output tensor called ``name`` (KeyError naming the graph file otherwise)."""
        return _by_name(self.outputs, name, self.file)


def _by_name(specs: list[TensorSpec], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"{where} has no tensor '{name}'")


@dataclass(frozen=True, config=_FORBID)
class Preprocess:
    """How a camera image becomes the encoder's ``pixel_values``.

    The image is converted to ``color`` order, resized to ``size`` (H, W) by ``resize`` mode with
    ``interpolation``, scaled by ``scale`` and normalised as ``(x - mean) / std`` per channel.
    """

    size: tuple[int, int]
    resize: ResizeMode
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str = "RGB"
    scale: float = 1.0 / 255.0


@dataclass(frozen=True, config=_FORBID)
class PatchLayer:
    """One patch-feature output of the encoder: ``grid`` (rows, cols) of ``dim``-d tokens, row-major."""

    name: str
    grid: tuple[int, int]
    dim: int


@dataclass(frozen=True, config=_FORBID)
class Int8Variant:
    """The encoder's static INT8 variant for ONNX Runtime's CPU provider, written by ``export int8``.

    ``file`` is a QDQ graph with the FP32 encoder's signature (float in, float out; the Q/DQ pairs
    sit inside), ``calibration`` says what its activation ranges were computed from.
    """

    version: int
    file: str
    format: Literal["qdq"]
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["int8"]
    per_channel: bool
    calibration: dict[str, Any]
    external_data: list[str] = field(default_factory=list)


def _keyed_files(value: Any) -> Any:
    # ``files`` maps each path to its entry; the entry repeats the path (older writers left it out).
    if isinstance(value, dict):
        return {k: {"path": k, **v} if isinstance(v, dict) else v for k, v in value.items()}
    return value


@dataclass(frozen=True, config=_FORBID)
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
    files: Annotated[dict[str, FileEntry], BeforeValidator(_keyed_files)]
    matching: dict[str, Any] = field(default_factory=dict)
    #: Encoder outputs only a recipe's defect head reads (beside the patch layers), never the bank.
    head_layers: list[PatchLayer] = field(default_factory=list)
    text_features: dict[str, Any] | None = None
    llm: dict[str, Any] | None = None
    engines: dict[str, Any] = field(default_factory=dict)
    #: Optional (``export int8``); absent from the JSON when there is none, so older bundles read as before.
    int8: Int8Variant | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest as ``manifest.json`` holds it."""
        data = asdict(self)
        if data["int8"] is None:
            del data["int8"]
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
        """``manifest.json``'s text: sorted keys, two-space indents, a final newline."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    def without_int8(self) -> Manifest:
        """The manifest as it was before ``export int8`` added its record and file (the FP32 bundle)."""
        if self.int8 is None:
            return self
        drop = {self.int8.file, *self.int8.external_data}
        return replace(self, int8=None, files={k: v for k, v in self.files.items() if k not in drop})


#: Migrations from schema N to N+1, applied in order to raw JSON. Empty while only v1 exists.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
_MANIFEST = TypeAdapter(Manifest)


def _migrated(data: Any, origin: str) -> dict[str, Any]:
    """``data`` at :data:`SCHEMA_VERSION`: newer refused ("upgrade"), older migrated or refused ("re-export")."""
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: must be a JSON object")
    doc: dict[str, Any] = data
    version = doc.get("schema_version")
    if "schema_version" not in doc:
        raise ManifestError(f"{origin}: missing key 'schema_version'")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ManifestError(f"{origin}: 'schema_version' must be int, got {type(version).__name__}")
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
        doc = migrate(doc)
        version = doc["schema_version"]
    return doc


def _problem(exc: ValidationError) -> str:
    """pydantic's first error as ``where: what`` (``preprocess: missing key 'mean'``)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    if first["type"] in ("missing", "missing_argument") and isinstance(first["loc"][-1], int):
        return f"{'.'.join(loc[:-1])}: too few values, got {first.get('input')!r}"
    if first["type"] in ("missing", "missing_argument"):
        return f"{'.'.join(loc[:-1]) or 'manifest'}: missing key '{loc[-1]}'"
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{'.'.join(loc)}: unknown key"
    return f"{'.'.join(loc) or 'manifest'}: {first['msg']}, got {first.get('input')!r}"


def _check_references(manifest: Manifest, origin: str) -> None:
    """Head layers on the patch grid; every graph file listed in ``files``; an encoder graph."""
    if not manifest.patch_layers:
        raise ManifestError(f"{origin}: patch_layers: at least one patch layer is needed")
    grid = manifest.patch_layers[0].grid
    if any(h.grid != grid for h in manifest.head_layers):
        raise ManifestError(f"{origin}: head_layers must share the patch layers' grid {grid}")
    for name, graph in manifest.graphs.items():
        for f in [graph.file, *graph.external_data, *filter(None, [graph.fp16_file]), *graph.fp16_external_data]:
            if f not in manifest.files:
                raise ManifestError(f"{origin}: graph '{name}' refers to '{f}', which is not listed in files")
    if "encoder" not in manifest.graphs:
        raise ManifestError(f"{origin}: a bundle needs an 'encoder' graph")
    _check_int8(manifest, origin)


def _check_int8(manifest: Manifest, origin: str) -> None:
    """The INT8 record, when present: a version this runtime reads, its files listed in ``files``."""
    variant = manifest.int8
    if variant is None:
        return
    if variant.version > INT8_RECORD_VERSION:
        raise ManifestError(
            f"{origin}: int8: record version {variant.version} was written by a newer exporter; this runtime "
            f"reads {INT8_RECORD_VERSION} and older. Upgrade anomalygpt-edge on this device."
        )
    for f in [variant.file, *variant.external_data]:
        if f not in manifest.files:
            raise ManifestError(f"{origin}: int8 refers to '{f}', which is not listed in files")


def parse_manifest(data: Any, origin: str = "manifest.json") -> Manifest:
    """Validate raw manifest JSON (migrating old schemas) and return a :class:`Manifest`."""
    data = _migrated(data, origin)
    try:
        manifest = _MANIFEST.validate_python(data)
    except ValidationError as exc:
        raise ManifestError(f"{origin}: {_problem(exc)}") from None
    _check_references(manifest, origin)
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
