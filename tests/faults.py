"""Fault-injection helpers for the tests: a real mosquitto broker that can be SIGKILLed and
restarted on the same port, and a subscriber that is not our code (``mosquitto_sub``).

Loopback only, bounded waits everywhere. Imported by the fault tests with ``importlib`` (the tests
folder is not a package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.publish as mqtt_publish

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.tools.fault_bench import Plc, Rig


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass; returns whether it came true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, up: bool = True, timeout: float = 10.0) -> bool:
    """Wait until 127.0.0.1:``port`` accepts (``up``) or refuses connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return True
        except OSError:
            if not up:
                return True
        time.sleep(0.05)
    return False


class Broker:
    """mosquitto on a free loopback port, with persistence so a *subscriber's* session and its
    queued QoS 1 messages survive a broker crash (autosave every second), as a plant broker is set up."""

    def __init__(self, workdir: Path):
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', who cannot write tmp_path
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Broker:
        self.starts += 1
        log = open(self.dir / f"broker-{self.starts}.log", "wb")  # noqa: SIM115 - lives as long as the broker
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        if not wait_port(self.port, up=True):
            raise RuntimeError(f"mosquitto did not start on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final persistence save, connections reset."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        wait_port(self.port, up=False, timeout=5)

    def wait_persisted(self, after_ns: int, timeout: float = 10.0) -> bool:
        """Wait until the broker has written its persistence file (autosave, every second) after
        ``after_ns`` (``time.time_ns()``): what it held then now survives a SIGKILL."""
        db = self.dir / "mosquitto.db"  # written as mosquitto.db.new, then renamed: never half-written
        return wait_until(lambda: db.is_file() and db.stat().st_mtime_ns > after_ns, timeout, 0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class ExternalSubscriber:
    """``mosquitto_sub`` at QoS 1 printing ``topic payload`` lines.

    ``persistent`` (``-c``, fixed client id): the broker keeps the subscription and queues
    messages while the subscriber is away, so it is the one that checks that nothing is lost.
    A clean-session subscriber gets nothing replayed from the broker's persistence after a crash,
    so the copies it sees are exactly what the publisher sent while it was connected: it is the
    one that checks that every extra copy *we* send is flagged.
    """

    def __init__(self, port: int, topic: str, out: Path, client_id: str = "plc-checker", persistent: bool = True):
        if shutil.which("mosquitto_sub") is None:
            raise RuntimeError("mosquitto_sub is not installed")
        self.out = Path(out)
        self.port, self.topic = port, topic
        self._fh = open(self.out, "wb")  # noqa: SIM115 - closed in stop()
        session = ["-c", "-i", client_id] if persistent else ["-i", client_id + "-clean"]
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", *session, "-t", topic, "-v"],
            stdout=self._fh,
            stderr=subprocess.DEVNULL,
        )

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for line in self.out.read_bytes().decode(errors="replace").splitlines():
            topic, _, payload = line.partition(" ")
            try:
                out.append((topic, json.loads(payload)))
            except ValueError:
                continue
        return out

    def wait_for(self, ids: set[str], timeout: float) -> bool:
        return wait_until(lambda: ids <= {m.get("id") for _, m in self.messages()}, timeout, 0.1)

    def wait_raw(self, token: bytes, timeout: float) -> bool:
        """Wait until ``token`` appears anywhere in what the subscriber printed."""
        return wait_until(lambda: token in self.out.read_bytes(), timeout, 0.05)

    def wait_subscribed(self, timeout: float = 15.0) -> bool:
        """Wait until the subscription is live: probes published on a topic it matches (a non-JSON
        payload, which :meth:`messages` skips) until one comes out of ``mosquitto_sub``."""
        probe_topic = "/".join("_probe" if level in ("+", "#") else level for level in self.topic.split("/"))
        token = f"probe-{uuid.uuid4()}".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Before the SUBSCRIBE is processed a probe goes nowhere; publish again until one arrives.
            mqtt_publish.single(probe_topic, token, qos=1, hostname="127.0.0.1", port=self.port)
            if self.wait_raw(token, 0.3):
                return True
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._fh.close()


def saved_subscriber(broker: Broker, topic: str, out: Path, client_id: str = "plc-checker") -> ExternalSubscriber:
    """A persistent :class:`ExternalSubscriber` whose subscription is live and saved in the broker's
    persistence (autosave every second), so that its session survives a broker SIGKILL."""
    sub = ExternalSubscriber(broker.port, topic, out, client_id=client_id)
    assert sub.wait_subscribed(15), f"{out.name}: mosquitto_sub did not subscribe"
    subscribed_ns = time.time_ns()
    assert broker.wait_persisted(subscribed_ns, 10), "the broker did not save the subscriber's session"
    return sub


@dataclass
class Tally:
    """What a subscriber received against what was sent."""

    sent: int
    received: int  # messages, duplicates included
    unique: int
    redelivered: int  # messages flagged redelivered
    duplicates: int  # extra copies of an id
    # Copies of an id beyond its first *unflagged* one: our side sends an id unflagged at most once,
    # every resend is flagged. (The broker may still add QoS 1 copies on its leg to the subscriber,
    # e.g. from its own persistence after a crash; those carry whatever flag the original had.)
    unflagged_duplicates: int
    lost: int
    lost_ids: list[str] = field(default_factory=list)

    def line(self, label: str) -> str:
        return (
            f"{label}: sent={self.sent} received={self.received} unique={self.unique} "
            f"redelivered={self.redelivered} duplicates={self.duplicates} "
            f"unflagged_duplicates={self.unflagged_duplicates} lost={self.lost}"
        )


def report(capsys: Any, *lines: str) -> None:
    """Print fault-injection figures to the terminal even when pytest captures output (CI logs)."""
    with capsys.disabled():
        print()
        for line in lines:
            print(f"[fault figures] {line}")


def tally(sent_ids: list[str], messages: list[dict[str, Any]]) -> Tally:
    counts = Counter(m.get("id") for m in messages)
    unflagged = Counter(m.get("id") for m in messages if not m.get("redelivered"))
    unflagged_dups = sum(n - 1 for n in unflagged.values() if n > 1)
    lost = [i for i in sent_ids if i not in counts]
    return Tally(
        sent=len(sent_ids),
        received=len(messages),
        unique=len(set(counts) & set(sent_ids)),
        redelivered=sum(1 for m in messages if m.get("redelivered")),
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
        unflagged_duplicates=unflagged_dups,
        lost=len(lost),
        lost_ids=lost[:10],
    )


def kill_when_ready(code: str, delay: float, stderr: Any = None) -> int:
    """Run Python ``code`` in a child; once it prints ``ready``, let it work ``delay`` s, then SIGKILL it.

    SIGKILL runs no cleanup, like a power cut. Returns the child's exit code (-9 when the kill
    landed; anything else means it stopped by itself first).
    """
    import sys

    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.kill()
    finally:
        child.kill()
        child.wait()
    return child.returncode


def line_rig(broker: Any, line: dict[str, Any]) -> Rig:
    """The fault bench's rig (``fault_bench.Rig``) on a test module's broker and synthetic line
    (the ``broker`` and ``line`` fixtures of daemon_fixtures)."""
    from anomalygpt_edge.runtime.tools import fault_bench

    return fault_bench.Rig(broker.host, broker.port, line["store"], line["bundle"], line["video"])


def daemon_with_plc(tmp_path: Path, broker: Any, line: dict[str, Any], device: str) -> tuple[Daemon, Plc]:
    """A started daemon named ``device`` on the line (config ``tmp_path/<device>.yaml``, state in
    ``tmp_path/state``) and the bench's PLC, subscribed before the daemon starts so that it hears
    all the daemon says. The caller stops the daemon, then closes the PLC."""
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.tools import fault_bench

    rig = line_rig(broker, line)
    cfg = fault_bench.write_config(tmp_path / f"{device}.yaml", rig, device, tmp_path / "state")
    plc = fault_bench.Plc(rig, device)
    daemon = Daemon(load_config(cfg)).start()
    # A trigger before a camera delivers frames is an ERROR by design (seen under load): the tests
    # fault the line once it runs, so it starts with every camera delivering.
    if not wait_until(lambda: all(c.online for c in daemon.cameras.values()), 30, 0.05):
        daemon.stop()
        plc.close()
        raise AssertionError(f"{device}: a camera delivered no frame within 30 s")
    return daemon, plc
