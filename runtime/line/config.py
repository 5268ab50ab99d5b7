"""The daemon's configuration: the one place it is typed and validated.

The YAML file is read with ``yaml.compose`` so every value keeps the line it came from; an error
names the file, the line, the key path and what is wrong (``line.yaml:14: recipes[0].fps: must be
a number > 0, got 'fast'``). Unknown keys are errors too: a typo must not silently fall back to a
default on a production line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CAMERA_TYPES = ("opencv", "video_file", "image_folder")
TRIGGER_MODES = ("free_run", "mqtt", "folder_watch")
PROTOCOLS = ("5", "3.1.1")
EXPLAIN_WHEN = ("ng", "all")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names file, line, key path and the problem."""


@dataclass(frozen=True)
class CameraConfig:
    """One camera (or replayed source). ``source`` meaning depends on ``type``."""

    name: str
    type: str
    source: str  # device index, /dev/videoN, URL, GStreamer pipeline, video file or image folder
    fps: float | None = None  # pacing of file sources; requested rate of live cameras
    loop: bool = True  # video_file / image_folder: start again at the end
    width: int | None = None  # opencv: requested capture size
    height: int | None = None
    gstreamer: bool = False  # opencv: ``source`` is a GStreamer pipeline (cv2.CAP_GSTREAMER)
    reconnect_min_s: float = 0.5  # backoff after a camera drops: doubles up to reconnect_max_s
    reconnect_max_s: float = 10.0


@dataclass(frozen=True)
class RecipeBinding:
    """Which recipe inspects which camera, how parts are triggered and by when they must be answered."""

    camera: str
    recipe: str
    trigger: str = "free_run"
    fps: float = 10.0  # free_run: at most this many inspections per second
    deadline_ms: float = 500.0  # capture (or trigger) to verdict; later means an ERROR verdict
    roi: tuple[int, int, int, int] | None = None  # overrides the recipe's ROI
    bundle: Path | None = None  # overrides engines.bundle for this camera
    heatmap: bool = False  # publish a JPEG overlay for NG parts on <camera>/heatmap
    settle_ms: float = 0.0  # mqtt trigger: only frames captured this long after the trigger count;
    # folder_watch: a file still empty this long (0 = 1 s) is answered ERROR "empty file"


@dataclass(frozen=True)
class EnginesConfig:
    bundle: Path = Path("data/bundles/default")
    backend: str = "auto"
    # CPU (onnxruntime) threads per inspection worker; 0 = the backend's default (every core).
    # One thread leaves the other cores to the camera, MQTT and archive threads and avoids the
    # spin-waiting of two ONNX Runtime thread pools (encoder and matcher) fighting for two cores.
    threads: int = 1


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = True  # False accepts a broker certificate for another name (test rigs only)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    protocol: str = "5"
    prefix: str = "anomalygpt"
    qos: int = 1
    keepalive: int = 30
    client_id: str | None = None  # default: anomalygpt-edge-<device id>
    username: str | None = None
    password_file: Path | None = None  # a file, never the password itself in the config
    tls: TlsConfig | None = None
    max_payload_bytes: int = 65536  # larger commands get an error reply

    @property
    def password(self) -> str | None:
        """From ``password_file``, else ``$ANOMALYGPT_EDGE_MQTT_PASSWORD`` (or ``..._FILE``); see runtime/secrets.py."""
        from anomalygpt_edge.runtime.secrets import resolve_secret

        ref = {"password_file": str(self.password_file)} if self.password_file else {}
        return resolve_secret(ref, "password", "mqtt")


@dataclass(frozen=True)
class StorageConfig:
    store: Path = Path("data/recipes")  # the recipe store (banks, golden samples)
    data: Path = Path("data")  # daemon state: <data>/spool.db, <data>/archive/
    spool: bool = True  # every verdict on disk until the broker acknowledges it
    spool_max_rows: int = 100000
    spool_max_age_s: float = 86400.0
    archive: bool = True  # every verdict row, NG images and heatmaps under a quota
    archive_quota_mb: int = 2048
    archive_ok_sample_rate: float = 0.0  # share of OK images kept too (0 = none)
    # One disk budget for everything under `data` (spool, archive, both WALs, images); 0 = none.
    disk_budget_mb: int = 0
    # Below this much free space the archive stops writing (images below twice it); the spool goes on.
    disk_free_floor_mb: int = 64
    spool_reserve_mb: int = 4  # held back in a file, released to the spool when the disk fills


