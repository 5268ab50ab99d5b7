"""Fault injection on the whole daemon with a real mosquitto (loopback, free port, bounded loops):

* the broker is SIGKILLed and restarted while frames flow at 10 fps: every verdict id reaches a
  subscriber that is not our code (``mosquitto_sub``), duplicates flagged ``redelivered``;
* the daemon process is SIGKILLed mid-stream (with the broker down, so verdicts are waiting in
  the spool) and restarted: every verdict it had spooled is delivered;
* a small archive quota fills: the daemon keeps inspecting and reports it on the status topic;
* a camera disappears: the heartbeat says so and the daemon carries on.

Figures are printed (run with ``-s``): sent, received, redelivered, lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faults  # tests/faults.py: broker and subscriber processes for fault injection
import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    line_fixture,
)

from anomalygpt_edge.runtime.delivery.archive import Archive
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("mosquitto_sub") is None,
    reason="needs mosquitto and mosquitto_sub (apt packages mosquitto, mosquitto-clients)",
)


def _config(
    path: Path,
    port: int,
    line: dict,
    device: str,
    camera: dict | None = None,
    storage: dict | None = None,
    trigger: str = "free_run",
) -> Path:
    cfg = {
        "device": {"id": device},
        "cameras": {"cam1": camera or {"type": "video_file", "source": str(line["video"]), "fps": 10, "loop": True}},
        "recipes": [{"camera": "cam1", "recipe": "bracket", "trigger": trigger, "fps": 10, "deadline_ms": 2000}],
        "engines": {"bundle": str(line["bundle"]), "backend": "onnxruntime"},
        "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5},
        "storage": {"store": str(line["store"]), "data": str(path.parent / f"{device}-state"), **(storage or {})},
        "health": {"heartbeat_s": 1},
    }
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _wait(pred: Any, timeout: float) -> bool:
    """faults.wait_until, polling every 0.1 s: each poll re-reads the subscriber's whole output."""
    return faults.wait_until(pred, timeout, 0.1)


def _verdicts(sub: Any) -> list[dict]:
    return [m for t, m in sub.messages() if t.endswith("/verdict")]


def _captured_after(sub: Any, epoch: float) -> int:
    """How many verdicts the subscriber has received for frames captured after ``epoch``."""
    return sum((m.get("captured_at_epoch") or 0) > epoch for m in _verdicts(sub))


