"""Real stations for the tests to talk to over HTTP: a standalone station on one video camera,
served in the test's own process, and the product's own command line run as a process of its own
(with the line config it reads and the URL it says it listens on)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from station_scene import PART_ROI, write_video

from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import StationServer, WebConfig

STATION = [sys.executable, "-m", "anomalygpt_edge"]  # the product's own command line


def hashed_users(folder: Path, passwords: dict[str, str], roles: dict[str, str]) -> bytes:
    """A users file's bytes with each name's role and password (scrypt is slow on purpose: hash once
    per module and copy the bytes into each test's folder)."""
    users = UserStore(folder / "users.json")
    for name, password in passwords.items():
        users.set(name, roles[name], password)
    return users.path.read_bytes()


def serve(station: Any, tmp_path: Path, users_json: bytes) -> StationServer:
    """``station`` served on a free loopback port, users from ``users_json`` and the audit log under
    ``tmp_path``. The caller stops the server."""
    (tmp_path / "users.json").write_bytes(users_json)
    return StationServer(station, WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0)).start()


def serve_video_station(
    tmp_path: Path, bundle_dir: Path, video: Path, users: Iterable[tuple[str, str, str]], inspect_fps: float
) -> tuple[StationServer, Any]:
    """A standalone station inspecting ``video`` as camera ``cam1``, served on a free loopback port
    to ``users`` (name, role, password), with its store, users and audit log under ``tmp_path``.
    The caller stops the server, then the station."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.web.standalone import CameraSpec, StandaloneStation

    station = StandaloneStation(
        RecipeStore(tmp_path / "store"),
        EngineBundle.open(bundle_dir),
        [CameraSpec("cam1", "video_file", str(video), fps=10)],
        inspect_fps=inspect_fps,
    ).start()
    listed = list(users)
    passwords = {name: password for name, _, password in listed}
    roles = {name: role for name, role, _ in listed}
    return serve(station, tmp_path, hashed_users(tmp_path, passwords, roles)), station


def write_line_config(tmp_path: Path, bundle: Path, broker: Any, device: str, **sections: Any) -> Path:
    """``tmp_path/line.yaml``: one looping video camera ``cam1`` with the recipe ``plate`` on its part,
    the ``broker`` (host, port, protocols) and storage under ``tmp_path``, plus ``sections``."""
    video = write_video(tmp_path / "line.avi", 20, mixed=False)
    cfg = {
        "device": {"id": device},
        "cameras": {"cam1": {"type": "video_file", "source": str(video), "fps": 10, "loop": True}},
        "recipes": [{"camera": "cam1", "recipe": "plate", "trigger": "free_run", "fps": 2, "roi": list(PART_ROI)}],
        "engines": {"bundle": str(bundle), "backend": "onnxruntime"},
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocols[0]},
        "storage": {"store": str(tmp_path / "store"), "data": str(tmp_path / "state")},
        **sections,
    }
    path = tmp_path / "line.yaml"
    path.write_text(json.dumps(cfg))
    return path


def station_url(proc: subprocess.Popen[str], timeout: float, said: list[str] | None = None) -> str:
    """The URL a station process prints (``station: <url>``) within ``timeout`` seconds; each line
    it printed up to and with that one is appended to ``said``."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, f"{' '.join(map(str, proc.args))} exited early"
            continue
        if said is not None:
            said.append(line)
        if line.startswith("station: "):
            return line.split()[1].rstrip("/")
    raise AssertionError("the station did not say where it listens")


@contextmanager
def station_process(
    *args: str, timeout: float = 60, said: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``anomalygpt-edge <args>`` as a process of its own, and the URL it says it serves on (see
    :func:`station_url`). A process still running on the way out is killed."""
    proc = subprocess.Popen([*STATION, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield proc, station_url(proc, timeout, said)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
