"""One service (``run --config`` with a ``station:`` section): the station's HTTP thread is watched
like the daemon's own, so a page that died shows in the daemon's status and health."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import broker_fixture, line_fixture, write_config  # noqa: F401

from anomalygpt_edge.runtime.cli import line_run, station
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon


def _until(condition: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_the_station_http_thread_dying_shows_in_the_daemon_status_and_health(
    tmp_path: Path, broker: Any, line: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 5}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 2, "deadline_ms": 3000}]
    cfg = write_config(tmp_path / "s.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="svc")
    data = json.loads(cfg.read_text())
    data["station"] = {"port": 0}
    cfg.write_text(json.dumps(data))
    daemon = Daemon(load_config(cfg))
    servers: list[Any] = []
    real_open = station.open_server
    monkeypatch.setattr(station, "open_server", lambda *a, **k: servers.append(real_open(*a, **k)) or servers[-1])
    seen: dict[str, Any] = {}

    def kill_the_page_then_stop() -> None:
        try:
            up = _until(lambda: bool(servers) and servers[0]._server.thread is not None, 120)
            seen["up"] = up and daemon.health.dead_threads() == {}
            if up:
                seen["alive_before"] = servers[0]._server.thread.is_alive()
                servers[0]._server.server.should_exit = True  # uvicorn's loop ends: the thread dies
                seen["noticed"] = _until(lambda: "station-http" in daemon.health.dead_threads(), 30)
                seen["status"] = daemon.status()
        finally:
            daemon.supervisor.stopping.set()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    helper = threading.Thread(target=kill_the_page_then_stop, name="test-helper")
    helper.start()
    try:
        line_run.run_with_station(daemon)  # on the main thread: it installs the signal handlers
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        helper.join(10)
    assert seen.get("up") and seen.get("alive_before"), seen
    assert seen["noticed"], "the dead station thread never showed in the health"
    status = seen["status"]
    assert status["state"] == "degraded"
    assert any("station-http is dead" in p for p in status["problems"]), status["problems"]
