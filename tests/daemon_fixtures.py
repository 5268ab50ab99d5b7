"""Fixtures and helpers for the line-daemon tests: a real mosquitto on a free loopback port, a
synthetic line as real video files, an enrolled recipe store, a separate MQTT subscriber, and a
config writer. Test modules import the fixtures they use from here."""

from __future__ import annotations

import json
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from anomalygpt_edge.runtime.tools import synthetic
from anomalygpt_edge.runtime.tools.local_broker import LocalBroker, find_mosquitto, start_mosquitto

#: Every field the issue requires in a verdict message.
REQUIRED_VERDICT_FIELDS = (
    "schema",
    "id",
    "camera",
    "recipe",
    "verdict",
    "score",
    "threshold",
    "regions",
    "location",
    "sentence",
    "part_id",
    "frame_seq",
    "captured_at",
    "published_at",
    "latency_ms",
    "bank_version",
    "bundle_sha256",
)


#: The smallest daemon config (YAML): one video camera and one recipe on it. Tests append their
#: own sections, so the line numbers their error messages name start after these nine lines.
ONE_CAMERA_CONFIG = """\
device:
  id: line1
cameras:
  cam1:
    type: video_file
    source: line.avi
recipes:
  - camera: cam1
    recipe: bracket
"""


@pytest.fixture(scope="module", name="broker")
def broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A real mosquitto, loopback only, on a free port, for this test module."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (./edge test installs it)")
    b = start_mosquitto(log_to=tmp_path_factory.mktemp("mosquitto") / "mosquitto.log")
    yield b
    b.stop()


@pytest.fixture(scope="module", name="line")
def line_fixture(default_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic line and golden videos plus a store with the live recipe ``bracket`` (ROI on the part)."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    root = tmp_path_factory.mktemp("line")
    parts = synthetic.write_line_video(root / "line.avi", n_parts=12, frames_per_part=5)
    synthetic.write_golden_video(root / "golden.avi", 20)
    golden = synthetic.read_video_frames(root / "golden.avi")
    enroller = Enroller(RecipeStore(root / "store"), EngineBundle.open(default_bundle_dir))
    enroller.open_or_create("bracket", roi=synthetic.PART_ROI)
    result = enroller.add("bracket", [(f"golden-{i}", im) for i, im in enumerate(golden)])
    assert result.recipe.live
    return {
        "root": root,
        "video": root / "line.avi",
        "golden": root / "golden.avi",
        "parts": parts,
        "store": root / "store",
        "bundle": default_bundle_dir,
    }


def write_config(
    path: Path,
    broker: LocalBroker,
    cameras: dict[str, dict[str, Any]],
    recipes: list[dict[str, Any]],
    store: Path,
    bundle: Path,
    device: str = "line-test",
    **mqtt_extra: Any,
) -> Path:
    """A daemon config file (YAML written as JSON, which YAML reads) for these cameras and recipes."""
    cfg = {
        "device": {"id": device},
        "cameras": cameras,
        "recipes": recipes,
        "engines": {"bundle": str(bundle), "backend": "onnxruntime"},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 10, **mqtt_extra},
        "storage": {"store": str(store), "data": str(path.parent / f"{device}-state")},
    }
    path.write_text(json.dumps(cfg, indent=2))
    return path


Kept = TypeVar("Kept")  # what a RecordingClient keeps of each message


@dataclass
class Received:
    topic: str
    payload: bytes
    properties: Any
    at: float  # epoch seconds when received

    def json(self) -> Any:
        return json.loads(self.payload)


class RecordingClient(ABC, Generic[Kept]):
    """A separate MQTT client (not the daemon's code path) subscribed to ``topics`` at QoS 1: it
    keeps what :meth:`record` makes of each message it receives, for :meth:`wait_for`."""

    def __init__(self, broker: LocalBroker, topics: list[str], protocol: int = mqtt.MQTTv5, client_id: str = ""):
        self.messages: list[Kept] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.connect(broker.host, broker.port, 10)
        self.client.loop_start()
        assert subscribed.wait(10), "subscriber could not subscribe"

    @abstractmethod
    def record(self, msg: mqtt.MQTTMessage) -> Kept | None:
        """What to keep of a received message (on paho's thread); None keeps nothing."""

    @abstractmethod
    def topic_of(self, kept: Kept) -> str:
        """The topic a kept message came on, for the message of a wait that timed out."""

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        kept = self.record(msg)
        if kept is None:
            return
        with self._cond:
            self.messages.append(kept)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Kept], bool], count: int = 1, timeout: float = 15.0) -> list[Kept]:
        """The first ``count`` kept messages matching ``pred`` (waiting up to ``timeout``)."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if pred(m)]
                if len(found) >= count:
                    return found[:count]
                left = end - time.monotonic()
                if left <= 0:
                    topics = sorted({self.topic_of(m) for m in self.messages})
                    raise AssertionError(f"only {len(found)} of {count} messages within {timeout} s; saw {topics}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Subscriber(RecordingClient[Received]):
    """A test's own MQTT client that records everything it receives, and publishes as a PLC would."""

    def record(self, msg: mqtt.MQTTMessage) -> Received:
        return Received(msg.topic, bytes(msg.payload), msg.properties, time.time())

    def topic_of(self, kept: Received) -> str:
        return kept.topic

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def ask(self, device: str, command: str, body: dict[str, Any], timeout: float = 20) -> dict[str, Any]:
        """Send ``cmd/<command>`` with a response topic (``tech/<device>``) and correlation data, as an
        HMI does, and return the daemon's reply to exactly that request."""
        corr = uuid.uuid4().bytes
        self.publish(
            f"anomalygpt/{device}/cmd/{command}", json.dumps(body), response_topic=f"tech/{device}", correlation=corr
        )
        got = self.wait_for(
            lambda m: m.topic == f"tech/{device}" and bytes(m.properties.CorrelationData or b"") == corr,
            timeout=timeout,
        )
        reply: dict[str, Any] = got[0].json()
        return reply


def delivering(daemon: Any, timeout: float = 30) -> Any:
    """``daemon`` (started) once every camera delivers frames: a trigger before a camera's first frame
    is an ERROR by design, and under load the first frame can come seconds after the start."""
    deadline = time.monotonic() + timeout
    while not all(c.online for c in daemon.cameras.values()):
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"a camera delivered no frame within {timeout:.0f} s of the daemon's start")
        time.sleep(0.05)
    return daemon


def two_bracket_versions(tmp_path: Path, line: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(store, old, new): a copy of the line's store under ``tmp_path / "store"`` (the module's stays
    as it is) whose ``bracket`` has a version with a 3x stricter threshold live over the enrolled one."""
    import shutil
    from dataclasses import replace

    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    shutil.copytree(line["store"], tmp_path / "store")
    store = RecipeStore(tmp_path / "store")
    old = store.load("bracket")
    assert old.threshold is not None
    stricter = replace(old.threshold, value=old.threshold.value * 3)
    new = store.commit(replace(old, threshold=stricter), change={"by": "anna", "reason": "fewer false rejects"})
    assert new.bank_version > old.bank_version and new.threshold is not None
    return store, old, new


def topic_is(suffix: str) -> Callable[[Received], bool]:
    return lambda m: m.topic.endswith(suffix)
