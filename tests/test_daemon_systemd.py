"""The daemon under a stand-in for systemd: a real unix datagram socket as ``$NOTIFY_SOCKET``.

``anomalygpt-edge run`` sends READY=1 once it inspects, WATCHDOG=1 from its pipeline loop while
that loop comes round, STATUS= lines, and STOPPING=1 on SIGTERM; a pipeline hung in an engine call
stops the pings, which is what makes systemd (WatchdogSec=) restart it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import faults  # tests/faults.py: bounded condition waits
import pytest
from daemon_fixtures import broker_fixture, line_fixture  # noqa: F401 - fixtures are used by name

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon


def _config(tmp_path: Path, broker: Any, line: dict, trigger: str = "free_run", metrics: str | None = None) -> Path:
    cfg = {
        "device": {"id": "sd"},
        "cameras": {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}},
        "recipes": [{"camera": "cam1", "recipe": "bracket", "trigger": trigger, "fps": 5, "deadline_ms": 2000}],
        "engines": {"bundle": str(line["bundle"]), "backend": "onnxruntime"},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 10},
        "storage": {"store": str(line["store"]), "data": str(tmp_path / "state")},
        "health": {"heartbeat_s": 0.5, "metrics_bind": metrics},
    }
    path = tmp_path / "sd.yaml"
    path.write_text(json.dumps(cfg))
    return path


class NotifySocket:
    """What systemd listens on: collects every datagram with its arrival time."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if text in m.split("\n"):
                    return t
            time.sleep(0.05)
        return None

    def barrier(self, path: Path, timeout: float = 5.0) -> float:
        """Send a marker datagram to this socket and wait until it is recorded; returns its arrival
        time. A datagram socket is FIFO: everything sent before the marker is recorded before it."""
        marker = f"TEST_BARRIER={time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(marker.encode(), str(path))
        arrived = self.wait_for(marker, timeout)
        assert arrived is not None, "the notify socket stopped reading"
        return arrived

    def count(self, text: str, since: float = 0.0) -> int:
        return sum(1 for t, m in list(self.messages) if t >= since and text in m.split("\n"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_run_under_systemd_sends_ready_watchdog_status_and_stopping(tmp_path: Path, broker: Any, line: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(tmp_path, broker, line, metrics=f"127.0.0.1:{port}")
    notify = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomalygpt_edge", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = notify.wait_for("READY=1", 60)
        assert ready is not None, "no READY=1"
        # The sleep is the measurement: how many pings arrive in 3 s (the rate systemd relies on).
        time.sleep(3.0)
        pings = notify.count("WATCHDOG=1", since=ready)
        statuses = [m for _, m in notify.messages if m.startswith("STATUS=")]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        stopping = notify.wait_for("STOPPING=1", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert 4 <= pings <= 8, f"{pings} watchdog pings in 3 s with WatchdogSec=1s"  # every half interval
    # Warm-up first (issue 16): each engine run is announced (STATUS=, EXTEND_TIMEOUT_USEC=) before READY=1.
    order = [m for _, m in notify.messages]
    first_ready = next(i for i, m in enumerate(order) if "READY=1" in m.split("\n"))
    warming = [i for i, m in enumerate(order) if m.startswith("STATUS=warming up bracket")]
    extends = [i for i, m in enumerate(order) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert warming and max(warming) < first_ready, order[: first_ready + 1]
    assert extends and max(extends) < first_ready, order[: first_ready + 1]
    assert any("camera(s)" in s and "fps" in s for s in statuses), statuses
    assert stopping is not None and code == 0
    assert 'anomalygpt_edge_camera_frames_total{camera="cam1"}' in metrics
    assert "anomalygpt_edge_spool_depth" in metrics and "anomalygpt_edge_queue_depth" in metrics


def test_a_hung_inspection_stops_the_watchdog_pings(
    tmp_path: Path, broker: Any, line: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = Daemon(load_config(_config(tmp_path, broker, line))).start()
    release = threading.Event()
    try:
        ready = notify.wait_for("READY=1", 30)
        assert ready is not None
        seen_ready = time.monotonic()
        # Each batch shape's warm-up ended before READY=1 was sent (issue 16).
        assert daemon.slots.warmups and all(w.finished_at < ready and not w.error for w in daemon.slots.warmups)
        assert {w.batch for w in daemon.slots.warmups} >= {1}
        assert faults.wait_until(lambda: notify.count("WATCHDOG=1") >= 2, 10), "pings while the pipeline runs"
        second_ping = sorted(t for t, m in list(notify.messages) if "WATCHDOG=1" in m.split("\n"))[1]
        assert second_ping <= seen_ready + 1.5, "two pings within 1.5 s of READY=1"
        entered = threading.Event()

        def hang(*args: Any, **kwargs: Any) -> None:
            entered.set()
            release.wait(30)  # an engine call that never returns
            raise RuntimeError("released")

        # The line's micro-batched path calls the encoder engine of the camera's pipeline.
        daemon.inspectors["cam1"].pipeline.encoder.run = hang  # type: ignore[method-assign]
        assert entered.wait(10), "the worker never called the engine"
        # Pings sent before the worker entered the call are recorded before the barrier.
        hung_since = notify.barrier(tmp_path / "notify")
        # The sleep is the behaviour: 2.5 s (five ping periods) of silence is what systemd acts on.
        time.sleep(2.5)
        during = notify.count("WATCHDOG=1", since=hung_since)
    finally:
        release.set()
        daemon.stop()
        notify.close()
    assert during == 0, f"{during} pings while the inspection loop was hung"
