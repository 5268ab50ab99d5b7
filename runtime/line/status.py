"""The daemon's health wiring: heartbeat on the status topic, systemd notifications from the
pipeline loops, and the optional Prometheus endpoint (the pieces live in ``runtime/line/health.py``).

The daemon calls, from its own threads:

* :meth:`DaemonHealth.frame` for every published verdict (fps, latency p50/p99, verdict counts);
* :meth:`DaemonHealth.camera_state` when a camera's status changes (lost cameras are errors);
* :meth:`DaemonHealth.tick` from every pipeline loop iteration (the loops wake at least every
  0.2 s even when idle). ``WATCHDOG=1`` is sent only while **every** registered loop has ticked
  within half the watchdog interval, so one hung inspection worker is enough for systemd to
  restart the daemon — a timer thread pinging on its own would hide exactly that;
* :meth:`DaemonHealth.watch_thread` for threads that do not tick (verdict sender, deadline
  watchdog, archive writer, paho's network thread) and :meth:`DaemonHealth.mark_dead` for a loop
  given up on: while any of them is dead no ``WATCHDOG=1`` is sent either, and the status lists it.

:meth:`DaemonHealth.status` merges the rolling figures into the daemon's retained status document;
a heartbeat thread republishes it every ``heartbeat_s`` seconds and mirrors a one-line summary
into systemd's ``STATUS=``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from anomalygpt_edge.runtime.line.health import Health, MetricsServer, SystemdNotifier
from anomalygpt_edge.runtime.line.states import CAMERA_NOT_FAULTY, CameraState

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 10.0


class DaemonHealth:
    """Health figures, heartbeat, watchdog and metrics for one daemon."""

    def __init__(
        self,
        device: str,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        metrics_bind: str | None = None,
        notifier: SystemdNotifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.health = Health(device, clock=clock)
        self.heartbeat_s = float(heartbeat_s)
        self.notifier = notifier or SystemdNotifier()
        self._clock = clock
        self._metrics_bind = metrics_bind
        self.metrics: MetricsServer | None = None
        self._ticks: dict[str, float] = {}
        self._tick_lock = threading.Lock()
        self._watched: dict[str, Callable[[], threading.Thread | None]] = {}
        self._dead: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish: Callable[[dict[str, Any]], None] | None = None
        self._status: Callable[[], dict[str, Any]] | None = None

    # -- wiring ----------------------------------------------------------------------------------

    def add_source(self, name: str, source: Callable[[], Mapping[str, Any]]) -> None:
        """Report ``source()`` under ``name`` (spool, archive, command gate …) in every heartbeat."""
        self.health.add_source(name, source)

    def start(self, status: Callable[[], dict[str, Any]], publish: Callable[[dict[str, Any]], None]) -> None:
        """Start the heartbeat (``publish(status())`` every ``heartbeat_s``) and the metrics endpoint."""
        self._status, self._publish = status, publish
        if self._metrics_bind:
            try:
                self.metrics = MetricsServer(self.health, self._metrics_bind).start()
                log.info("metrics on http://%s/metrics", self._metrics_bind)
            except (OSError, ValueError) as exc:  # a busy port must not stop inspection
                self.health.error(f"metrics endpoint {self._metrics_bind} not started: {exc}")
                log.warning("metrics endpoint %s not started: %s", self._metrics_bind, exc)
        self._thread = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._thread.start()

    def ready(self) -> None:
        """Engines loaded, threads running: tell systemd (``Type=notify``)."""
        self.notifier.ready(self.health.status_line())

    def stop(self) -> None:
        self.notifier.stopping()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self.metrics is not None:
            self.metrics.stop()
        self.notifier.close()

    # -- called by the daemon --------------------------------------------------------------------

    def frame(self, camera: str, latency_ms: float | None, verdict: str | None) -> None:
        self.health.frame(camera, latency_ms, verdict)

    def camera_state(self, camera: str, state: CameraState | str, reason: str | None = None) -> None:
        """A camera's new state (one of :data:`~anomalygpt_edge.runtime.line.states.CameraState`);
        a state that is a fault (``reconnecting``, ``ended``, ``folder missing``) is also an error."""
        self.health.camera_state(camera, state)
        if state not in CAMERA_NOT_FAULTY:
            self.health.error(f"camera {camera} {state}" + (f": {reason}" if reason else ""), camera=camera)

    def error(self, message: str, camera: str | None = None) -> None:
        self.health.error(message, camera)

    def tick(self, loop: str) -> None:
        """One iteration of pipeline loop ``loop``; pings the watchdog while every loop is alive
        and no watched thread is dead."""
        now = self._clock()
        with self._tick_lock:
            self._ticks[loop] = now
            interval = self.notifier.watchdog_interval_s
            if interval is None:
                return
            alive = all(now - t < interval / 2 for t in self._ticks.values())
        if alive and not self.dead_threads():
            self.notifier.ping_watchdog()

    def watch_thread(self, name: str, thread: Callable[[], threading.Thread | None]) -> None:
        """Count ``thread()`` as dead once it has started and is no longer alive (while not stopping)."""
        with self._tick_lock:
            self._watched[name] = thread

    def mark_dead(self, name: str, reason: str) -> None:
        """A loop that was given up on: no more watchdog pings, and the status says so."""
        with self._tick_lock:
            self._dead[name] = reason

    def dead_threads(self) -> dict[str, str]:
        """Name -> reason for every thread that died (empty while stopping: they end on purpose)."""
        if self._stop.is_set():
            return {}
        with self._tick_lock:
            dead = dict(self._dead)
            watched = list(self._watched.items())
        for name, getter in watched:
            try:
                t = getter()
            except Exception:
                continue
            if t is not None and t.ident is not None and not t.is_alive():
                dead.setdefault(name, "thread ended")
        return dead

    def forget_loop(self, loop: str) -> None:
        """A loop that ended on purpose (shutdown) no longer holds back the watchdog."""
        with self._tick_lock:
            self._ticks.pop(loop, None)

    # -- status ----------------------------------------------------------------------------------

    def status(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (the daemon's status document) with the rolling health figures merged in."""
        snap = self.health.snapshot()
        out = dict(base)
        cams = {name: dict(info) for name, info in (base.get("cameras") or {}).items()}
        for name, figures in snap.pop("cameras", {}).items():
            entry = cams.setdefault(name, {})
            for key in ("fps", "latency_ms", "frames", "verdicts", "last_frame_age_s"):
                entry[key if key != "fps" else "inspected_fps"] = figures[key]
        out["cameras"] = cams
        for key in ("uptime_s", "errors", "last_error", "queues", "time"):
            out[key] = snap.pop(key, None)
        for key, value in snap.items():  # sources: spool, archive, commands …
            if key not in ("device", "state", "engine_backend") and out.get(key) is None:
                out[key] = value
        return out

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                assert self._status is not None and self._publish is not None
                doc = self._status()
                self._publish(doc)
                line = self.health.status_line()
                if doc.get("state") == "degraded":  # `systemctl status` shows why, first
                    line = "DEGRADED: " + "; ".join(doc.get("problems") or [])[:300] + " | " + line
                self.notifier.status(line)
            except Exception as exc:  # the heartbeat must outlive any one bad status
                log.warning("heartbeat failed: %s", exc)
                self.health.error(f"heartbeat failed: {exc!r}")  # the next heartbeat carries it
