"""Health: rolling per-camera figures, the status heartbeat, Prometheus ``/metrics`` and systemd
notifications.

* :class:`Health` collects per-camera frame times and latencies over a rolling window (fps,
  p50/p99), queue depths, camera states, the engine backend and the last error, plus any number
  of named *sources* (callables returning dicts: the spool's and archive's stats, the command
  gate's counters). :meth:`Health.snapshot` is the retained status heartbeat's body.
* :class:`MetricsServer` serves the same snapshot as Prometheus text exposition on ``/metrics``
  (and ``/healthz``) from ``http.server`` on a configurable bind address; off unless configured.
  The text is prometheus_client's: a custom collector (:class:`SnapshotCollector`) turns the
  snapshot into metric families at scrape time, in a registry of the server's own. The drift
  watch's source (``drift``) becomes gauges per camera and recipe (``drift_watch.drift_families``).
* :class:`SystemdNotifier` speaks the ``sd_notify`` datagram protocol on ``$NOTIFY_SOCKET``
  (``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1``) with :mod:`socket`: no libsystemd
  binding to install, and a no-op when not started by systemd.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from anomalygpt_edge.runtime.line.drift_watch import drift_families
from anomalygpt_edge.runtime.line.states import CAMERA_SERVING

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
        # Since start, not per window: the summary's _sum/_count must only ever grow.
        self.latency_sum_ms = 0.0
        self.latency_count = 0

    def add(self, t: float, latency_ms: float | None, verdict: str | None) -> None:
        self.frames += 1
        self.last_frame_at = t
        if verdict:
            self.verdicts[verdict] += 1
        if latency_ms is not None and math.isfinite(latency_ms):
            self.samples.append((t, float(latency_ms)))
            self.latency_sum_ms += float(latency_ms)
            self.latency_count += 1

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
            "latency_sum_ms": round(self.latency_sum_ms, 3),
            "latency_count": self.latency_count,
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
        """The camera's state (a :data:`runtime.line.states.CameraState` word: ``online`` …):
        shown per camera in the heartbeat and as ``camera_up`` in /metrics."""
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


# -- Prometheus exposition (prometheus_client) ------------------------------------------------------

#: Camera states in which parts are served: ``camera_up`` is 1 exactly in these. The one camera
#: vocabulary lives in :mod:`runtime.line.states` (the daemon passes those words to
#: :meth:`Health.camera_state` unchanged), so /metrics cannot drift from the status document.
CAMERA_UP_STATES: frozenset[str] = CAMERA_SERVING

#: Top-level snapshot keys that are not sources of ``<source>_<field>`` gauges.
_NOT_SOURCES = frozenset({"cameras", "queues", "last_error", "drift"})


def _metric_name(*parts: str) -> str:
    name = "_".join(p for p in parts if p)
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _name(suffix: str) -> str:
    return _metric_name(METRIC_PREFIX, suffix)


def _daemon_families(snapshot: Mapping[str, Any]) -> list[Metric]:
    up = GaugeMetricFamily(_name("up"), "1 while the daemon runs", value=1)
    info = InfoMetricFamily(METRIC_PREFIX, "device and engine backend")
    info.add_metric(
        [], {"device": str(snapshot.get("device", "")), "engine_backend": str(snapshot.get("engine_backend") or "")}
    )
    uptime = GaugeMetricFamily(_name("uptime_seconds"), "seconds since start", value=float(snapshot.get("uptime_s", 0)))
    # CounterMetricFamily appends ``_total`` itself: the exposed name is anomalygpt_edge_errors_total.
    errors = CounterMetricFamily(_name("errors"), "errors since start", value=float(snapshot.get("errors", 0)))
    queues = GaugeMetricFamily(_name("queue_depth"), "items waiting per queue", labels=["queue"])
    for queue, depth in sorted((snapshot.get("queues") or {}).items()):
        if (num := _number(depth)) is not None:
            queues.add_metric([str(queue)], num)
    return [up, info, uptime, errors, queues]


def _latency_family(cams: Mapping[str, Mapping[str, Any]]) -> SummaryMetricFamily:
    """Rolling-window p50/p99 as quantiles, with cumulative ``_sum``/``_count`` since start (the
    Prometheus summary convention: ``rate(_sum)/rate(_count)`` is the mean over any range)."""
    name = _name("camera_latency_ms")
    family = SummaryMetricFamily(name, "capture to verdict latency, rolling window", labels=["camera"])
    for camera, figures in cams.items():
        for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
            if (value := figures["latency_ms"][key]) is not None:
                family.add_sample(name, {"camera": camera, "quantile": quantile}, float(value))
        family.add_metric([camera], figures.get("latency_count", 0), figures.get("latency_sum_ms", 0.0))
    return family


def _camera_families(cams: Mapping[str, Mapping[str, Any]]) -> list[Metric]:
    fps = GaugeMetricFamily(_name("camera_fps"), "inspected frames per second (rolling)", labels=["camera"])
    frames = CounterMetricFamily(_name("camera_frames"), "frames inspected", labels=["camera"])
    verdicts = CounterMetricFamily(_name("verdicts"), "verdicts by kind", labels=["camera", "verdict"])
    up = GaugeMetricFamily(_name("camera_up"), "1 when the camera is delivering frames", labels=["camera"])
    for camera, figures in cams.items():
        fps.add_metric([camera], float(figures["fps"]))
        frames.add_metric([camera], float(figures["frames"]))
        for verdict, count in sorted(figures["verdicts"].items()):
            verdicts.add_metric([camera, verdict], float(count))
        up.add_metric([camera], 1.0 if figures["state"] in CAMERA_UP_STATES else 0.0)
    return [fps, _latency_family(cams), frames, verdicts, up]


def _source_families(snapshot: Mapping[str, Any], taken: set[str]) -> list[Metric]:
    """Every numeric field of a source (``spool``, ``archive``, ``commands`` …) as the gauge
    ``anomalygpt_edge_<source>_<field>``; a nested dict of numbers gets a label ``key``.

    Gauges, because a source's fields mix levels (``depth``) and counts (``dropped_full``) and the
    sources do not declare which is which; typing a level as a counter would break ``rate()``.
    A name already taken (by a daemon metric or an earlier source) is skipped, not duplicated.
    """
    out: list[Metric] = []
    for source, data in snapshot.items():
        if source in _NOT_SOURCES or not isinstance(data, Mapping):
            continue
        for key, value in data.items():
            name = _name(f"{source}_{key}")
            if name in taken:
                continue
            if (num := _number(value)) is not None:
                family = GaugeMetricFamily(name, f"{source} {key}", value=num)
            else:
                family = GaugeMetricFamily(name, f"{source} {key}", labels=["key"])
                for k, v in sorted(value.items()) if isinstance(value, Mapping) else ():
                    if (n := _number(v)) is not None:
                        family.add_metric([str(k)], n)
            if family.samples:  # None and text fields are not numbers: left out, not written as 0
                taken.add(name)
                out.append(family)
    return out


def metric_families(snapshot: Mapping[str, Any]) -> list[Metric]:
    """The snapshot as Prometheus metric families: daemon, per-camera (label ``camera``), drift, sources."""
    cams: Mapping[str, Mapping[str, Any]] = snapshot.get("cameras") or {}
    families = _daemon_families(snapshot) + _camera_families(cams) + drift_families(snapshot.get("drift"))
    taken = {f.name for f in families} | {f.name + "_total" for f in families if f.type == "counter"}
    return families + _source_families(snapshot, taken)


class SnapshotCollector(Collector):
    """A custom collector: builds the families from ``snapshot()`` at every scrape, so the figures
    are as fresh as the heartbeat's and nothing is kept twice."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]):
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return metric_families(self._snapshot())


