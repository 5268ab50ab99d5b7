"""Health: rolling per-camera figures, the status heartbeat, Prometheus ``/metrics`` and systemd
notifications — all with the standard library.

* :class:`Health` collects per-camera frame times and latencies over a rolling window (fps,
  p50/p99), queue depths, camera states, the engine backend and the last error, plus any number
  of named *sources* (callables returning dicts: the spool's and archive's stats, the command
  gate's counters). :meth:`Health.snapshot` is the retained status heartbeat's body.
* :class:`MetricsServer` serves the same snapshot as Prometheus text exposition on ``/metrics``
  (and ``/healthz``) from ``http.server`` on a configurable bind address; off unless configured.
* :class:`SystemdNotifier` speaks the ``sd_notify`` datagram protocol on ``$NOTIFY_SOCKET``
  (``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1``) with :mod:`socket`: no libsystemd
  binding to install, and a no-op when not started by systemd.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 10.0
#: Latency samples kept per camera: enough for p99 over 10 s at 100 fps.
MAX_SAMPLES = 2048
METRIC_PREFIX = "anomalygpt_edge"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values``; None when empty.

    Nearest-rank rather than interpolation: a reported p99 is a latency that really happened.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class _CameraWindow:
    """Frames and latencies of one camera within the rolling window."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (t, latency_ms)
        self.frames = 0
        self.verdicts: Counter[str] = Counter()
        self.state = "unknown"
        self.last_frame_at: float | None = None

    def add(self, t: float, latency_ms: float | None, verdict: str | None) -> None:
        self.frames += 1
        self.last_frame_at = t
        if verdict:
            self.verdicts[verdict] += 1
        if latency_ms is not None and math.isfinite(latency_ms):
            self.samples.append((t, float(latency_ms)))

    def figures(self, now: float) -> dict[str, Any]:
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        lat = [s[1] for s in self.samples]
        # fps over the span actually covered, so a camera that just started is not under-reported.
        span = min(self.window_s, now - self.samples[0][0]) if self.samples else 0.0
        fps = (len(lat) - 1) / span if len(lat) > 1 and span > 0 else 0.0
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        return {
            "state": self.state,
            "fps": round(fps, 2),
            "latency_ms": {
                "p50": None if p50 is None else round(p50, 2),
                "p99": None if p99 is None else round(p99, 2),
            },
            "frames": self.frames,
            "verdicts": dict(self.verdicts),
            "last_frame_age_s": None if self.last_frame_at is None else round(now - self.last_frame_at, 3),
        }


class Health:
    """Thread-safe collector of the daemon's health figures."""

    def __init__(
        self,
        device: str,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.device = device
        self.window_s = window_s
        self._clock = clock
        self._wall = wall_clock
        self._started = clock()
        self._lock = threading.Lock()
        self._cameras: dict[str, _CameraWindow] = {}
        self._queues: dict[str, int] = {}
        self._sources: dict[str, Callable[[], Mapping[str, Any]]] = {}
        self._engine_backend: str | None = None
        self._last_error: dict[str, Any] | None = None
        self._errors = 0
        self.extra: dict[str, Any] = {}  # static facts for the heartbeat (version, bundle hash …)

    def _camera(self, camera: str) -> _CameraWindow:
        if camera not in self._cameras:
            self._cameras[camera] = _CameraWindow(self.window_s)
        return self._cameras[camera]

    def frame(self, camera: str, latency_ms: float | None = None, verdict: str | None = None) -> None:
        """Count one inspected frame of ``camera`` with its capture→verdict latency."""
        with self._lock:
            self._camera(camera).add(self._clock(), latency_ms, verdict)

    def camera_state(self, camera: str, state: str) -> None:
        """``open``, ``reconnecting``, ``lost`` …: shown per camera in the heartbeat."""
        with self._lock:
            self._camera(camera).state = state

    def queue_depth(self, name: str, depth: int) -> None:
        with self._lock:
            self._queues[name] = int(depth)

    def engine_backend(self, backend: str | None) -> None:
        with self._lock:
            self._engine_backend = backend

    def error(self, message: str, camera: str | None = None) -> None:
        """Remember the last error (and count errors) for the heartbeat."""
        with self._lock:
            self._errors += 1
            self._last_error = {
                "message": str(message)[:500],
                "camera": camera,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._wall())),
            }

    def add_source(self, name: str, source: Callable[[], Mapping[str, Any]]) -> None:
        """Include ``source()`` under ``name`` in every snapshot (e.g. ``spool`` → ``spool.stats``)."""
        with self._lock:
            self._sources[name] = source

    def snapshot(self) -> dict[str, Any]:
        """The heartbeat: per-camera fps/latency/verdicts, queues, sources, backend, last error."""
        with self._lock:
            now = self._clock()
            out: dict[str, Any] = {
                "device": self.device,
                "state": "online",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._wall())),
                "uptime_s": round(now - self._started, 1),
                "engine_backend": self._engine_backend,
                "cameras": {name: cam.figures(now) for name, cam in sorted(self._cameras.items())},
                "queues": dict(self._queues),
                "errors": self._errors,
                "last_error": self._last_error,
                **self.extra,
            }
            sources = dict(self._sources)
        for name, source in sources.items():
            try:
                out[name] = dict(source())
            except Exception as exc:  # a broken source must not silence the heartbeat
                out[name] = {"error": repr(exc)}
        return out

    def status_line(self, snapshot: Mapping[str, Any] | None = None) -> str:
        """One line for systemd's ``STATUS=`` (shown by ``systemctl status``)."""
        snap = snapshot or self.snapshot()
        cams = snap.get("cameras", {})
        fps = sum(c.get("fps") or 0 for c in cams.values())
        parts = [f"{len(cams)} camera(s)", f"{fps:.1f} fps"]
        spool = snap.get("spool")
        if isinstance(spool, Mapping) and "depth" in spool:
            parts.append(f"spool {spool['depth']}")
        if snap.get("last_error"):
            parts.append(f"last error: {snap['last_error']['message'][:80]}")
        return ", ".join(parts)


