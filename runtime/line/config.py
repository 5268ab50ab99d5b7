"""The daemon's configuration: the one place it is typed and validated.

Every key is declared once, as a field of a frozen pydantic model with ``extra="forbid"``: a typo
must not silently fall back to a default on a production line. Each room owns its section's
model: the cameras (one model per kind, joined on ``type`` from the source registry,
:mod:`anomalygpt_edge.runtime.cameras.base`), the engine backends' options (one model per
backend, joined on ``type`` from the engine registry, :mod:`anomalygpt_edge.engines.base`), the MQTT link
(:mod:`anomalygpt_edge.runtime.delivery.mqtt_config`); the rest is the line's own.

The YAML file is read with its line numbers (:mod:`.config_yaml`); an error names the file, the
line, the key path and what is wrong (``line.yaml:14: recipes[0].fps: must be a number between
0.01 and 1000, got 'fast'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from anomalygpt_edge.engines.base import (
    AutoOptions,
    BackendOptions,
    backend_keys,
    backend_options,
    backend_options_union,
    removed_backend,
    resolve_options,
)
from anomalygpt_edge.runtime.cameras.base import CameraConfig, camera_config_union
from anomalygpt_edge.runtime.delivery.mqtt_config import MqttConfig, TlsConfig
from anomalygpt_edge.runtime.delivery.sparkplug_config import SparkplugConfig
from anomalygpt_edge.runtime.line.config_yaml import ConfigError, config_error, read_yaml
from anomalygpt_edge.runtime.line.drift_watch import DriftConfig
from anomalygpt_edge.runtime.line.learn_config import LearnPolicy
from anomalygpt_edge.runtime.line.station_config import StationConfig
from anomalygpt_edge.runtime.values import (
    Between,
    ConfigPath,
    ExistingPath,
    FieldError,
    Flag,
    Name,
    Roi,
    Text,
    TopicLevel,
    check_name,
)

__all__ = [
    "CameraConfig",
    "CommandsConfig",
    "ConfigError",
    "DaemonConfig",
    "EnginesConfig",
    "HealthConfig",
    "LimitsConfig",
    "LlmConfig",
    "MqttConfig",
    "RecipeBinding",
    "StationConfig",
    "StorageConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
]

TriggerMode = Literal["free_run", "mqtt", "folder_watch"]
ExplainWhen = Literal["ng", "all"]
CommandName = Literal["trigger", "enroll", "recipe", "ask", "label"]
if TYPE_CHECKING:  # the unions are built from the kinds registered at run time; mypy reads what they all share
    CameraSettings = CameraConfig
    BackendUnion = BackendOptions
else:
    #: Each registered camera kind's model, chosen by ``type``.
    CameraSettings = camera_config_union()
    #: Each registered engine backend's options model (``auto``'s too), chosen by ``type``.
    BackendUnion = backend_options_union()


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _recipe_name(value: str) -> str:
    # The store's rule and message (RecipeStore.check_name wraps the same check).
    try:
        return check_name(value)
    except ValueError as exc:
        raise ValueError(f"recipe {exc}") from None


def _backend(value: Any) -> Any:
    """``engines.backend: onnxruntime`` is the shorthand for ``{type: onnxruntime}``; a removed
    backend (as a key or a ``type``) gets its own line, an unknown key the list of known ones."""
    if isinstance(value, str):
        if (gone := removed_backend(value)) is not None:
            raise ValueError(gone)
        if value not in backend_keys():  # the registry's names, installed here or not
            raise ValueError(f"must be one of {', '.join(backend_keys())}, got {value!r}")
        return {"type": value}
    if not isinstance(value, dict | BackendOptions):
        raise ValueError(
            f"must be a backend key ({', '.join(backend_keys())}) or a mapping with its type, got {value!r}"
        )
    named = value.get("type") if isinstance(value, dict) else None
    if isinstance(named, str) and (gone := removed_backend(named)) is not None:
        raise FieldError(("type",), gone)
    return value


def _workers(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
        return value
    raise ValueError(f"must be auto or a whole number between 1 and 64, got {value!r}")


RecipeName = Annotated[Text, AfterValidator(_recipe_name)]
#: ``engines.workers``: ``auto`` or a count (one clear message for anything else).
Workers = Annotated[Literal["auto"] | int, BeforeValidator(_workers)]
#: ``engines.backend``: a key or a mapping of the backend's options, validated by its model.
Backend = Annotated[BackendUnion, BeforeValidator(_backend)]


class DeviceConfig(_Section):
    """This device on the broker."""

    id: TopicLevel  # required; an MQTT topic level


class RecipeBinding(_Section):
    """Which recipe inspects which camera, how parts are triggered and by when they must be answered."""

    camera: Name
    recipe: RecipeName
    trigger: TriggerMode = "free_run"
    fps: Annotated[float, Between(0.01, 1000)] = 10.0  # free_run: at most this many inspections per second
    # capture (or trigger) to verdict; later means an ERROR verdict
    deadline_ms: Annotated[float, Between(1, 600000)] = 500.0
    roi: Roi | None = None  # overrides the recipe's ROI
    bundle: ConfigPath | None = None  # overrides engines.bundle for this camera
    heatmap: Flag = False  # publish a JPEG overlay for NG parts on <camera>/heatmap
    # mqtt trigger: only frames captured this long after the trigger count;
    # folder_watch: a file still empty this long (0 = 1 s) is answered ERROR "empty file"
    settle_ms: Annotated[float, Between(0, 10000)] = 0.0


class EnginesConfig(_Section):
    """The engine bundle, the backend that runs it and that backend's options."""

    bundle: ConfigPath = Path("data/bundles/default")
    # A backend key (auto, onnxruntime, onnxruntime-cuda, tensorrt), or a mapping of that backend's
    # options, e.g. {type: onnxruntime-cuda, device_id: 1}; each backend declares its own (engines/*_backend.py).
    backend: Backend = AutoOptions()
    # The encoder's precision: int8 is the bundle's CPU INT8 variant (`anomalygpt-edge export int8`), refused
    # on a CPU without VNNI / dot-product instructions. Recipes are enrolled at one precision: re-enroll to switch.
    precision: Literal["fp32", "int8"] = "fp32"
    # CPU (onnxruntime) threads per inspection worker; 0 = the backend's default (every core).
    # One thread leaves the other cores to the camera, MQTT and archive threads and avoids the
    # spin-waiting of two ONNX Runtime thread pools (encoder and matcher) fighting for two cores.
    # The shorthand of the onnxruntime backend's own `threads` (backend: {type: onnxruntime,
    # threads: N}); that one wins when given (threads then follows it), both given must agree.
    # Also what `workers: auto` counts by, whichever backend runs.
    threads: Annotated[int, Between(0, 256)] = 1
    # Micro-batching (runtime/line/batching.py): at most this many jobs per engine run; 1 = one at a
    # time. Off by default: with one thread a batch costs as much per image as single images, so it
    # only adds latency (BENCHMARKS.md, bench line-sweep: batch 8 at 10 fps, p99 x1.2-1.9 for 2-6
    # cameras, the same verdicts/s); a box with more cores and `threads` > 1 may gain (not measured).
    max_batch: Annotated[int, Between(1, 64)] = 1
    # How long free-run frames wait for other cameras' frames to join their batch (never past a
    # deadline; a triggered part never waits).
    max_wait_ms: Annotated[float, Between(0, 1000)] = 10.0
    # Inspection workers per bundle queue, each running one inference at a time on `threads` ONNX
    # Runtime threads; a camera is inspected by one worker at a time (its verdicts stay in order).
    # auto = as many as `threads` fit the cores, at most 2 (the most measured: BENCHMARKS.md,
    # "Two inspection workers per bundle"); threads 0 (a pool on every core) gets 1.
    workers: Workers = "auto"

    @model_validator(mode="before")
    @classmethod
    def threads_follow_the_backend(cls, data: Any) -> Any:
        """``backend: {type: onnxruntime, threads: N}`` without ``threads``: ``threads`` is N too."""
        if isinstance(data, dict) and "threads" not in data:
            backend = data.get("backend")
            if isinstance(backend, dict) and backend.get("type") == "onnxruntime" and "threads" in backend:
                return {**data, "threads": backend["threads"]}
        return data

    @model_validator(mode="after")
    def one_thread_count(self) -> EnginesConfig:
        """The onnxruntime backend's ``threads`` and its shorthand ``engines.threads`` agree."""
        own = getattr(self.backend, "threads", None)
        if "threads" in self.backend.model_fields_set and own != self.threads:
            raise FieldError(
                ("backend", "threads"),
                f"is {own} but engines.threads is {self.threads}: give the thread count once "
                "(engines.threads is the shorthand of this one)",
            )
        return self

    def bundle_options(self) -> BackendOptions:
        """The backend options bundles are opened with on this machine: ``auto`` resolved to the
        best usable backend (EngineError when none is, or the one named is not usable here), and
        ONNX Runtime on the CPU given ``threads``."""
        chosen = resolve_options(self.backend)
        if chosen.type != "onnxruntime":
            return chosen
        return backend_options({**chosen.model_dump(), "threads": self.threads})


