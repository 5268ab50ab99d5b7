"""The CameraSource interface, its registry, and :class:`Camera`: a grabbing thread per source.

A source only knows how to open, read one frame and close. :class:`Camera` runs the grabbing
thread around it: it keeps only the newest frame (a slow inspection never builds a backlog of old
frames), stamps each with the capture time and a sequence number, and reopens a source that drops
with exponential backoff, reporting its status (``starting``, ``online``, ``reconnecting``,
``ended``, ``stopped``) to a callback so the daemon can tell the PLC.

The grabbing loop may be started through a ``spawn`` callable (the daemon's last-resort handler,
:meth:`Daemon._spawn`): an exception the loop did not expect (a source's bug, not a
:class:`CameraError`) closes the source, says ``reconnecting`` with the reason, and propagates to
that handler, which records it and runs the loop again; the loop reopens the source.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from anomalygpt_edge.runtime.values import Between, Flag, Name, Text, resolve_path

log = logging.getLogger(__name__)


class CameraError(RuntimeError):
    """A source that cannot be opened or read; the message says which and why."""


class EndOfStreamError(CameraError):
    """A finite source (a video file or folder without ``loop``) has no more frames."""


@dataclass(frozen=True)
class Frame:
    """One captured image. ``captured_at`` is wall-clock (epoch seconds, for the PLC and latency
    measured by other processes); ``captured_mono`` is monotonic (for deadlines inside the daemon)."""

    image: np.ndarray
    seq: int
    captured_at: float
    captured_mono: float
    camera: str
    name: str | None = None  # file name, for sources that replay files


if TYPE_CHECKING:  # pydantic does not export its models' metaclass; at run time it is type(BaseModel)
    from pydantic._internal._model_construction import ModelMetaclass
else:
    ModelMetaclass = type(BaseModel)


class _KindCall(ModelMetaclass):
    """``CameraConfig("cam", "video_file", "line.avi", fps=10)``: positional ``name, type, source``
    as before the models were typed, and the base class called with a registered ``type`` builds
    that kind's model. Only calls go through here; validation (which must keep its context, the
    config file's folder) never does."""

    def __call__(cls, *args: Any, **data: Any) -> Any:  # noqa: N805 - a metaclass: its instances are classes
        data.update(zip(("name", "type", "source"), args, strict=False))
        model = cls
        if cls is CameraConfig and isinstance(data.get("type"), str):
            load_sources()
            model = _CONFIGS.get(data["type"], cls)
        return super(_KindCall, model).__call__(**data)  # noqa: UP008 - the kind's class, not cls


class CameraConfig(BaseModel, metaclass=_KindCall):
    """One camera (or replayed source): what every kind shares. Each kind's module declares its own
    subclass with ``type: Literal[<kind>]`` and the keys only it reads; the daemon config joins
    them on ``type`` (:func:`camera_config_union`), so an ``opencv`` key on a video file is an error.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    type: str
    source: Text  # device index, /dev/videoN, URL, GStreamer pipeline, video file or image folder
    fps: Annotated[float, Between(0.1, 1000)] | None = None  # pacing of file sources; requested rate of live cameras
    # backoff after a camera drops: doubles up to reconnect_max_s
    reconnect_min_s: Annotated[float, Between(0.01, 60)] = 0.5
    reconnect_max_s: Annotated[float, Between(0.01, 3600)] = 10.0


class FileCameraConfig(CameraConfig):
    """A camera that replays files: ``source`` is relative to the config file's folder."""

    loop: Flag = True  # start again at the end

    @field_validator("source")
    @classmethod
    def relative_to_config(cls, value: str, info: ValidationInfo) -> str:
        """A relative file or folder is relative to the config file's folder (validation context ``base``)."""
        return str(resolve_path(value, info))


class CameraSource(abc.ABC):
    """One kind of image source. ``read`` blocks until the next frame (pacing is the source's job).

    ``config_model`` is the kind's config model (a :class:`CameraConfig` subclass whose ``type``
    is ``Literal[<kind>]``); :func:`register_source` registers both.
    """

    kind = "abstract"
    config_model: type[CameraConfig] = CameraConfig

    def __init__(self, config: CameraConfig):
        self.config = config

    @abc.abstractmethod
    def open(self) -> None:
        """Open the device/file/folder; raise :class:`CameraError` if it is not there."""

    @abc.abstractmethod
    def read(self) -> tuple[np.ndarray, str | None]:
        """The next image (BGR or gray) and an optional name; raise CameraError when the source dropped."""

    def close(self) -> None:  # noqa: B027 - optional for sources that hold nothing open
        """Release the device; safe to call twice."""

    def describe(self) -> str:
        return f"{self.kind}:{self.config.source}"

    def stats(self) -> dict[str, Any]:
        """Source-specific counters merged into the camera's status (e.g. files skipped)."""
        return {}


_SOURCES: dict[str, type[CameraSource]] = {}
_CONFIGS: dict[str, type[CameraConfig]] = {}


def register_source(key: str) -> Callable[[type[CameraSource]], type[CameraSource]]:
    """Class decorator: make a CameraSource loadable under the config ``type`` ``key``; its
    ``config_model`` joins the config's union of camera kinds."""

    def wrap(cls: type[CameraSource]) -> type[CameraSource]:
        cls.kind = key
        _SOURCES[key] = cls
        _CONFIGS[key] = cls.config_model
        return cls

    return wrap


