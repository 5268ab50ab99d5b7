"""Health: rolling fps and latency percentiles, the heartbeat, Prometheus /metrics over real HTTP,
and sd_notify over a real unix datagram socket."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from anomalygpt_edge.runtime.line.health import (
    CAMERA_UP_STATES,
    Health,
    MetricsServer,
    SystemdNotifier,
    percentile,
    prometheus_text,
)
from anomalygpt_edge.runtime.line.states import CAMERA_STATES


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_percentiles_are_nearest_rank_values_that_happened() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_per_camera_fps_and_latency_over_the_rolling_window() -> None:
    clock = Clock()
    h = Health("line1", window_s=10, clock=clock)
    for i in range(101):  # 10 fps for 10 s, latency 20 ms except every 50th frame
        h.frame("cam1", latency_ms=90.0 if i % 50 == 0 else 20.0, verdict="NG" if i % 10 == 0 else "OK")
        clock.t += 0.1
    clock.t -= 0.1
    cam = h.snapshot()["cameras"]["cam1"]
    assert cam["fps"] == pytest.approx(10.0, rel=0.02)
    assert cam["latency_ms"] == {"p50": 20.0, "p99": 90.0}
    assert cam["frames"] == 101 and cam["verdicts"] == {"NG": 11, "OK": 90}
    clock.t += 30  # the window empties when frames stop
    assert h.snapshot()["cameras"]["cam1"]["fps"] == 0.0
    assert h.snapshot()["cameras"]["cam1"]["latency_ms"] == {"p50": None, "p99": None}


def test_heartbeat_carries_queues_sources_backend_and_last_error() -> None:
    h = Health("line1")
    h.engine_backend("onnxruntime")
    h.queue_depth("cam1.frames", 1)
    h.camera_state("cam1", "reconnecting")
    h.add_source("spool", lambda: {"depth": 3, "dropped_full": 0})
    h.add_source("broken", lambda: 1 / 0)
    h.error("camera cam1 lost", camera="cam1")
    snap = h.snapshot()
    assert snap["engine_backend"] == "onnxruntime" and snap["queues"] == {"cam1.frames": 1}
    assert snap["spool"] == {"depth": 3, "dropped_full": 0}
    assert "ZeroDivisionError" in snap["broken"]["error"]
    assert snap["last_error"]["message"] == "camera cam1 lost" and snap["errors"] == 1
    assert snap["cameras"]["cam1"]["state"] == "reconnecting"
    json.dumps(snap)  # the heartbeat is JSON as is
    assert h.status_line(snap) == "1 camera(s), 0.0 fps, spool 3, last error: camera cam1 lost"


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? [-+0-9.eEInfNa]+$')


def test_prometheus_text_is_valid_exposition_with_camera_labels() -> None:
    h = Health("line1")
    h.frame('cam"1', latency_ms=12.0, verdict="OK")
    h.frame('cam"1', latency_ms=14.0, verdict="NG")
    h.add_source("spool", lambda: {"depth": 2, "oldest_age_s": None, "dropped_full": 1})
    h.add_source("commands", lambda: {"rejected": {"malformed_json": 2}, "rejected_total": 2})
    text = prometheus_text(h.snapshot())
    for line in text.splitlines():
        assert line.startswith("# ") or _SAMPLE.match(line), line
    # prometheus_client writes every value as a float ("14.0"): the prefix checks name, labels and value.
    assert 'anomalygpt_edge_camera_latency_ms{camera="cam\\"1",quantile="0.99"} 14' in text
    assert 'anomalygpt_edge_camera_latency_ms_count{camera="cam\\"1"} 2' in text
    assert 'anomalygpt_edge_camera_latency_ms_sum{camera="cam\\"1"} 26' in text
    assert 'anomalygpt_edge_camera_frames_total{camera="cam\\"1"} 2' in text
    assert "# TYPE anomalygpt_edge_camera_frames_total counter" in text
    assert "# TYPE anomalygpt_edge_verdicts_total counter" in text
    assert "# TYPE anomalygpt_edge_errors_total counter" in text
    assert "# TYPE anomalygpt_edge_camera_fps gauge" in text
    assert 'anomalygpt_edge_verdicts_total{camera="cam\\"1",verdict="NG"} 1' in text
    assert "anomalygpt_edge_spool_depth 2" in text and "anomalygpt_edge_spool_dropped_full 1" in text
    assert 'anomalygpt_edge_commands_rejected{key="malformed_json"} 2' in text
    assert "oldest_age_s" not in text  # None is not a number: left out, not written as 0
    assert text.count("# TYPE anomalygpt_edge_camera_latency_ms summary") == 1


def test_latency_sum_and_count_are_cumulative_while_quantiles_roll() -> None:
    clock = Clock()
    h = Health("line1", window_s=10, clock=clock)
    h.frame("cam1", latency_ms=10.0)
    clock.t += 30  # the window has emptied: no quantiles, but _sum/_count never go down
    h.frame("cam1", latency_ms=30.0)
    text = prometheus_text(h.snapshot())
    assert 'anomalygpt_edge_camera_latency_ms{camera="cam1",quantile="0.5"} 30' in text
    assert 'anomalygpt_edge_camera_latency_ms_count{camera="cam1"} 2' in text
    assert 'anomalygpt_edge_camera_latency_ms_sum{camera="cam1"} 40' in text


def test_camera_up_follows_the_camera_vocabulary() -> None:
    h = Health("line1")
    assert set(CAMERA_UP_STATES) <= set(CAMERA_STATES)  # the daemon's words, not a copy of its own
    for i, state in enumerate(CAMERA_STATES):
        h.camera_state(f"cam{i}", state)
    text = prometheus_text(h.snapshot())
    for i, state in enumerate(CAMERA_STATES):
        want = 1 if state in ("online", "watching") else 0
        assert f'anomalygpt_edge_camera_up{{camera="cam{i}"}} {want}' in text, state


def test_camera_up_is_1_for_an_online_camera(tmp_path: Path) -> None:
    """A real image-folder camera reports its status to the daemon's health part the way the daemon
    wires it (``on_status`` -> ``camera_state``); /metrics then says the camera is up."""
    import cv2
    import numpy as np

    from anomalygpt_edge.runtime.cameras.base import Camera, create_source
    from anomalygpt_edge.runtime.line.config import CameraConfig
    from anomalygpt_edge.runtime.line.status import DaemonHealth

    cv2.imwrite(str(tmp_path / "0.png"), np.zeros((8, 8, 3), np.uint8))
    health = DaemonHealth("line1", notifier=SystemdNotifier(environ={}))
    source = create_source(CameraConfig(name="cam1", type="image_folder", source=str(tmp_path), fps=50.0))
    camera = Camera(source, on_status=health.camera_state).start()
    try:
        deadline = time.monotonic() + 10
        while not camera.online:
            assert time.monotonic() < deadline, camera.info()
            time.sleep(0.01)
        snapshot = health.health.snapshot()
        assert snapshot["cameras"]["cam1"]["state"] == camera.status == "online"
        assert 'anomalygpt_edge_camera_up{camera="cam1"} 1' in prometheus_text(snapshot)
    finally:
        camera.stop()
    assert 'anomalygpt_edge_camera_up{camera="cam1"} 0' in prometheus_text(health.health.snapshot())


def test_each_metrics_server_has_its_own_registry() -> None:
    """Two daemons in one process (the tests do this) must not see each other's cameras."""
    a, b = Health("a"), Health("b")
    a.frame("cam_a", 1.0)
    b.frame("cam_b", 1.0)
    sa, sb = MetricsServer(a, "127.0.0.1:0"), MetricsServer(b, "127.0.0.1:0")
    try:
        assert sa.registry is not sb.registry
        ta, tb = generate_latest(sa.registry).decode(), generate_latest(sb.registry).decode()
        assert 'camera="cam_a"' in ta and 'camera="cam_b"' not in ta
        assert 'camera="cam_b"' in tb and 'camera="cam_a"' not in tb
    finally:
        sa.stop()
        sb.stop()


