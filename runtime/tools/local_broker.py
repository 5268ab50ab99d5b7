"""A local MQTT broker for the demo, the benchmark and the tests: mosquitto on a free loopback port,
or, where mosquitto is not installed, the embedded Python broker (:mod:`.mini_broker`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    return found or next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)


def wait_port(host: str, port: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class LocalBroker:
    """A broker this process started; :meth:`stop` ends it."""

    host: str
    port: int
    kind: str  # "mosquitto" or "embedded"
    protocols: tuple[str, ...]  # MQTT versions it speaks
    _proc: subprocess.Popen | None = None
    _embedded: Any = None
    _dir: Any = field(default=None, repr=False)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._embedded is not None:
            self._embedded.stop()
        if self._dir is not None:
            self._dir.cleanup()

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(port: int | None = None, log_to: Path | None = None) -> LocalBroker:
    """mosquitto on 127.0.0.1 only, anonymous, no persistence; raises if it is missing or does not start."""
    exe = find_mosquitto()
    if exe is None:
        raise FileNotFoundError("mosquitto is not installed")
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="anomalygpt-mosquitto-")
    conf = Path(tmp.name) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    err = open(log_to, "ab") if log_to else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err)
    if not wait_port("127.0.0.1", port):
        proc.kill()
        tmp.cleanup()
        raise RuntimeError(f"mosquitto did not start on port {port}")
    return LocalBroker("127.0.0.1", port, "mosquitto", ("5", "3.1.1"), _proc=proc, _dir=tmp)


def start_local_broker(prefer_embedded: bool = False) -> LocalBroker:
    """mosquitto when installed (and not ``prefer_embedded``), else the embedded broker."""
    if not prefer_embedded and find_mosquitto():
        return start_mosquitto()
    from anomalygpt_edge.runtime.tools.mini_broker import MiniBroker

    broker = MiniBroker("127.0.0.1", 0).start()
    return LocalBroker("127.0.0.1", broker.port, "embedded", ("3.1.1",), _embedded=broker)