class StorageConfig(_Section):
    """Where recipes and daemon state live, and the spool, archive and disk bounds."""

    store: ConfigPath = Path("data/recipes")  # the recipe store (banks, golden samples)
    # Replaced recipe versions kept for a rollback (each keeps its bank, head and samples on disk).
    keep_versions: Annotated[int, Between(0, 100)] = 3
    # How often the daemon looks for recipe commits of other processes (CLI rollback, calibrate); 0 = never.
    recipe_watch_s: Annotated[float, Between(0, 3600)] = 2.0
    data: ConfigPath = Path("data")  # daemon state: <data>/spool.db, <data>/archive/
    spool: Flag = True  # every verdict on disk until the broker acknowledges it
    spool_max_rows: Annotated[int, Between(1, 10**9)] = 100000
    spool_max_age_s: Annotated[float, Between(1)] = 86400.0
    archive: Flag = True  # every verdict row, NG images and heatmaps under a quota
    archive_quota_mb: Annotated[int, Between(0, 10**9)] = 2048
    archive_ok_sample_rate: Annotated[float, Between(0, 1)] = 0.0  # share of OK images kept too (0 = none)
    # One disk budget for everything under `data` (spool, archive, both WALs, images); 0 = none.
    disk_budget_mb: Annotated[int, Between(0, 10**9)] = 0
    # Below this much free space the archive stops writing (images below twice it); the spool goes on.
    disk_free_floor_mb: Annotated[int, Between(0, 10**6)] = 64
    # held back in a file, released to the spool when the disk fills
    spool_reserve_mb: Annotated[int, Between(0, 10**5)] = 4