def test_metrics_endpoint_serves_prometheus_text_and_json_over_http() -> None:
    h = Health("line1")
    h.frame("cam1", latency_ms=5.0, verdict="OK")
    server = MetricsServer(h, "127.0.0.1:0").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert 'anomalygpt_edge_camera_frames_total{camera="cam1"} 1' in resp.read().decode()
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert json.loads(resp.read())["device"] == "line1"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nope", timeout=5)
        assert err.value.code == 404
    finally:
        server.stop()


def test_metrics_bind_must_be_host_and_port() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        MetricsServer(Health("d"), "9108")


@pytest.fixture()
def notify_socket(tmp_path: Path):  # noqa: ANN201 - yields a bound socket and its path
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_status_and_stopping_arrive_on_the_notify_socket(notify_socket) -> None:  # noqa: ANN001
    sock, path = notify_socket
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    assert n.enabled and n.ready("loading done")
    assert sock.recv(4096).decode().split("\n") == ["READY=1", "STATUS=loading done"]
    assert n.status("2 cameras\nspool 0")
    assert sock.recv(4096) == b"STATUS=2 cameras spool 0"  # a newline would start a new assignment
    assert n.stopping() and sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_namespace_notify_socket_is_supported() -> None:
    name = f"anomalygpt-edge-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_watchdog_pings_are_rate_limited_to_half_the_interval(notify_socket) -> None:  # noqa: ANN001
    sock, path = notify_socket
    clock = Clock()
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=clock)
    assert n.watchdog_interval_s == 2.0
    sent = []
    for _ in range(40):  # 4 s of a 10 Hz pipeline loop
        sent.append(n.ping_watchdog())
        clock.t += 0.1
    assert sum(sent) == 4  # t = 0, 1, 2, 3 s
    assert [sock.recv(64) for _ in range(4)] == [b"WATCHDOG=1"] * 4


def test_watchdog_for_another_pid_is_ignored(notify_socket) -> None:  # noqa: ANN001
    _, path = notify_socket
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval_s is None and n.ping_watchdog() is False


def test_without_systemd_notifications_are_silent_no_ops(tmp_path: Path) -> None:
    n = SystemdNotifier(environ={})
    assert not n.enabled and n.ready() is False and n.ping_watchdog() is False
    gone = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert gone.ready() is False and gone.failed == 1  # counted, never raised
