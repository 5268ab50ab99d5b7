"""MQTT over TLS with a client certificate and a password against a real mosquitto: verdicts reach
``mosquitto_sub`` over TLS; a broker certificate for another name, or a wrong password, keeps the
daemon off the broker (it keeps retrying and never sends to an impostor)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import line_fixture  # noqa: F401 - fixture used by name

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mosquitto", "mosquitto_sub", "mosquitto_passwd", "openssl")),
    reason="needs mosquitto, mosquitto_sub, mosquitto_passwd and openssl",
)


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=60)


def _cert(d: Path, name: str, cn: str, san: str | None) -> None:
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
         "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
    extra = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", f"{name}.pem", "-days", "2", *extra, cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=anomalygpt-test-ca", cwd=d)  # fmt: skip
    _cert(d, "server", "localhost", "DNS:localhost,IP:127.0.0.1")
    _cert(d, "impostor", "broker.elsewhere.example", "DNS:broker.elsewhere.example")
    _cert(d, "client", "line-3", None)
    _run("mosquitto_passwd", "-b", "-c", "passwd", "line3", "s3cret-pw", cwd=d)
    for f in d.iterdir():
        f.chmod(0o644)  # mosquitto may drop to its own user
    (d / "password").write_text("s3cret-pw\n")
    (d / "password").chmod(0o600)
    (d / "wrong-password").write_text("nope\n")
    return d


class TlsBroker:
    def __init__(self, pki: Path, workdir: Path, server: str = "server"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = workdir / f"mosquitto-{server}.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"cafile {pki / 'ca.pem'}",
            f"certfile {pki / f'{server}.pem'}",
            f"keyfile {pki / f'{server}.key'}",
            "require_certificate true",
            "allow_anonymous false",
            f"password_file {pki / 'passwd'}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / f"mosquitto-{server}.log"
        log_fh = open(self.log, "wb")  # noqa: SIM115 - the broker writes it for its whole life
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log_fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while b"running" not in self.log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _config(tmp_path: Path, line: dict, port: int, pki: Path, password: str = "password", **tls: Any) -> Path:
    cfg = {
        "device": {"id": "tls"},
        "cameras": {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}},
        "recipes": [{"camera": "cam1", "recipe": "bracket", "fps": 5, "deadline_ms": 2000}],
        "engines": {"bundle": str(line["bundle"]), "backend": "onnxruntime"},
        "mqtt": {
            "host": "localhost",
            "port": port,
            "keepalive": 10,
            "username": "line3",
            "password_file": str(pki / password),
            "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "client.pem"), "key": str(pki / "client.key"), **tls},
        },
        "storage": {"store": str(line["store"]), "data": str(tmp_path / "state"), "archive": False},
    }
    path = tmp_path / "tls.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_verdicts_flow_over_tls_with_client_certificate_and_password(tmp_path: Path, line: dict, pki: Path) -> None:
    broker = TlsBroker(pki, tmp_path)
    out = tmp_path / "sub.txt"
    out_fh = open(out, "wb")  # noqa: SIM115 - mosquitto_sub writes it until terminated
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "localhost", "-p", str(broker.port), "--cafile", str(pki / "ca.pem"),
         "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"), "-u", "line3", "-P", "s3cret-pw",
         "-t", "anomalygpt/tls/+/verdict", "-q", "1"],
        stdout=out_fh, stderr=subprocess.STDOUT,
    )  # fmt: skip
    daemon = Daemon(load_config(_config(tmp_path, line, broker.port, pki))).start()
    try:
        deadline = time.monotonic() + 20
        while out.read_text().count('"verdict"') < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.stop()
        sub.terminate()
        sub.wait(5)
        broker.stop()
    verdicts = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert len(verdicts) >= 3, out.read_text()[-500:]
    assert all(v["camera"] == "cam1" and v["verdict"] in ("OK", "NG") for v in verdicts)


@pytest.mark.parametrize(
    ("server", "password", "tls", "why"),
    [
        ("impostor", "password", {}, "certificate for another host name"),
        ("server", "wrong-password", {}, "wrong password"),
    ],
)
def test_the_daemon_stays_off_a_broker_it_must_not_trust(
    tmp_path: Path, line: dict, pki: Path, server: str, password: str, tls: dict, why: str
) -> None:
    broker = TlsBroker(pki, tmp_path, server)
    daemon = Daemon(load_config(_config(tmp_path, line, broker.port, pki, password, **tls)))
    try:
        daemon.start(mqtt_wait_s=4)
        connected = daemon.link.connected.is_set()
    finally:
        daemon.stop()
        broker.stop()
    assert not connected, why


def test_check_hostname_false_accepts_the_other_name_for_test_rigs(tmp_path: Path, line: dict, pki: Path) -> None:
    broker = TlsBroker(pki, tmp_path, "impostor")
    daemon = Daemon(load_config(_config(tmp_path, line, broker.port, pki, check_hostname=False)))
    try:
        daemon.start(mqtt_wait_s=10)
        connected = daemon.link.connected.is_set()
    finally:
        daemon.stop()
        broker.stop()
    assert connected