def load_sources() -> None:
    """Import the kind modules shipped with the runtime (importing one registers it)."""
    # Registration order is the order an unknown ``type`` lists the kinds in.
    from anomalygpt_edge.runtime.cameras import opencv, video_file, image_folder  # noqa: F401, I001


def camera_kinds() -> list[str]:
    """The registered camera ``type`` names, in registration order."""
    load_sources()
    return list(_CONFIGS)


def camera_config_union() -> Any:
    """Every registered kind's config model, joined on ``type`` (pydantic's discriminated union),
    in registration order (the order an unknown ``type`` lists them)."""
    load_sources()
    models = tuple(_CONFIGS.values())
    if len(models) == 1:
        return models[0]
    from typing import Union

    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007 - built at run time


def create_source(config: CameraConfig) -> CameraSource:
    """The source for a camera config; importing the kind modules registers them."""
    load_sources()

    if config.type not in _SOURCES:
        raise CameraError(f"camera {config.name}: unknown type '{config.type}'; known: {', '.join(sorted(_SOURCES))}")
    return _SOURCES[config.type](config)


class Camera:
    """A source with its grabbing thread; readers get the newest frame, never a queue of old ones."""

    def __init__(
        self,
        source: CameraSource,
        on_frame: Callable[[Frame], None] | None = None,
        on_status: Callable[[str, str, str | None], None] | None = None,
    ):
        self.source = source
        self.name = source.config.name
        self.on_frame = on_frame
        self.on_status = on_status
        self.status = "starting"
        self.reason: str | None = None
        self.frames = 0
        self.reconnects = 0
        self._latest: Frame | None = None
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._flowed = False
        self._thread: threading.Thread | None = None

    @property
    def thread_name(self) -> str:
        """The grabbing thread's name (``camera-<name>``)."""
        return f"camera-{self.name}"

    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None) -> Camera:
        """Start grabbing: on a plain thread, or through ``spawn(name, loop)`` (a supervisor that restarts it)."""
        if spawn is not None:
            self._thread = spawn(self.thread_name, self._run)
        else:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._set_status("stopped", None)

    @property
    def online(self) -> bool:
        return self.status == "online"

    def latest(self) -> Frame | None:
        """The newest frame, or None before the first (or while the camera is lost)."""
        with self._cond:
            return self._latest if self.status == "online" else None

    def wait_frame(self, newer_than_seq: int = -1, captured_after: float = 0.0, timeout: float = 1.0) -> Frame | None:
        """Block until a frame newer than ``newer_than_seq`` (and captured after ``captured_after``,
        monotonic) arrives; None on timeout or when the camera is not online."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                f = self._latest
                if (
                    self.status == "online"
                    and f is not None
                    and f.seq > newer_than_seq
                    and f.captured_mono >= captured_after
                ):
                    return f
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)

    def info(self) -> dict[str, Any]:
        """Status for the retained status topic."""
        return {
            "type": self.source.kind,
            "status": self.status,
            "reason": self.reason,
            "frames": self.frames,
            "reconnects": self.reconnects,
            **self.source.stats(),
        }

    # -- the grabbing thread --------------------------------------------------------------------
    def _set_status(self, status: str, reason: str | None) -> None:
        with self._cond:
            changed = status != self.status or reason != self.reason
            self.status, self.reason = status, reason
            if status != "online":
                self._latest = None  # a lost camera's old frame must never pass for the current part
            self._cond.notify_all()
        if changed:
            log.info("camera %s: %s%s", self.name, status, f" ({reason})" if reason else "")
            if self.on_status is not None:
                self.on_status(self.name, status, reason)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            # Not a CameraError: a bug. Release the device and say so before the supervisor
            # (if any) restarts the loop; a trigger waiting for a frame is answered at once.
            with contextlib.suppress(Exception):
                self.source.close()
            if not self._stop.is_set():
                self._set_status("reconnecting", f"grabbing failed: {exc!r}")
            raise

    def _loop(self) -> None:
        cfg = self.source.config
        backoff = cfg.reconnect_min_s
        while not self._stop.is_set():
            try:
                self.source.open()
            except CameraError as exc:
                self._set_status("reconnecting", f"{exc}; retry in {backoff:.1f} s")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, cfg.reconnect_max_s)
                self.reconnects += 1
                continue
            self._flowed = False
            try:
                self._grab_until_dropped()
            except EndOfStreamError as exc:
                self.source.close()
                self._set_status("ended", str(exc))
                return
            except CameraError as exc:
                self.source.close()
                if self._flowed:
                    # Reset the backoff only once frames flowed: a source that opens and then fails
                    # at once must keep backing off instead of spinning.
                    backoff = cfg.reconnect_min_s
                self._set_status("reconnecting", str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, cfg.reconnect_max_s)
                self.reconnects += 1
                continue
            backoff = cfg.reconnect_min_s
        self.source.close()

    def _grab_until_dropped(self) -> None:
        first = True
        while not self._stop.is_set():
            image, name = self.source.read()
            now, mono = time.time(), time.monotonic()
            with self._cond:
                self._seq += 1
                frame = Frame(image, self._seq, now, mono, self.name, name)
                self._latest = frame
                self.frames += 1
                self._cond.notify_all()
            if first:
                self._flowed = True
                self._set_status("online", None)
                first = False
            if self.on_frame is not None:
                self.on_frame(frame)