class LlmConfig(_Section):
    """The optional on-device LLM that explains verdicts and answers cmd/ask."""

    enabled: Flag = False
    model: ExistingPath | None = None  # GGUF; default the embedded SmolLM2-135M-Instruct
    threads: Annotated[int, Between(1, 256)] = 1  # keep the LLM off the cores the vision path needs
    explain: ExplainWhen = "ng"  # explain NG verdicts only, or all
    max_queue: Annotated[int, Between(1, 1000)] = 4


class HealthConfig(_Section):
    """The heartbeat and the optional Prometheus endpoint."""

    # the status topic is republished with rolling figures this often
    heartbeat_s: Annotated[float, Between(0.5, 3600)] = 10.0
    metrics_bind: Text | None = None  # e.g. "127.0.0.1:9108" for Prometheus /metrics; off by default


class CommandsConfig(_Section):
    """Who may change enrollment and recipes over MQTT (runtime/line/command_gate.py)."""

    privileged: tuple[CommandName, ...] = ("enroll", "recipe", "label")
    allowed_client_ids: tuple[Text, ...] | None = None  # claimed in a client_id user property or field
    token_file: ExistingPath | None = None  # shared token; else $ANOMALYGPT_EDGE_COMMANDS_TOKEN (or ..._FILE)
    # Without a token or allowed client ids, enroll and recipe switch are refused unless this is
    # set: any broker client could otherwise create recipes and switch the line's recipe.
    allow_anonymous_control: Flag = False
    # an idle MQTT enroll session (and its frames) is dropped
    enroll_session_timeout_s: Annotated[float, Between(1, 86400)] = 300.0

    @property
    def token(self) -> str | None:
        """From ``token_file``, else ``$ANOMALYGPT_EDGE_COMMANDS_TOKEN`` (or ``..._FILE``)."""
        from anomalygpt_edge.runtime.secrets import resolve_secret

        ref = {"token_file": str(self.token_file)} if self.token_file else {}
        secret: str | None = resolve_secret(ref, "token", "commands")
        return secret


