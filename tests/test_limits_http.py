"""What a client can make the station's HTTP server do, against the real server on loopback: a
missing, negative, malformed or oversized Content-Length is answered before any body is read, and
failed logins are throttled per client address and per user name with a growing delay, never a
lock that another client can put on a real user."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from anomalygpt_edge.runtime.web import auth
from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import MAX_JSON_BODY, StationServer, WebConfig

PASSWORD = "olga-password"


class NoStation:
    """The login and body checks come before the station; any call to it is a test failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the station was called: {name}")


@pytest.fixture(scope="module")
def users_json(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    users = UserStore(tmp_path_factory.mktemp("users") / "users.json")
    users.set("olga", "operator", PASSWORD)
    return users.path.read_bytes()


@pytest.fixture()
def server(tmp_path: Path, users_json: bytes):
    (tmp_path / "users.json").write_bytes(users_json)
    srv = StationServer(NoStation(), WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0)).start()
    yield srv
    srv.stop()


def _raw(server: StationServer, head: bytes, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """Send request bytes on a raw socket and keep it open: the server must answer without waiting
    for a body. Returns (status, response bytes, seconds to the answer)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        t0 = time.monotonic()
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)  # times out (and fails the test) if the server waits for a body
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - t0
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data, elapsed


def _login_head(length_headers: bytes) -> bytes:
    return (
        b"POST /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + length_headers + b"\r\n"
    )


@pytest.mark.parametrize(
    ("length_headers", "status"),
    [
        (b"Content-Length: -1\r\n", 400),  # rfile.read(-1) read until the peer closed: +135 MB for 150 MB sent
        (b"", 411),
        (b"Transfer-Encoding: chunked\r\n", 411),
        (f"Content-Length: {MAX_JSON_BODY + 1}\r\n".encode(), 413),
        (b"Content-Length: 99999999999999\r\n", 413),
        (b"Content-Length: +5\r\n", 400),
        (b"Content-Length: 1_0\r\n", 400),
        (b"Content-Length: 0x10\r\n", 400),
        (b"Content-Length: 5\r\nContent-Length: 500\r\n", 400),
    ],
    ids=["negative", "missing", "chunked", "over-limit", "huge", "plus-sign", "underscore", "hex", "twice"],
)
def test_a_missing_negative_or_oversized_content_length_is_refused_before_any_body_is_read(
    server: StationServer, length_headers: bytes, status: int
) -> None:
    got, data, elapsed = _raw(server, _login_head(length_headers))
    assert got == status, data[:200]
    assert elapsed < 2.0, "answered at once, not after waiting for a body that never comes"
    assert b"Connection: close" in data, "the unread body is never taken for the next request"


def test_a_body_cut_short_is_refused_and_the_connection_closed(server: StationServer) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(_login_head(b"Content-Length: 100\r\n") + b'{"username": ')
        sock.shutdown(socket.SHUT_WR)  # the peer stops sending after 13 of 100 bytes
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and b"13 of 100" in data


def test_a_well_formed_login_still_works_on_the_same_server(server: StationServer) -> None:
    body = json.dumps({"username": "olga", "password": PASSWORD}).encode()
    got, data, _ = _raw(server, _login_head(f"Content-Length: {len(body)}\r\n".encode()) + body)
    assert got == 200, data[:300]


def _login(server: StationServer, source: str, user: str, password: str) -> http.client.HTTPResponse:
    """One login from a given loopback source address (127.0.0.0/8 all reach the server on Linux)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        conn.request(
            "POST",
            "/api/login",
            json.dumps({"username": user, "password": password}),
            {"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        r.body = r.read()  # type: ignore[attr-defined]
        return r
    finally:
        conn.close()


def _loopback_aliases_work() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


needs_aliases = pytest.mark.skipif(not _loopback_aliases_work(), reason="127.0.0.2 is not bindable here")


@needs_aliases
def test_spraying_made_up_names_from_one_address_is_throttled_and_the_real_user_elsewhere_is_not(
    server: StationServer,
) -> None:
    assert _login(server, "127.0.0.1", "olga", PASSWORD).status == 200  # olga's own station
    for i in range(auth.FREE_FAILURES):
        assert _login(server, "127.0.0.2", f"user{i}", "guess-1234").status == 401
    sprayed = _login(server, "127.0.0.2", "user99", "guess-1234")
    assert sprayed.status == 429 and sprayed.getheader("Retry-After") == "1"
    assert b"from this address" in sprayed.body  # type: ignore[attr-defined]
    # Refused before the password is checked, even the right one: the address has to wait.
    assert _login(server, "127.0.0.2", "olga", PASSWORD).status == 429
    # A fixed time: the address's 1 s delay (Retry-After) has to pass; that window is the scenario.
    time.sleep(1.05)
    assert _login(server, "127.0.0.2", "user100", "guess-1234").status == 401  # waited: checked again
    again = _login(server, "127.0.0.2", "user101", "guess-1234")
    assert again.status == 429 and again.getheader("Retry-After") == "2", "the delay doubled"
    assert _login(server, "127.0.0.1", "olga", PASSWORD).status == 200, "olga is not locked out"
    assert _login(server, "127.0.0.3", "olga", PASSWORD).status == 200, "nor is any other address"


@needs_aliases
def test_guessing_one_users_password_from_many_addresses_slows_that_name_but_not_at_the_users_station(
    server: StationServer,
) -> None:
    assert _login(server, "127.0.0.1", "olga", PASSWORD).status == 200
    for i in range(auth.FREE_FAILURES):  # one guess per address: no address reaches its own limit
        assert _login(server, f"127.0.1.{i + 1}", "olga", "guess-1234").status == 401
    slowed = _login(server, "127.0.2.1", "olga", PASSWORD)
    assert slowed.status == 429 and b"for this user name" in slowed.body  # type: ignore[attr-defined]
    assert 1 <= int(slowed.getheader("Retry-After") or 0) <= auth.MAX_DELAY_S
    assert _login(server, "127.0.0.1", "olga", PASSWORD).status == 200, "at her usual address olga logs in"
    time.sleep(1.05)  # a fixed time: the name's 1 s delay has to pass; that window is the scenario
    assert _login(server, "127.0.2.1", "olga", PASSWORD).status == 200, "a delay, not a lock"


class NaNStation:
    def recipes(self) -> list[dict[str, Any]]:
        return [{"name": "r", "threshold": {"estimated_frr": float("nan"), "value": float("inf"), "k": 2}}]


def test_a_nan_in_an_answer_is_sent_as_null_so_the_browser_can_parse_it(tmp_path: Path, users_json: bytes) -> None:
    # Two golden parts give an undefined false-reject estimate; JSON has no NaN and a browser's
    # JSON.parse refuses the whole answer (the enrollment page then never updated).
    from station_http import Client

    (tmp_path / "users.json").write_bytes(users_json)
    srv = StationServer(NaNStation(), WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0)).start()
    try:
        c = Client(srv.url)
        assert c.login("olga", PASSWORD).status == 200
        r = c.get("/api/recipes")
    finally:
        srv.stop()
    assert r.status == 200 and b"NaN" not in r.body and b"Infinity" not in r.body
    assert json.loads(r.body)[0]["threshold"] == {"estimated_frr": None, "value": None, "k": 2}


def test_a_request_the_http_parser_refuses_gets_a_json_error_with_the_security_headers(server: StationServer) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(_login_head(b"Content-Length: -1\r\n"))
        data = b""
        while chunk := sock.recv(65536):  # the server closes after answering
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"X-Frame-Options: DENY" in head and b"Content-Security-Policy:" in head
    assert "error" in json.loads(body.decode())