@dataclass(frozen=True)
class LlmConfig:
    enabled: bool = False
    model: Path | None = None  # GGUF; default the embedded SmolLM2-135M-Instruct
    threads: int = 1  # keep the LLM off the cores the vision path needs
    explain: str = "ng"  # explain NG verdicts only, or all
    max_queue: int = 4


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_s: float = 10.0  # the status topic is republished with rolling figures this often
    metrics_bind: str | None = None  # e.g. "127.0.0.1:9108" for Prometheus /metrics; off by default


@dataclass(frozen=True)
class CommandsConfig:
    """Who may change enrollment and recipes over MQTT (runtime/line/command_gate.py)."""

    privileged: tuple[str, ...] = ("enroll", "recipe")
    allowed_client_ids: tuple[str, ...] | None = None  # claimed in a client_id user property or field
    token_file: Path | None = None  # shared token; else $ANOMALYGPT_EDGE_COMMANDS_TOKEN (or ..._FILE)
    # Without a token or allowed client ids, enroll and recipe switch are refused unless this is
    # set: any broker client could otherwise create recipes and switch the line's recipe.
    allow_anonymous_control: bool = False
    enroll_session_timeout_s: float = 300.0  # an idle MQTT enroll session (and its frames) is dropped

    @property
    def token(self) -> str | None:
        from anomalygpt_edge.runtime.secrets import resolve_secret

        ref = {"token_file": str(self.token_file)} if self.token_file else {}
        return resolve_secret(ref, "token", "commands")


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what a client, a camera folder or a file can make the process allocate."""

    max_image_pixels: int = 40_000_000  # width x height, checked from the header before decoding


@dataclass(frozen=True)
class DaemonConfig:
    device_id: str
    cameras: dict[str, CameraConfig]
    recipes: list[RecipeBinding]
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    source: str = "<config>"

    def binding(self, camera: str) -> RecipeBinding | None:
        return next((r for r in self.recipes if r.camera == camera), None)

    def bundle_for(self, binding: RecipeBinding) -> Path:
        return binding.bundle or self.engines.bundle


# --- YAML with line numbers ---------------------------------------------------------------------


class _Reader:
    """Walks a composed YAML node tree, turning values into Python and errors into ConfigError."""

    def __init__(self, origin: str, base: Path):
        self.origin = origin
        self.base = base

    def fail(self, node: yaml.Node | None, path: str, problem: str) -> ConfigError:
        mark = getattr(node, "start_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        return ConfigError(f"{self.origin}{line}: {path or '<top>'}: {problem}")

    def mapping(self, node: yaml.Node, path: str, allowed: set[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, path, "must be a mapping of keys to values")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise self.fail(key_node, path, "keys must be plain strings")
            if key in out:
                raise self.fail(key_node, sub, "duplicate key")
            if allowed and key not in allowed:
                from anomalygpt_edge.runtime.secrets import SECRET_KEYS, env_var_name

                if key in SECRET_KEYS:  # say how to give a secret rather than just "unknown key"
                    hint = f"use {key}_file: PATH or the environment variable {env_var_name(sub)}"
                    raise self.fail(key_node, sub, f"secrets are not accepted in clear in the YAML; {hint}")
                raise self.fail(key_node, sub, f"unknown key; allowed here: {', '.join(sorted(allowed))}")
            out[key] = value_node
        return out

    def scalar(self, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, path, "must be a single value, not a list or mapping")
        try:
            return yaml.safe_load(yaml.serialize(node))
        except (yaml.YAMLError, ValueError, TypeError) as exc:  # "!!int abc", an unknown "!tag" ...
            raise self.fail(node, path, f"unreadable value: {getattr(exc, 'problem', None) or exc}") from None

    def string(self, node: yaml.Node, path: str, optional: bool = False) -> str | None:
        value = self.scalar(node, path)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
            raise self.fail(node, path, f"must be a non-empty string, got {value!r}")
        return str(value)

    def name(self, node: yaml.Node, path: str) -> str:
        value = self.string(node, path)
        assert value is not None
        # Names become MQTT topic levels: no wildcards, separators or spaces.
        if any(c in value for c in "/+#$ \t") or len(value) > 64:
            raise self.fail(node, path, f"{value!r} cannot be an MQTT topic level (no / + # $ or spaces, max 64)")
        return value

    def recipe_name(self, node: yaml.Node, path: str) -> str:
        """A recipe name as the recipe store accepts it (it becomes a folder and a topic field)."""
        from anomalygpt_edge.runtime.recipes.store import RecipeError, check_name

        value = self.name(node, path)
        try:
            return check_name(value)
        except RecipeError as exc:
            raise self.fail(node, path, str(exc)) from None

    def number(self, node: yaml.Node, path: str, low: float, high: float = float("inf"), integer: bool = False) -> Any:
        value = self.scalar(node, path)
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            bound = f"between {low:g} and {high:g}" if high != float("inf") else f">= {low:g}"
            raise self.fail(node, path, f"must be {kind} {bound}, got {value!r}")
        return int(value) if integer else float(value)

    def boolean(self, node: yaml.Node, path: str) -> bool:
        value = self.scalar(node, path)
        if not isinstance(value, bool):
            raise self.fail(node, path, f"must be true or false, got {value!r}")
        return value

    def choice(self, node: yaml.Node, path: str, choices: tuple[str, ...]) -> str:
        value = str(self.scalar(node, path))
        if value not in choices:
            raise self.fail(node, path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def path(self, node: yaml.Node, path: str, must_exist: bool = False) -> Path | None:
        value = self.string(node, path, optional=True)
        if value is None:
            return None
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() else self.base / p
        if must_exist and not p.exists():
            raise self.fail(node, path, f"{p} does not exist")
        return p

    def roi(self, node: yaml.Node, path: str) -> tuple[int, int, int, int] | None:
        if isinstance(node, yaml.ScalarNode) and self.scalar(node, path) is None:
            return None
        if not isinstance(node, yaml.SequenceNode) or len(node.value) != 4:
            raise self.fail(node, path, "must be [x, y, w, h] in pixels")
        x, y, w, h = (self.number(n, f"{path}[{i}]", 0, integer=True) for i, n in enumerate(node.value))
        if w <= 0 or h <= 0:
            raise self.fail(node, path, "width and height must be > 0")
        return (x, y, w, h)

    def fields(
        self, node: yaml.Node, path: str, spec: dict[str, Callable[[yaml.Node, str], Any]], required: tuple[str, ...]
    ) -> dict[str, Any]:
        """Read a mapping whose keys are all in ``spec``; ``required`` keys must be present."""
        nodes = self.mapping(node, path, set(spec))
        for key in required:
            if key not in nodes:
                raise self.fail(node, path, f"missing required key '{key}'")
        return {k: spec[k](v, f"{path}.{k}" if path else k) for k, v in nodes.items()}


def load_config(path: Path | str) -> DaemonConfig:
    """Read and validate a config file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    return parse_config(text, str(path), path.parent)


