"""Fixtures for the station's "the line learns" tests: a line daemon whose watched folder receives
parts, the recipe ``plate`` enrolled from ten good parts, its archive on, a real mosquitto, and the
station over it with a technician and an operator. Drifted good parts (the light and the disc
moved, as ``test_proposal.drifted_part`` draws them) are rejected by ``plate``: false rejects to
label ``good`` and learn from."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import parts
import pytest
from station_http import Client
from test_proposal import drifted_part

from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import WebConfig

PASSWORDS = {"theo": "technician-pw", "olga": "operator-pw"}
ROLES = {"theo": "technician", "olga": "operator"}
#: Drifted parts fed to the line: with every one of them rejected, the drift watch's reject rate
#: leaves its band (8 of 8 rejected is beyond what ten goldens allow at the watch's error rate).
DRIFTED = 8


@pytest.fixture(scope="module")
def plate_store(default_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the live recipe ``plate``: ten good parts, 5 % target false rejects (copied per test)."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    root = tmp_path_factory.mktemp("plate") / "store"
    enroller = Enroller(RecipeStore(root), EngineBundle.open(default_bundle_dir))
    enroller.create("plate", target_frr=0.05)
    result = enroller.add("plate", [(f"good_{i:03d}.png", parts.good_part(i)) for i in range(10)])
    assert result.recipe.live, result.to_json()
    return root


def drop(inbox: Path, name: str, image: np.ndarray) -> None:
    """A part arrives in the watched folder (written aside, then renamed: never read half-written)."""
    tmp = inbox / f".{name}.tmp.png"
    assert cv2.imwrite(str(tmp), image)
    tmp.rename(inbox / f"{name}.png")


def wait_until(what: str, cond: Callable[[], Any], timeout: float = 60.0, every: float = 0.25) -> Any:
    """Poll ``cond`` until it is truthy (bounded); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@pytest.fixture()
def learning_line(
    tmp_path: Path, broker: Any, default_bundle_dir: Path, plate_store: Path
) -> Iterator[Callable[..., dict[str, Any]]]:
    """Start the daemon (watched folder ``inbox`` on ``plate``) and the station over it; call with
    ``tls=(cert, key)`` for HTTPS. Returns server, daemon, inbox and the station's base URL."""
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.web.daemon_station import attach

    started: list[tuple[Any, Any, Any]] = []

    def start(tls: tuple[Path, Path] | None = None) -> dict[str, Any]:
        store = tmp_path / "store"
        shutil.copytree(plate_store, store)
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        config = {
            "device": {"id": "learn-test"},
            "cameras": {"inbox": {"type": "image_folder", "source": str(inbox)}},
            "recipes": [{"camera": "inbox", "recipe": "plate", "trigger": "folder_watch", "deadline_ms": 10000}],
            "engines": {"bundle": str(default_bundle_dir), "backend": "onnxruntime"},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 10},
            "storage": {"store": str(store), "data": str(tmp_path / "state")},
            "health": {"heartbeat_s": 0.5},
            "drift": {"window_parts": DRIFTED, "min_parts": 4},
        }
        (tmp_path / "line.yaml").write_text(json.dumps(config))  # JSON is YAML
        daemon = Daemon(load_config(tmp_path / "line.yaml")).start()
        users = UserStore(tmp_path / "users.json")
        for name, password in PASSWORDS.items():
            users.set(name, ROLES[name], password)
        cert, key = tls if tls is not None else (None, None)
        web = WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0, tls_cert=cert, tls_key=key)
        server, station = attach(daemon, web)
        started.append((server, station, daemon))
        return {"server": server, "daemon": daemon, "inbox": inbox, "store": store, "audit": tmp_path / "audit.jsonl"}

    yield start
    for server, station, daemon in started:
        server.stop()
        station.stop()
        daemon.stop()


def feed_drifted(inbox: Path, n: int = DRIFTED, seed0: int = 100) -> None:
    """``n`` drifted good parts onto the line."""
    for i in range(n):
        drop(inbox, f"drift-{i:02d}", drifted_part(seed0 + i))


def wait_verdicts(client: Client, n: int, timeout: float = 90.0) -> list[dict[str, Any]]:
    """The station's newest ``n`` verdicts of ``inbox``, once there are that many."""
    return wait_until(
        f"{n} verdicts on the station",
        lambda: (rows := client.get("/api/history?camera=inbox&limit=100").json()) and len(rows) >= n and rows,
        timeout,
    )


def login(url: str, user: str, ssl_context: Any = None) -> Client:
    c = Client(url, ssl_context)
    assert c.login(user, PASSWORDS[user]).status == 200
    return c


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
