"""The ``viewer`` role: a station screen in a supervisor's office or the quality lab, which may look
at everything the station shows and change nothing. Driven from the route table (``server.ROUTES``):
a route added later is covered without touching this file, and a change route a viewer could reach
fails here."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from station_http import Client
from station_run import STATION, hashed_users, serve

from anomalygpt_edge.runtime.web.auth import ROLES, User, UserStore, role_allows
from anomalygpt_edge.runtime.web.http_base import Route
from anomalygpt_edge.runtime.web.server import ROUTES, StationServer
from anomalygpt_edge.runtime.web.station_protocol import Frame

PASSWORDS = {"vera": "viewer-pw-1", "olga": "operator-pw", "ada": "admin-pw-123"}
USER_ROLES = {"vera": "viewer", "olga": "operator", "ada": "admin"}
VID = "ab" * 16
JPEG = b"\xff\xd8\xff\xe0 a jpeg \xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n a png"
# A value for each kind of path group the route table uses.
PATH_VALUES = {
    r"([A-Za-z0-9][A-Za-z0-9_.@-]{0,63})": "cam1",
    "([0-9a-f]{64})": "0" * 64,
    "([0-9a-f-]{8,64})": VID,
    "(image|heatmap)": "image",
}
# The POSTs a viewer may make: neither changes anything on the line.
VIEWER_POSTS = {"/api/login", "/api/logout"}
READS = [r for r in ROUTES if r.method == "GET" and r.role is not None]
CHANGES = [r for r in ROUTES if r.method == "POST" and r.pattern not in VIEWER_POSTS]


def url(route: Route) -> str:
    """The route's path with every group filled in (a new kind of group must be added to PATH_VALUES)."""
    path = route.pattern
    for group, value in PATH_VALUES.items():
        path = path.replace(group, value)
    assert "(" not in path and "[" not in path, f"{route.pattern}: add its path group to PATH_VALUES"
    return path


class ReadOnlyStation:
    """Answers every read with something of the right kind and records every call, so a test can
    tell whether a refused request reached the station."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._image = np.zeros((48, 64, 3), np.uint8)

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            self.calls.append(name)
            if name.endswith("_png"):
                return PNG
            if name in ("latest_jpeg", "last_overlay", "history_image"):
                return JPEG
            if name in ("latest_frame", "next_frame"):
                time.sleep(0.05)  # a camera's pace: the MJPEG loop must not spin
                return Frame(self._image, int(time.monotonic() * 1000), time.time())
            if name in ("cameras", "recipes", "history", "recipe_versions", "verdict_labels"):
                return []
            if name == "current_labels":
                return {}
            if name == "history_item":
                return {"id": args[0]}
            return {"recipe": "part-a", "bank_version": 1}

        return call


@pytest.fixture(scope="module")
def users_json(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The users, hashed once per module (scrypt is slow on purpose)."""
    return hashed_users(tmp_path_factory.mktemp("users"), PASSWORDS, USER_ROLES)


@pytest.fixture()
def served(tmp_path: Path, users_json: bytes):
    station = ReadOnlyStation()
    server = serve(station, tmp_path, users_json)
    yield server, station, tmp_path / "audit.jsonl"
    server.stop()


def logged_in(server: StationServer, user: str) -> Client:
    c = Client(server.url)
    r = c.login(user, PASSWORDS[user])
    assert r.status == 200 and r.json()["role"] == USER_ROLES[user], r.body
    return c


def stream_status(server: StationServer, path: str, cookie: str) -> str:
    """The status line of a streamed answer (MJPEG never ends, so read only its head)."""
    host, port = server.server_address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            assert data, f"{path}: the connection closed before the headers"
            head += data
    return head.split(b"\r\n", 1)[0].decode()


def audit_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_viewer_is_the_lowest_role_and_every_read_but_the_admins_is_a_viewers():
    assert ROLES[0] == "viewer" and role_allows("operator", "viewer") and not role_allows("viewer", "operator")
    assert READS, "the route table has reads"
    # A new read must be a viewer's (the screen shows it) or an admin's page: a read kept from the
    # viewer is a decision to make here, not an accident of copying an operator route.
    assert {r.role for r in READS} == {"viewer", "admin"}, sorted((r.pattern, r.role) for r in READS)


