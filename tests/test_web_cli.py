"""The station's commands as a technician runs them: ``web-user add`` (password on stdin) and
``web --config`` serving the page for the line daemon, on loopback, until SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from station_http import Client
from station_run import STATION, station_process, write_line_config
from station_scene import PART_ROI

from anomalygpt_edge.runtime.tools.local_broker import start_local_broker
from anomalygpt_edge.runtime.web.auth import User, UserStore


def _config(tmp_path: Path, bundle: Path, broker) -> Path:
    return write_line_config(tmp_path, bundle, broker, "cli-test")


def test_web_user_add_from_stdin_then_web_serves_the_daemon_on_loopback_until_sigterm(default_bundle_dir, tmp_path):
    broker = start_local_broker()
    try:
        config = _config(tmp_path, default_bundle_dir, broker)
        added = subprocess.run(
            [*STATION, "web-user", "add", "tina", "--role", "technician", "--config", str(config)],
            input="tina-password\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        users_file = tmp_path / "state" / "web" / "users.json"
        assert UserStore(users_file).get("tina") == User("tina", "technician")
        assert "tina-password" not in added.stdout + added.stderr + users_file.read_text()

        said: list[str] = []
        with station_process("web", "--config", str(config), "--port", "0", said=said) as (proc, url):
            assert url and url.startswith("http://127.0.0.1:"), "the station binds to loopback by default"
            # `web` is the alias now: one line points at `run --config` with a station: section.
            assert any(x.startswith("note: `anomalygpt-edge run --config`") and "station:" in x for x in said), said
            c = Client(url)
            assert c.post("/api/enroll/start", {"recipe": "plate", "camera": "cam1"}, csrf=False).status == 401
            assert c.login("tina", "tina-password").status == 200
            deadline = time.monotonic() + 30  # generous: CI's 2 cores may be busy with other tests
            while time.monotonic() < deadline:
                cams = c.get("/api/cameras").json()
                if cams[0]["status"] == "online":
                    break
                time.sleep(0.1)
            assert cams[0]["name"] == "cam1" and cams[0]["status"] == "online" and cams[0]["recipe"] == "plate"
            assert "no recipe" in (cams[0]["inspection_error"] or ""), "the daemon says why cam1 cannot inspect yet"
            assert c.get("/api/cameras/cam1/frame.jpg").body[:2] == b"\xff\xd8"
            # The config fixes cam1's ROI: the station enrolls with it and refuses another one.
            other = c.post("/api/enroll/start", {"recipe": "plate", "camera": "cam1", "roi": [0, 0, 64, 64]})
            assert other.status == 400 and "fixed by the daemon config" in other.json()["error"]
            state = c.post("/api/enroll/start", {"recipe": "plate", "camera": "cam1"}).json()
            assert state["roi"] == list(PART_ROI) and state["k"] == 0
            audit = (tmp_path / "state" / "web" / "audit.jsonl").read_text()
            assert '"enroll.start"' in audit and '"ok":false' in audit and '"user":"tina"' in audit
            deadline = time.monotonic() + 30
            while True:
                system = c.get("/api/system").json()
                if system["broker"]["connected"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert system["broker"]["connected"] is True and system["device"] == "cli-test"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        broker.stop()


def test_web_standalone_runs_the_daemon_with_a_null_link_and_no_broker(default_bundle_dir, tmp_path):
    from types import SimpleNamespace

    nobody = SimpleNamespace(host="127.0.0.1", port=1, protocols=("5",))  # no broker needed or used
    config = _config(tmp_path, default_bundle_dir, nobody)
    UserStore(tmp_path / "state" / "web" / "users.json").set("olga", "operator", "olga-password")
    with station_process("web", "--config", str(config), "--standalone", "--port", "0") as (proc, url):
        c = Client(url)
        assert c.login("olga", "olga-password").status == 200
        for _ in range(100):
            cams = c.get("/api/cameras").json()
            if cams[0]["status"] == "online":
                break
            time.sleep(0.1)
        # The daemon's own cameras, in the daemon's one vocabulary of camera states.
        assert cams[0]["status"] == "online" and c.get("/api/cameras/cam1/frame.jpg").body[:2] == b"\xff\xd8"
        broker = c.get("/api/system").json()["broker"]
        assert broker["connected"] is True and broker["note"] == "no MQTT broker: standalone station"
        assert c.post("/api/enroll/start", {"recipe": "plate", "camera": "cam1"}).status == 403, "operators view only"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_a_config_without_an_mqtt_section_runs_the_daemon_with_the_null_link(default_bundle_dir, tmp_path):
    from types import SimpleNamespace

    from anomalygpt_edge.runtime.cli.station import build_station
    from anomalygpt_edge.runtime.delivery.null_link import NullLink

    path = _config(tmp_path, default_bundle_dir, SimpleNamespace(host="127.0.0.1", port=1, protocols=("5",)))
    cfg = json.loads(path.read_text())
    del cfg["mqtt"]
    path.write_text(json.dumps(cfg))
    _, daemon, station = build_station(path)
    try:
        assert isinstance(daemon.link, NullLink) and daemon.link.connected.is_set()
        assert station.daemon is daemon and station.camera_names() == ["cam1"]
        assert station.system()["broker"]["note"] == "no MQTT broker: standalone station"
    finally:
        station.stop()
        daemon.stop()


def test_web_refuses_a_broken_config_with_a_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: {id: x}\ncameras: {}\nrecipes: []\n")
    r = subprocess.run([*STATION, "web", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("role", ["root", ""])
def test_web_user_refuses_an_unknown_role(tmp_path, role):
    r = subprocess.run(
        [*STATION, "web-user", "add", "x", "--role", role, "--users", str(tmp_path / "u.json")],
        input="long-enough\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and not (tmp_path / "u.json").exists()