# -- Prometheus text exposition ---------------------------------------------------------------------


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_name(*parts: str) -> str:
    name = "_".join(p for p in parts if p)
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def prometheus_text(snapshot: Mapping[str, Any]) -> str:
    """The snapshot in Prometheus text exposition format 0.0.4.

    Per-camera figures get a ``camera`` label; every numeric field of a source (``spool``,
    ``archive``, ``commands`` …) becomes ``anomalygpt_edge_<source>_<field>``, a nested dict of
    numbers a label ``key``.
    """
    lines: list[str] = []
    seen: set[str] = set()

    def emit(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        name = _metric_name(METRIC_PREFIX, name)
        if name not in seen:
            seen.add(name)
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {_fmt(value)}" if text else f"{name} {_fmt(value)}")

    emit("up", "gauge", "1 while the daemon runs", [({}, 1)])
    emit(
        "info",
        "gauge",
        "device and engine backend",
        [({"device": snapshot.get("device"), "engine_backend": snapshot.get("engine_backend") or ""}, 1)],
    )
    emit("uptime_seconds", "gauge", "seconds since start", [({}, float(snapshot.get("uptime_s", 0)))])
    emit("errors_total", "counter", "errors since start", [({}, float(snapshot.get("errors", 0)))])
    cams: Mapping[str, Any] = snapshot.get("cameras", {})
    emit(
        "camera_fps",
        "gauge",
        "inspected frames per second (rolling)",
        [({"camera": c}, v["fps"]) for c, v in cams.items()],
    )
    emit(
        "camera_latency_ms",
        "summary",
        "capture to verdict latency, rolling window",
        [
            ({"camera": c, "quantile": q}, v["latency_ms"][k])
            for c, v in cams.items()
            for q, k in (("0.5", "p50"), ("0.99", "p99"))
            if v["latency_ms"][k] is not None
        ],
    )
    emit("camera_frames_total", "counter", "frames inspected", [({"camera": c}, v["frames"]) for c, v in cams.items()])
    emit(
        "verdicts_total",
        "counter",
        "verdicts by kind",
        [({"camera": c, "verdict": k}, n) for c, v in cams.items() for k, n in sorted(v["verdicts"].items())],
    )
    emit(
        "camera_up",
        "gauge",
        "1 when the camera is delivering frames",
        [({"camera": c}, 1.0 if v["state"] in ("open", "ok", "running") else 0.0) for c, v in cams.items()],
    )
    emit(
        "queue_depth",
        "gauge",
        "items waiting per queue",
        [({"queue": q}, n) for q, n in sorted(snapshot.get("queues", {}).items())],
    )
    for source, data in snapshot.items():
        if source in ("cameras", "queues", "last_error") or not isinstance(data, Mapping):
            continue
        for key, value in data.items():
            if (num := _number(value)) is not None:
                emit(f"{source}_{key}", "gauge", f"{source} {key}", [({}, num)])
            elif isinstance(value, Mapping):
                samples = [({"key": k}, n) for k, v in sorted(value.items()) if (n := _number(v)) is not None]
                if samples:
                    emit(f"{source}_{key}", "gauge", f"{source} {key}", samples)
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON snapshot) on ``host:port``.

    Bind to 127.0.0.1 unless the scraper is remote: the figures name cameras and recipes.
    Port 0 picks a free port (see :attr:`port`).
    """

    def __init__(self, health: Health, bind: str = "127.0.0.1:9108"):
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics bind must be HOST:PORT, got {bind!r}")
        snapshot = health.snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                import json

                if self.path.split("?")[0] == "/metrics":
                    body = prometheus_text(snapshot()).encode()
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif self.path.split("?")[0] == "/healthz":
                    body = json.dumps(snapshot(), default=str).encode()
                    ctype = "application/json"
                else:
                    self.send_error(404, "try /metrics or /healthz")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:  # scrapes every 15 s: keep them out of the journal
                log.debug("metrics: " + fmt, *args)

        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(5)


# -- systemd notification ---------------------------------------------------------------------------


class SystemdNotifier:
    """``sd_notify`` over the ``$NOTIFY_SOCKET`` unix datagram socket; silent when not under systemd.

    The watchdog interval comes from ``$WATCHDOG_USEC`` (only when ``$WATCHDOG_PID`` is unset or
    ours, as sd_watchdog_enabled does). :meth:`ping_watchdog` is meant to be called from every
    pipeline-loop iteration and sends at most one ``WATCHDOG=1`` per half interval.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        env = os.environ if environ is None else environ
        self.socket_path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET") or None
        self._clock = clock
        self._last_ping: float | None = None
        self.watchdog_interval_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def _address(self) -> str:
        path = self.socket_path or ""
        # "@name" is a socket in the abstract namespace: a leading NUL byte on the wire.
        return "\0" + path[1:] if path.startswith("@") else path

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not under systemd or the send failed."""
        if not self.enabled:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._address())
        except OSError as exc:
            # Never fatal: systemd may be restarting; the watchdog will tell if it matters.
            self.failed += 1
            log.debug("sd_notify failed: %s", exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` and an optional status line (sent by the main process: NotifyAccess=main)."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={status}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def ping_watchdog(self) -> bool:
        """``WATCHDOG=1`` if the watchdog is on and half its interval has passed since the last ping."""
        if not self.enabled or self.watchdog_interval_s is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_interval_s / 2:
            return False
        self._last_ping = now
        return self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