def metrics_registry(snapshot: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one: several daemons may run in one
    process, e.g. the tests) holding only the snapshot collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry


def prometheus_text(snapshot: Mapping[str, Any]) -> str:
    """The snapshot in Prometheus text exposition format 0.0.4, as prometheus_client writes it."""
    return generate_latest(metrics_registry(lambda: snapshot)).decode()


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON snapshot) on ``host:port``.

    Bind to 127.0.0.1 unless the scraper is remote: the figures name cameras and recipes.
    Port 0 picks a free port (see :attr:`port`). A plain ``http.server`` with two routes rather than
    prometheus_client's ``start_http_server``: ``/healthz`` and a 404 for anything else.
    """

    def __init__(self, health: Health, bind: str = "127.0.0.1:9108"):
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics bind must be HOST:PORT, got {bind!r}")
        self.registry = metrics_registry(health.snapshot)
        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), _handler(self.registry, health.snapshot))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the free one picked when the bind said port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        """Serve on a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (also for a server that was never started)."""
        if self._thread is not None:  # shutdown() waits for serve_forever: it would hang otherwise
            self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(5)


def _handler(registry: CollectorRegistry, snapshot: Callable[[], Mapping[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, ctype = generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
            elif path == "/healthz":
                body, ctype = json.dumps(snapshot(), default=str).encode(), "application/json"
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

    return Handler


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

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: the current start-up step may take ``seconds`` more (engine warm-up).

        systemd then waits at least that long from now before TimeoutStartSec= gives up on us.
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

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
