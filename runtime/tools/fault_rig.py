"""The rig every fault scenario runs on: a PLC on its own MQTT connection, the daemon's config and
start, and the figures (tallies, percentiles, lost verdicts) the scenarios report.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANSWERS = "plc/answers"


@dataclass
class Rig:
    """What every scenario needs: a broker, the enrolled recipe store, the bundle and a line video."""

    host: str
    port: int
    store: Path
    bundle: Path
    video: Path
    recipe: str = "bracket"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (a latency that really happened), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return round(ordered[int(min(rank, len(ordered))) - 1], 1)


def wait_until(pred: Callable[[], Any], timeout: float, step: float = 0.05) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds passed (bounded, no fixed sleeps)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


class Plc:
    """A PLC on its own MQTT connection: sends triggers with correlation data, records answers,
    verdicts and status documents with their arrival times."""

    def __init__(self, rig: Rig, device: str, prefix: str = "anomalygpt"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.base = f"{prefix}/{device}"
        self.lock = threading.RLock()
        self.sent: dict[str, float] = {}
        self.answers: dict[str, list[tuple[float, dict]]] = {}
        self.verdicts: list[tuple[float, dict]] = []
        self.statuses: list[tuple[float, dict]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"plc-{uuid.uuid4().hex[:8]}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        topics = [(f"{self.base}/+/verdict", 1), (f"{self.base}/status", 1), (ANSWERS + "/" + device, 1)]
        self.client.on_connect = lambda c, *a: c.subscribe(topics)
        self.answer_topic = ANSWERS + "/" + device
        self.client.connect(rig.host, rig.port, 30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("PLC could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if msg.topic == self.answer_topic:
                corr = bytes(getattr(msg.properties, "CorrelationData", b"") or b"").decode(errors="replace")
                self.answers.setdefault(corr, []).append((now, body))
            elif msg.topic.endswith("/verdict"):
                self.verdicts.append((now, body))
            elif msg.topic.endswith("/status"):
                self.statuses.append((now, body))

    def trigger(self, camera: str, corr: str) -> None:
        """Send one PLC trigger whose reply carries ``corr`` as correlation data."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.answer_topic
        props.CorrelationData = corr.encode()
        with self.lock:
            self.sent[corr] = time.time()
        self.client.publish(f"{self.base}/cmd/trigger", json.dumps({"camera": camera, "part_id": corr}), 1,
                            properties=props)  # fmt: skip

    def command(self, name: str, body: dict[str, Any], corr: str) -> None:
        """Send ``cmd/<name>`` whose reply (on this PLC's answer topic) carries ``corr``."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.answer_topic
        props.CorrelationData = corr.encode()
        with self.lock:
            self.sent[corr] = time.time()
        self.client.publish(f"{self.base}/cmd/{name}", json.dumps(body), 1, properties=props)

    def reply(self, corr: str, timeout: float) -> dict[str, Any] | None:
        """The first answer carrying ``corr`` (waiting up to ``timeout``), None if none came."""
        wait_until(lambda: self.answers.get(corr), timeout)
        with self.lock:
            got = self.answers.get(corr)
        return got[0][1] if got else None

    def last_status(self) -> dict[str, Any]:
        """The newest retained status seen (``{}`` before the first)."""
        with self.lock:
            docs = [d for _, d in self.statuses if d.get("state") != "offline"]
        return docs[-1] if docs else {}

    def status_since(self, t: float, pred: Callable[[dict], bool]) -> float | None:
        """Arrival time of the first status after ``t`` that satisfies ``pred``."""
        with self.lock:
            for at, doc in self.statuses:
                if at >= t and pred(doc):
                    return at
        return None

    def verdict_ids(self) -> Counter[str]:
        """How often each verdict id arrived on the verdict topic."""
        with self.lock:
            return Counter(str(v.get("id")) for _, v in self.verdicts)

    def close(self) -> None:
        """Disconnect the PLC."""
        self.client.disconnect()
        self.client.loop_stop()


def tally(plc: Plc, corrs: list[str], deadline_ms: float) -> dict[str, Any]:
    """Answered / in time / errors / duplicate answers / latency for the triggers ``corrs``."""
    with plc.lock:
        lat, errors, dup, answered = [], 0, 0, 0
        for c in corrs:
            got = plc.answers.get(c, [])
            if not got:
                continue
            answered += 1
            dup += len(got) - 1
            at, body = got[0]
            lat.append((at - plc.sent[c]) * 1e3)
            errors += body.get("verdict") == "ERROR"
    return {
        "sent": len(corrs),
        "answered": answered,
        "in_time": sum(v <= deadline_ms for v in lat),
        "errors": errors,
        "duplicate_answers": dup,
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": percentile(lat, 100)},
    }


def write_config(
    path: Path,
    rig: Rig,
    device: str,
    data: Path,
    camera: dict[str, Any] | None = None,
    binding: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    heartbeat_s: float = 1.0,
) -> Path:
    """A daemon config for one camera ``cam1`` (YAML written as JSON)."""
    cfg = {
        "device": {"id": device},
        "cameras": {"cam1": camera or {"type": "video_file", "source": str(rig.video), "fps": 10, "loop": True}},
        "recipes": [
            {"camera": "cam1", "recipe": rig.recipe, "trigger": "mqtt", "deadline_ms": 1000, **(binding or {})}
        ],
        "engines": {"bundle": str(rig.bundle), "backend": "onnxruntime"},
        "mqtt": {"host": rig.host, "port": rig.port, "keepalive": 10},
        "storage": {"store": str(rig.store), "data": str(data), **(storage or {})},
        "health": {"heartbeat_s": heartbeat_s},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def start_daemon(config: Path) -> Any:
    """The real daemon started in this process on the config at ``config``."""
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon

    return Daemon(load_config(config)).start()


@contextlib.contextmanager
def daemon_and_plc(rig: Rig, device: str, config: Path) -> Iterator[tuple[Plc, Any]]:
    """A PLC for ``device`` and the daemon started on ``config``, both stopped after the block (the
    daemon first); the PLC's records stay readable for the figures."""
    plc = Plc(rig, device)
    try:
        daemon = start_daemon(config)
        try:
            yield plc, daemon
        finally:
            daemon.stop()
    finally:
        plc.close()


def wait_online(plc: Plc, timeout: float = 20.0) -> bool:
    """Wait until the daemon's status says it serves (online or degraded)."""
    return wait_until(lambda: plc.last_status().get("state") in ("online", "degraded"), timeout)


def count_lost(plc: Plc, ids: set[str], timeout: float) -> int:
    """How many of the answered verdict ``ids`` never reached the verdict topic (waiting up to ``timeout``)."""
    wait_until(lambda: ids <= set(plc.verdict_ids()), timeout, 0.1)
    return len(ids - set(plc.verdict_ids()))


def answer_ids(plc: Plc, corrs: list[str]) -> set[str]:
    """The verdict ids the answers to the triggers ``corrs`` carried."""
    with plc.lock:
        return {
            str(plc.answers[c][0][1].get("id")) for c in corrs if plc.answers.get(c) and plc.answers[c][0][1].get("id")
        }