def test_broker_killed_and_restarted_while_frames_flow_loses_no_verdict(
    tmp_path: Path, line: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = faults.Broker(tmp_path / "broker").start()
    sub = faults.saved_subscriber(broker, "anomalygpt/bk/+/verdict", tmp_path / "sub.txt")
    cfg = load_config(_config(tmp_path / "bk.yaml", broker.port, line, "bk"))
    daemon = Daemon(cfg).start()
    try:
        assert _wait(lambda: len(_verdicts(sub)) >= 20, 20), "verdicts did not start flowing"
        broker.kill()
        spooled_at_kill = daemon.spool.depth()
        assert _wait(lambda: daemon.spool.depth() >= spooled_at_kill + 20, 20), (
            f"20 verdicts were not inspected and spooled with the broker down: {daemon.spool.stats()}"
        )
        broker.start()
        restarted_at = time.time()
        # The daemon reconnects while frames still flow: fresh verdicts arrive beside the backlog.
        assert _wait(lambda: _captured_after(sub, restarted_at) >= 10, 30), (
            f"no verdicts of frames captured after the broker restart arrived: {daemon.link.stats}"
        )
        for cam in daemon.cameras.values():
            cam.stop()  # no new frames: what was inspected must now all arrive
        assert _wait(lambda: daemon.spool.depth() == 0, 30), f"spool not drained: {daemon.spool.stats()}"
        sender = dict(daemon.link.sender.stats)
    finally:
        daemon.stop()
    archived = Archive(cfg.storage.data / "archive").query()
    sent = [r["id"] for r in archived]
    assert sub.wait_for(set(sent), 15)
    sub.stop()
    broker.stop()
    t = faults.tally(sent, _verdicts(sub))
    faults.report(
        capsys,
        t.line("daemon, broker SIGKILL + restart at 10 fps (mosquitto_sub)") + f" sender {sender}",
        "(a copy beyond those the sender published comes from the broker's own QoS 1 redelivery after its crash)",
    )
    assert len(sent) >= 50
    assert t.lost == 0, t.lost_ids
    # The daemon sends each verdict unflagged at most once; every resend carries redelivered: true.
    assert sender["published"] - sender["redelivered"] <= sender["submitted"]


def _spooled_ids(db: Path) -> dict[str, int]:
    # Closed at once: it is polled while the daemon process writes the spool (WAL: readers never block it).
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT verdict_id, attempts FROM spool").fetchall())


def _daemon_process(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "anomalygpt_edge", "run", "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def test_daemon_sigkilled_mid_stream_and_restarted_delivers_everything_it_had_spooled(
    tmp_path: Path, line: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = faults.Broker(tmp_path / "broker").start()
    sub = faults.saved_subscriber(broker, "anomalygpt/dk/+/verdict", tmp_path / "sub.txt")
    config = _config(tmp_path / "dk.yaml", broker.port, line, "dk")
    spool_db = tmp_path / "dk-state" / "spool.db"
    log = tmp_path / "daemon.log"
    proc = _daemon_process(config, log)
    try:
        assert _wait(lambda: len(_verdicts(sub)) >= 15, 40), log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # 1: broker up, mid-stream
        proc.wait(10)
        first_kill = _spooled_ids(spool_db)
        proc = _daemon_process(config, log)
        assert _wait(lambda: len(_verdicts(sub)) >= 30, 40), log.read_text()[-3000:]
        broker.kill()  # 2: broker down, verdicts pile up in the spool ...
        assert _wait(lambda: len(_spooled_ids(spool_db)) >= 20, 30), "verdicts did not pile up in the spool"
        os.kill(proc.pid, signal.SIGKILL)  # ... and the daemon dies with them there
        proc.wait(10)
        second_kill = _spooled_ids(spool_db)
        broker.start()
        proc = _daemon_process(config, log)
        spooled = set(first_kill) | set(second_kill)
        assert sub.wait_for(spooled, 40), f"not delivered after restart: {spooled - {m['id'] for m in _verdicts(sub)}}"
        assert _wait(lambda: not _spooled_ids(spool_db), 20)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    sub.stop()
    broker.stop()
    received = _verdicts(sub)
    t = faults.tally(sorted(spooled), [m for m in received if m["id"] in spooled])
    everything = faults.tally(list(dict.fromkeys(m["id"] for m in received)), received)
    faults.report(
        capsys,
        f"daemon SIGKILL x2: spooled at kill 1 = {len(first_kill)}, at kill 2 (broker down) = {len(second_kill)}",
        t.line("spooled verdicts delivered after the restart"),
        everything.line("all verdicts seen by mosquitto_sub"),
    )
    assert len(second_kill) >= 10, "the broker outage should have left verdicts in the spool"
    assert t.lost == 0
    by_id: dict[str, list[dict]] = {}
    for m in received:
        by_id.setdefault(m["id"], []).append(m)
    for vid, attempts in second_kill.items():
        if attempts > 0:  # handed to the client before the crash: any copy after the first is flagged
            assert sum(not m.get("redelivered") for m in by_id[vid]) <= 1


def _status(sub: Subscriber, device: str) -> list[dict]:
    """The heartbeats received so far (the final retained ``offline`` left out)."""
    docs = [m.json() for m in sub.messages if m.topic == f"anomalygpt/{device}/status"]
    return [d for d in docs if d.get("state") == "online"]


def test_a_small_archive_quota_fills_and_the_daemon_keeps_inspecting_and_reports_it(
    tmp_path: Path, line: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = faults.Broker(tmp_path / "broker").start()
    storage = {"archive_quota_mb": 1, "archive_ok_sample_rate": 1.0}
    cfg = load_config(_config(tmp_path / "q.yaml", broker.port, line, "dq", storage=storage))
    sub = Subscriber(broker_like(broker), ["anomalygpt/dq/#"])
    daemon = Daemon(cfg).start()
    try:

        def evicting() -> bool:
            s = _status(sub, "dq")
            return bool(s) and (s[-1].get("archive") or {}).get("images_evicted", 0) > 0

        assert _wait(evicting, 40), _status(sub, "dq")[-1:] or "no heartbeat"

        def verdicts() -> int:
            return len([m for m in sub.messages if m.topic.endswith("/verdict")])

        # The rate is the check: 10 verdicts within 2 s (10 fps) once the quota filled.
        before, started = verdicts(), time.monotonic()
        _wait(lambda: verdicts() - before >= 10, 2.0)
        after, took = verdicts(), time.monotonic() - started
    finally:
        daemon.stop()
        sub.close()
        broker.stop()
    heartbeat = _status(sub, "dq")[-1]
    archive = heartbeat["archive"]
    # The heartbeat carries the rest of the health figures too.
    assert {"inspect-0.triggered", "inspect-0.free_run", "archive"} <= set(heartbeat["queues"])
    cam = heartbeat["cameras"]["cam1"]
    assert cam["inspected_fps"] > 5 and cam["latency_ms"]["p99"] >= cam["latency_ms"]["p50"] > 0
    assert heartbeat["engine_backend"] and heartbeat["spool"]["depth"] >= 0
    used = sum(f.stat().st_size for f in (cfg.storage.data / "archive" / "images").rglob("*.jpg"))
    faults.report(
        capsys, f"quota 1 MiB: verdicts +{after - before} in {took:.1f} s after the quota filled; archive {archive}"
    )
    assert after - before >= 10, "inspection slowed down or stopped when the archive filled"
    assert used <= 1024**2
    assert archive["images_evicted"] > 0


def broker_like(broker: Any) -> Any:
    """The daemon fixtures' Subscriber wants an object with host and port."""
    return type("B", (), {"host": "127.0.0.1", "port": broker.port})()


def test_a_camera_that_disappears_is_reported_and_inspection_resumes(
    tmp_path: Path, line: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2

    from anomalygpt_edge.runtime.tools import synthetic

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(synthetic.read_video_frames(line["video"])[:20]):
        cv2.imwrite(str(folder / f"{i:04d}.png"), image)
    broker = faults.Broker(tmp_path / "broker").start()
    camera = {"type": "image_folder", "source": str(folder), "fps": 10, "loop": True, "reconnect_max_s": 0.5}
    cfg = load_config(_config(tmp_path / "c.yaml", broker.port, line, "dc", camera=camera))
    sub = Subscriber(broker_like(broker), ["anomalygpt/dc/#"])
    daemon = Daemon(cfg).start()
    try:
        assert _wait(lambda: sum(m.topic.endswith("/verdict") for m in sub.messages) >= 5, 20)
        folder.rename(tmp_path / "unplugged")

        def reported_lost() -> bool:
            s = _status(sub, "dc")
            return bool(s) and s[-1]["cameras"]["cam1"].get("status") == "reconnecting"

        assert _wait(reported_lost, 15), _status(sub, "dc")[-1:]
        lost_status = _status(sub, "dc")[-1]
        n_lost = sum(m.topic.endswith("/verdict") for m in sub.messages)
        (tmp_path / "unplugged").rename(folder)
        assert _wait(lambda: sum(m.topic.endswith("/verdict") for m in sub.messages) >= n_lost + 5, 20)
        assert all(t.is_alive() for t in daemon._threads)
    finally:
        daemon.stop()
        sub.close()
        broker.stop()
    faults.report(
        capsys,
        f"camera lost: heartbeat said {lost_status['cameras']['cam1'].get('status')!r}, last error "
        f"{(lost_status.get('last_error') or {}).get('message')!r}; inspection resumed",
    )
    assert lost_status["last_error"] and "cam1" in lost_status["last_error"]["message"]