@pytest.mark.parametrize("route", READS, ids=lambda r: r.pattern)
def test_a_viewer_reads_every_route_but_the_admins(served, route):
    server, _station, _audit = served
    vera = logged_in(server, "vera")
    path = url(route)
    if path.endswith(".mjpg"):
        status = stream_status(server, path, vera.cookie or "")
        assert status.startswith("HTTP/1.1 200"), (path, status)
        return
    r = vera.get(path)
    if role_allows("viewer", route.role or ""):
        assert r.status == 200, (path, r.body)
    else:
        assert r.status == 403 and route.role in r.json()["error"], (path, r.body)


@pytest.mark.parametrize("route", CHANGES, ids=lambda r: r.pattern)
def test_a_viewer_is_refused_every_change_before_its_body_is_read(served, route):
    server, station, audit = served
    assert route.role is not None and not role_allows("viewer", route.role), f"{route.pattern}: a viewer may not change"
    vera = logged_in(server, "vera")
    # An empty body, valid for no change route: the 403 names the role, so the role refused it
    # before the body was read, let alone the station called.
    r = vera.post(url(route), {})
    assert r.status == 403, (route.pattern, r.status, r.body)
    assert f"needs the {route.role} role; you are viewer" in r.json()["error"]
    assert station.calls == []
    # As every refusal by role: nothing ran, so nothing is in the audit log but the login.
    assert [e["action"] for e in audit_entries(audit) if e["user"] == "vera"] == ["session.login"]


def test_a_viewer_logs_out_and_its_session_ends(served):
    server, _station, _audit = served
    vera = logged_in(server, "vera")
    assert vera.get("/api/session").json()["role"] == "viewer"
    assert vera.post("/api/logout").status == 200
    assert vera.get("/api/cameras").status == 401


def test_an_operator_still_labels_and_asks_where_a_viewer_may_not(served):
    server, station, _audit = served
    olga = logged_in(server, "olga")
    assert olga.post(f"/api/verdicts/{VID}/label", {"label": "good"}).status == 200
    assert olga.post("/api/ask", {"verdict_id": VID, "question": "why?"}).status == 200
    assert "label_verdict" in station.calls and "ask" in station.calls


def test_an_admin_makes_a_viewer_who_then_only_looks(served):
    server, _station, _audit = served
    ada = logged_in(server, "ada")
    r = ada.post("/api/users", {"action": "set", "name": "quality-lab", "role": "viewer", "password": "lab-screen-1"})
    assert r.status == 200 and r.json() == {"name": "quality-lab", "role": "viewer"}, r.body
    lab = Client(server.url)
    assert lab.login("quality-lab", "lab-screen-1").json()["role"] == "viewer"
    assert lab.get("/api/history.csv").status == 200
    assert lab.post("/api/recipes/assign", {"camera": "cam1", "recipe": None}).status == 403


def test_web_user_add_takes_the_viewer_role_and_the_users_file_keeps_it(tmp_path):
    users_file = tmp_path / "users.json"
    added = subprocess.run(
        [*STATION, "web-user", "add", "office", "--role", "viewer", "--users", str(users_file)],
        input="office-screen\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    users = UserStore(users_file)
    assert users.get("office") == User("office", "viewer")
    assert users.authenticate("office", "office-screen") == User("office", "viewer")


def test_the_page_orders_roles_as_the_server_does_and_hides_what_a_viewer_cannot_use():
    static = Path(__file__).parents[1] / "runtime" / "web" / "static"
    app_js = (static / "app.js").read_text()
    page_roles = re.search(r"const ROLES = \[([^\]]*)\]", app_js)
    assert page_roles is not None
    assert tuple(json.loads(f"[{page_roles.group(1)}]")) == ROLES
    nav = dict(re.findall(r'<a href="#(\w+)"(?: data-role="(\w+)")?>', (static / "index.html").read_text()))
    # The nav hides what the role cannot use (the route() guard sends a typed-in hash to the live view).
    assert nav == {"live": "", "enroll": "technician", "learn": "", "history": "", "ask": "operator", "system": ""}