class LimitsConfig(_Section):
    """Bounds on what a client, a camera folder or a file can make the process allocate."""

    max_image_pixels: Annotated[int, Between(1)] = 40_000_000  # width x height, checked from the header before decoding


class DaemonConfig(_Section):
    """The whole file: one field per section, each section its own model."""

    device: DeviceConfig
    cameras: dict[Name, CameraSettings]
    recipes: list[RecipeBinding]
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)  # the drift watch (runtime/line/drift_watch.py)
    learn: dict[RecipeName, LearnPolicy] = Field(default_factory=dict)  # auto-apply of proposals, per recipe
    sparkplug: SparkplugConfig | None = None  # Sparkplug B 3.0 Edge Node beside the JSON topics
    station: StationConfig | None = None  # the technician page, served by `run --config` beside the daemon
    _source: str = PrivateAttr("<config>")

    @model_validator(mode="after")
    def bindings_fit_the_cameras(self) -> DaemonConfig:
        """Every binding names a configured camera, at most one per camera, with a trigger it supports."""
        if not self.cameras:
            raise FieldError(("cameras",), "at least one camera is needed")
        for key, camera in self.cameras.items():
            if camera.name != key:
                raise FieldError(("cameras", key, "name"), "unknown key: a camera's name is its key under cameras")
        seen: set[str] = set()
        for i, binding in enumerate(self.recipes):
            if binding.camera not in self.cameras:
                raise FieldError(("recipes", i, "camera"), f"no camera '{binding.camera}' in cameras")
            if binding.camera in seen:
                raise FieldError(("recipes", i, "camera"), f"camera '{binding.camera}' already has a recipe")
            seen.add(binding.camera)
            if binding.trigger == "folder_watch" and self.cameras[binding.camera].type != "image_folder":
                raise FieldError(("recipes", i, "trigger"), "folder_watch needs a camera of type image_folder")
        return self

    @property
    def device_id(self) -> str:
        """The device's MQTT topic level (``device.id``)."""
        return self.device.id

    @property
    def source(self) -> str:
        """Where the config was read from (the file name in every error)."""
        return self._source

    def binding(self, camera: str) -> RecipeBinding | None:
        """The recipe binding of ``camera``, if it has one."""
        return next((r for r in self.recipes if r.camera == camera), None)

    def bundle_for(self, binding: RecipeBinding) -> Path:
        """The engine bundle a binding inspects with: its own, else the engines section's."""
        return binding.bundle or self.engines.bundle


def load_config(path: Path | str) -> DaemonConfig:
    """Read and validate a config file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {getattr(exc, 'strerror', None) or exc}") from exc
    return parse_config(text, str(path), path.parent)


def parse_config(text: str, origin: str = "<config>", base: Path | None = None) -> DaemonConfig:
    """Validate config YAML text (see :func:`load_config`)."""
    data, marks = read_yaml(text, origin)
    if isinstance(data, dict) and isinstance(data.get("cameras"), dict):
        # A camera's name is its key; the kind's model carries it as ``name``.
        data["cameras"] = {
            key: {"name": key, **cam} if isinstance(cam, dict) and "name" not in cam else cam
            for key, cam in data["cameras"].items()
        }
    try:
        config = DaemonConfig.model_validate(data, context={"base": base or Path.cwd()})
    except ValidationError as exc:
        raise config_error(exc, _without_names(data), marks, DaemonConfig) from None
    config._source = origin
    return config


def _without_names(data: Any) -> Any:
    # The injected names are not in the YAML: an error must never point at them.
    if isinstance(data, dict) and isinstance(data.get("cameras"), dict):
        cams = {k: {n: v for n, v in c.items() if n != "name"} if isinstance(c, dict) else c
                for k, c in data["cameras"].items()}  # fmt: skip
        return {**data, "cameras": cams}
    return data