def parse_config(text: str, origin: str = "<config>", base: Path | None = None) -> DaemonConfig:
    """Validate config YAML text (see :func:`load_config`)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{origin}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if root is None:
        raise ConfigError(f"{origin}: the config file is empty")
    r = _Reader(origin, base or Path.cwd())
    sections = {"device", "cameras", "recipes", "engines", "mqtt", "storage", "llm", "health", "commands", "limits"}
    top = r.mapping(root, "", sections)
    for key in ("device", "cameras", "recipes"):
        if key not in top:
            raise r.fail(root, "", f"missing required section '{key}'")

    device = r.fields(top["device"], "device", {"id": r.name}, ("id",))

    cameras: dict[str, CameraConfig] = {}
    for key_node, cam_node in _pairs(r, top["cameras"], "cameras"):
        name = r.name(key_node, "cameras")
        p = f"cameras.{name}"
        spec = {
            "type": lambda n, q: r.choice(n, q, CAMERA_TYPES),
            "source": r.string,
            "fps": lambda n, q: r.number(n, q, 0.1, 1000),
            "loop": r.boolean,
            "width": lambda n, q: r.number(n, q, 1, 16384, integer=True),
            "height": lambda n, q: r.number(n, q, 1, 16384, integer=True),
            "gstreamer": r.boolean,
            "reconnect_min_s": lambda n, q: r.number(n, q, 0.01, 60),
            "reconnect_max_s": lambda n, q: r.number(n, q, 0.01, 3600),
        }
        values = r.fields(cam_node, p, spec, ("type", "source"))
        if values["type"] in ("video_file", "image_folder"):
            src = Path(os.path.expanduser(values["source"]))
            values["source"] = str(src if src.is_absolute() else r.base / src)
        cameras[name] = CameraConfig(name=name, **values)
    if not cameras:
        raise r.fail(top["cameras"], "cameras", "at least one camera is needed")

    engines = EnginesConfig(
        **r.fields(
            top.get("engines", _empty()),
            "engines",
            {
                "bundle": r.path,
                "backend": r.string,
                "threads": lambda n, q: r.number(n, q, 0, 256, integer=True),
            },
            (),
        )
    )

    if not isinstance(top["recipes"], yaml.SequenceNode):
        raise r.fail(top["recipes"], "recipes", "must be a list of camera/recipe bindings")
    bindings: list[RecipeBinding] = []
    for i, node in enumerate(top["recipes"].value):
        p = f"recipes[{i}]"
        spec = {
            "camera": r.name,
            "recipe": r.recipe_name,
            "trigger": lambda n, q: r.choice(n, q, TRIGGER_MODES),
            "fps": lambda n, q: r.number(n, q, 0.01, 1000),
            "deadline_ms": lambda n, q: r.number(n, q, 1, 600000),
            "roi": r.roi,
            "bundle": r.path,
            "heatmap": r.boolean,
            "settle_ms": lambda n, q: r.number(n, q, 0, 10000),
        }
        values = r.fields(node, p, spec, ("camera", "recipe"))
        nodes = r.mapping(node, p, set(spec))
        if values["camera"] not in cameras:
            raise r.fail(nodes["camera"], f"{p}.camera", f"no camera '{values['camera']}' in cameras")
        if any(b.camera == values["camera"] for b in bindings):
            raise r.fail(nodes["camera"], f"{p}.camera", f"camera '{values['camera']}' already has a recipe")
        if values.get("trigger") == "folder_watch" and cameras[values["camera"]].type != "image_folder":
            raise r.fail(nodes["trigger"], f"{p}.trigger", "folder_watch needs a camera of type image_folder")
        bindings.append(RecipeBinding(**values))

    mqtt_spec: dict[str, Callable[[yaml.Node, str], Any]] = {
        "host": r.string,
        "port": lambda n, q: r.number(n, q, 1, 65535, integer=True),
        "protocol": lambda n, q: r.choice(n, q, PROTOCOLS),
        "prefix": r.name,
        "qos": lambda n, q: r.number(n, q, 0, 1, integer=True),
        "keepalive": lambda n, q: r.number(n, q, 5, 3600, integer=True),
        "client_id": lambda n, q: r.string(n, q, optional=True),
        "username": lambda n, q: r.string(n, q, optional=True),
        "password_file": lambda n, q: r.path(n, q, must_exist=True),
        "tls": lambda n, q: _tls(r, n, q),
        "max_payload_bytes": lambda n, q: r.number(n, q, 256, 256 * 1024 * 1024, integer=True),
    }
    mqtt_node = top.get("mqtt", _empty())
    for key_node, _ in mqtt_node.value if isinstance(mqtt_node, yaml.MappingNode) else ():
        if key_node.value == "password":  # a password in clear would leak with every copy of the file
            raise r.fail(key_node, "mqtt.password", "not accepted in clear; use password_file: PATH "
                         "or the environment variable ANOMALYGPT_EDGE_MQTT_PASSWORD")  # fmt: skip
    mqtt = MqttConfig(**r.fields(mqtt_node, "mqtt", mqtt_spec, ()))

    storage = StorageConfig(
        **r.fields(
            top.get("storage", _empty()),
            "storage",
            {
                "store": r.path,
                "data": r.path,
                "spool": r.boolean,
                "spool_max_rows": lambda n, q: r.number(n, q, 1, 10**9, integer=True),
                "spool_max_age_s": lambda n, q: r.number(n, q, 1),
                "archive": r.boolean,
                "archive_quota_mb": lambda n, q: r.number(n, q, 0, 10**9, integer=True),
                "archive_ok_sample_rate": lambda n, q: r.number(n, q, 0, 1),
                "disk_budget_mb": lambda n, q: r.number(n, q, 0, 10**9, integer=True),
                "disk_free_floor_mb": lambda n, q: r.number(n, q, 0, 10**6, integer=True),
                "spool_reserve_mb": lambda n, q: r.number(n, q, 0, 10**5, integer=True),
            },
            (),
        )
    )
    llm_spec: dict[str, Callable[[yaml.Node, str], Any]] = {
        "enabled": r.boolean,
        "model": lambda n, q: r.path(n, q, must_exist=True),
        "threads": lambda n, q: r.number(n, q, 1, 256, integer=True),
        "explain": lambda n, q: r.choice(n, q, EXPLAIN_WHEN),
        "max_queue": lambda n, q: r.number(n, q, 1, 1000, integer=True),
    }
    llm = LlmConfig(**r.fields(top.get("llm", _empty()), "llm", llm_spec, ()))
    health_spec: dict[str, Callable[[yaml.Node, str], Any]] = {
        "heartbeat_s": lambda n, q: r.number(n, q, 0.5, 3600),
        "metrics_bind": lambda n, q: r.string(n, q, optional=True),
    }
    health = HealthConfig(**r.fields(top.get("health", _empty()), "health", health_spec, ()))
    commands = CommandsConfig(
        **r.fields(
            top.get("commands", _empty()),
            "commands",
            {
                "privileged": lambda n, q: _names(r, n, q, allowed=("trigger", "enroll", "recipe", "ask")),
                "allowed_client_ids": lambda n, q: _names(r, n, q),
                "token_file": lambda n, q: r.path(n, q, must_exist=True),
                "allow_anonymous_control": r.boolean,
                "enroll_session_timeout_s": lambda n, q: r.number(n, q, 1, 86400),
            },
            (),
        )
    )
    limits = LimitsConfig(
        **r.fields(
            top.get("limits", _empty()),
            "limits",
            {"max_image_pixels": lambda n, q: r.number(n, q, 1, integer=True)},
            (),
        )
    )
    return DaemonConfig(
        device_id=device["id"],
        cameras=cameras,
        recipes=bindings,
        engines=engines,
        mqtt=mqtt,
        storage=storage,
        llm=llm,
        health=health,
        commands=commands,
        limits=limits,
        source=origin,
    )


def _names(r: _Reader, node: yaml.Node, path: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    if isinstance(node, yaml.ScalarNode) and r.scalar(node, path) is None:
        return None
    if not isinstance(node, yaml.SequenceNode):
        raise r.fail(node, path, "must be a list of strings")
    names = tuple(r.string(n, f"{path}[{i}]") or "" for i, n in enumerate(node.value))
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise r.fail(node, path, f"unknown {bad}; allowed: {', '.join(allowed or ())}")
    return names


def _tls(r: _Reader, node: yaml.Node, path: str) -> TlsConfig | None:
    if isinstance(node, yaml.ScalarNode) and r.scalar(node, path) is None:
        return None
    spec = {
        "ca": lambda n, q: r.path(n, q, must_exist=True),
        "cert": lambda n, q: r.path(n, q, must_exist=True),
        "key": lambda n, q: r.path(n, q, must_exist=True),
        "check_hostname": r.boolean,
    }
    values = r.fields(node, path, spec, ())
    if ("cert" in values) != ("key" in values):
        raise r.fail(node, path, "cert and key go together (client certificate and its private key)")
    return TlsConfig(**values)


def _pairs(r: _Reader, node: yaml.Node, path: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise r.fail(node, path, "must be a mapping of names to settings")
    return list(node.value)


def _empty() -> yaml.MappingNode:
    return yaml.MappingNode("tag:yaml.org,2002:map", [])
