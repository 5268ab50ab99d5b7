"""The station over HTTPS from the config's ``station:`` section, plain HTTP kept to loopback unless
the config opts in, and ``run --config`` serving the page beside the daemon as one service."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from station_http import Client
from station_pki import HAVE_OPENSSL, make_pki
from station_run import station_process, write_line_config

from anomalygpt_edge.runtime.line.config import ConfigError, parse_config
from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import StationServer, WebConfig

needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command")
BASE = {"device": {"id": "d1"}, "cameras": {"c": {"type": "image_folder", "source": "."}}, "recipes": []}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_OPENSSL:
        pytest.skip("needs the openssl command")
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_context(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def _station_config(station: dict) -> str:
    return json.dumps({**BASE, "station": station})


def test_plain_http_on_a_line_address_is_refused_unless_the_config_allows_it(tmp_path):
    with pytest.raises(ConfigError, match=r"station\.bind.*allow_plain_http"):
        parse_config(_station_config({"bind": "0.0.0.0"}), "line.yaml", tmp_path)
    assert parse_config(_station_config({"bind": "0.0.0.0", "allow_plain_http": True}), "x", tmp_path).station
    assert parse_config(_station_config({"bind": "127.0.0.1"}), "x", tmp_path).station
    assert parse_config(_station_config({"bind": "::1"}), "x", tmp_path).station
    # The server refuses it too, whoever builds its settings.
    with pytest.raises(ValueError, match="plain HTTP"):
        WebConfig(tmp_path / "u.json", tmp_path / "a.jsonl", bind="0.0.0.0")
    assert WebConfig(tmp_path / "u.json", tmp_path / "a.jsonl", bind="0.0.0.0", allow_plain_http=True)


def test_station_tls_needs_both_files_and_they_must_exist(tmp_path):
    (tmp_path / "cert.pem").write_text("-")
    with pytest.raises(ConfigError, match="station.tls: missing required key 'key'"):
        parse_config(_station_config({"tls": {"cert": "cert.pem"}}), "line.yaml", tmp_path)
    with pytest.raises(ConfigError, match="station.tls.cert"):
        parse_config(_station_config({"tls": {"cert": "missing.pem", "key": "missing.key"}}), "line.yaml", tmp_path)


@needs_openssl
def test_line_address_with_tls_is_accepted_and_paths_are_relative_to_the_config(pki):
    tls = {"cert": "server.pem", "key": "server.key"}
    cfg = parse_config(_station_config({"bind": "0.0.0.0", "tls": tls}), "x", pki)
    assert cfg.station is not None and cfg.station.tls is not None
    assert cfg.station.tls.cert == pki / "server.pem"


@needs_openssl
def test_station_serves_https_with_the_configured_certificate_and_a_secure_cookie(pki, tmp_path):
    UserStore(tmp_path / "users.json").set("olga", "operator", "olga-password")
    config = WebConfig(tmp_path / "users.json", tmp_path / "a.jsonl", port=0,
                       tls_cert=pki / "server.pem", tls_key=pki / "server.key")  # fmt: skip
    server = StationServer(object(), config).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        client = Client(server.url, _client_context(pki))
        r = client.login("olga", "olga-password")
        assert r.status == 200
        assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
        assert client.get("/api/session").json()["user"] == "olga"
        # A client that does not trust the test CA is refused by its own TLS check.
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(server.url, ssl.create_default_context()).get("/api/session")
        # Plain HTTP on the HTTPS port gets no page.
        host, port = server.server_address
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET /api/session HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


@needs_openssl
def test_a_key_that_does_not_match_the_certificate_fails_before_listening(pki, tmp_path):
    other = make_pki(tmp_path / "other")
    config = WebConfig(tmp_path / "u.json", tmp_path / "a.jsonl", port=0,
                       tls_cert=pki / "server.pem", tls_key=other / "server.key")  # fmt: skip
    with pytest.raises(ssl.SSLError):
        StationServer(object(), config)


def _line_config(tmp_path: Path, bundle: Path, broker, pki: Path) -> Path:
    tls = {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")}
    station = {"port": 0, "tls": tls, "users": str(tmp_path / "users.json")}
    return write_line_config(tmp_path, bundle, broker, "one-service", station=station)


@needs_openssl
def test_run_config_with_a_station_section_serves_the_page_over_https_beside_the_daemon(
    default_bundle_dir, tmp_path, pki
):
    from anomalygpt_edge.runtime.tools.local_broker import start_local_broker

    broker = start_local_broker()
    try:
        UserStore(tmp_path / "users.json").set("tina", "technician", "tina-password")
        config = _line_config(tmp_path, default_bundle_dir, broker, pki)
        with station_process("run", "--config", str(config), timeout=90) as (proc, url):
            assert url.startswith("https://127.0.0.1:")
            c = Client(url, _client_context(pki))
            assert c.login("tina", "tina-password").status == 200
            assert [cam["name"] for cam in c.get("/api/cameras").json()] == ["cam1"]
            deadline = time.monotonic() + 30
            while not (system := c.get("/api/system").json())["broker"]["connected"]:
                assert time.monotonic() < deadline, "the daemon did not connect to its broker"
                time.sleep(0.1)
            assert system["device"] == "one-service"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        broker.stop()


def test_example_config_documents_every_station_key():
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.station_config import StationConfig

    example = Path(__file__).resolve().parents[1] / "runtime" / "config.example.yaml"
    station = load_config(example).station
    assert station is not None and station.bind == "127.0.0.1" and station.tls is None
    text = example.read_text().split("\nstation:", 1)[1]
    for key in StationConfig.model_fields:
        assert f"  {key}:" in text, f"station.{key} is not in runtime/config.example.yaml"


def test_web_alias_reads_the_station_section_and_its_flags_override_it(tmp_path):
    from anomalygpt_edge.runtime.cli.station import web_config

    station = {"port": 9443, "users": "people.json", "live_max_fps": 4}
    cfg = parse_config(_station_config(station), "line.yaml", tmp_path)
    web = web_config(cfg)
    assert (web.bind, web.port, web.users_file, web.live_max_fps) == ("127.0.0.1", 9443, tmp_path / "people.json", 4)
    assert web.audit_log == cfg.storage.data / "web" / "audit.jsonl"
    assert web_config(cfg, port=8081, bind="127.0.0.2").port == 8081
    # `web --bind 0.0.0.0` without TLS is refused like the config is, unless --allow-plain-http.
    with pytest.raises(ValueError, match="plain HTTP"):
        web_config(cfg, bind="0.0.0.0")
    assert web_config(cfg, bind="0.0.0.0", allow_plain_http=True).bind == "0.0.0.0"
