"""Daemon health wiring: the watchdog is fed only while every pipeline loop is alive, the heartbeat
republishes the status with rolling figures merged in, and a busy metrics port is an error, not a crash."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from anomalygpt_edge.runtime.line.health import SystemdNotifier
from anomalygpt_edge.runtime.line.status import DaemonHealth


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def notify(tmp_path: Path):  # noqa: ANN201 - yields (socket, path)
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_watchdog_is_fed_only_while_every_pipeline_loop_ticks(notify) -> None:  # noqa: ANN001
    sock, path = notify
    clock = Clock()
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=clock)
    h = DaemonHealth("d", notifier=notifier, clock=clock)
    for _ in range(20):  # 2 s, both workers alive
        h.tick("inspect-0")
        h.tick("inspect-1")
        clock.t += 0.1
    alive = drain(sock).count(b"WATCHDOG=1")
    for _ in range(10):  # inspect-1 hangs inside an engine call: half an interval of grace ...
        h.tick("inspect-0")
        clock.t += 0.1
    drain(sock)
    for _ in range(30):  # ... then no ping at all, however busy inspect-0 is
        h.tick("inspect-0")
        clock.t += 0.1
    hung = drain(sock).count(b"WATCHDOG=1")
    assert alive == 2 and hung == 0  # systemd kills and restarts after WatchdogSec without a ping
    h.forget_loop("inspect-1")  # a loop that ends at shutdown does not hold back the others
    h.tick("inspect-0")
    assert drain(sock) == [b"WATCHDOG=1"]


def test_ready_and_stopping_reach_systemd(notify) -> None:  # noqa: ANN001
    sock, path = notify
    h = DaemonHealth("d", notifier=SystemdNotifier(environ={"NOTIFY_SOCKET": path}))
    h.ready()
    h.stop()
    msgs = drain(sock)
    assert msgs[0].startswith(b"READY=1\nSTATUS=0 camera(s)") and msgs[-1] == b"STOPPING=1"


def test_status_merges_rolling_figures_sources_and_the_last_error() -> None:
    h = DaemonHealth("d", notifier=SystemdNotifier(environ={}))
    h.add_source("archive", lambda: {"images_evicted": 3})
    for latency in (10.0, 12.0, 30.0):
        h.frame("cam1", latency, "OK")
    h.camera_state("cam1", "reconnecting", "folder gone")
    base = {"state": "online", "cameras": {"cam1": {"status": "reconnecting", "fps": 10}}, "spool": {"depth": 0}}
    doc = h.status(base)
    cam = doc["cameras"]["cam1"]
    assert cam["status"] == "reconnecting" and cam["fps"] == 10  # the daemon's own fields stay
    assert cam["latency_ms"] == {"p50": 12.0, "p99": 30.0} and cam["verdicts"] == {"OK": 3}
    assert doc["archive"] == {"images_evicted": 3} and doc["spool"] == {"depth": 0}
    assert doc["last_error"]["message"] == "camera cam1 reconnecting: folder gone" and doc["errors"] == 1


def test_heartbeat_republishes_the_status_periodically() -> None:
    h = DaemonHealth("d", heartbeat_s=0.05, notifier=SystemdNotifier(environ={}))
    published: list[dict] = []
    got = threading.Event()

    def publish(doc: dict) -> None:
        published.append(doc)
        if len(published) >= 3:
            got.set()

    h.start(lambda: h.status({"state": "online", "cameras": {}}), publish)
    try:
        assert got.wait(5)
    finally:
        h.stop()
    assert all(d["state"] == "online" and "uptime_s" in d for d in published)


def test_a_busy_metrics_port_is_reported_not_fatal() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        h = DaemonHealth("d", metrics_bind=f"127.0.0.1:{port}", notifier=SystemdNotifier(environ={}))
        h.start(lambda: {}, lambda doc: None)
        h.stop()
    assert h.metrics is None and "metrics endpoint" in h.status({})["last_error"]["message"]


def test_metrics_endpoint_serves_when_configured() -> None:
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = DaemonHealth("d", metrics_bind=f"127.0.0.1:{port}", notifier=SystemdNotifier(environ={}))
    h.frame("cam1", 5.0, "NG")
    h.start(lambda: {}, lambda doc: None)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    text = resp.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        h.stop()
    assert 'anomalygpt_edge_verdicts_total{camera="cam1",verdict="NG"} 1' in text


def test_every_state_a_camera_reports_is_a_word_of_the_one_camera_vocabulary() -> None:
    import inspect
    import re

    from anomalygpt_edge.runtime.cameras import base as cameras_base
    from anomalygpt_edge.runtime.line import status_report
    from anomalygpt_edge.runtime.line.states import CAMERA_NOT_FAULTY, CAMERA_SERVING, CAMERA_STATES

    reported = set(re.findall(r'_set_status\("([^"]+)"', inspect.getsource(cameras_base)))
    reported |= set(re.findall(r'self\.status = "([^"]+)"', inspect.getsource(cameras_base)))
    reported |= set(re.findall(r'"(watching|folder missing|starting|stopped)"', inspect.getsource(status_report)))
    assert reported and reported <= set(CAMERA_STATES), reported - set(CAMERA_STATES)
    assert CAMERA_SERVING <= CAMERA_NOT_FAULTY <= set(CAMERA_STATES)


def test_a_lost_camera_is_an_error_and_a_serving_one_is_not() -> None:
    health = DaemonHealth("dev")
    health.camera_state("cam1", "online")
    assert health.health.snapshot()["errors"] == 0
    health.camera_state("cam1", "reconnecting", "grabbing failed")
    assert health.health.snapshot()["errors"] == 1
