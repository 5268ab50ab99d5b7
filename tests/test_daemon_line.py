"""The line daemon end to end against a real mosquitto: a video file through the OpenCV video
camera, verdicts received by a separate MQTT client, PLC triggers answered with their correlation
data, fail-safe ERROR verdicts, status and Last Will."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    REQUIRED_VERDICT_FIELDS,
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)

from anomalygpt_edge.runtime.delivery.messages import VERDICT_SCHEMA
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon


def _start(tmp_path: Path, broker: Any, line: dict, recipe: dict, device: str, **mqtt: Any) -> Daemon:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10, "loop": True}}
    cfg = write_config(
        tmp_path / "line.yaml",
        broker,
        cameras,
        [{"camera": "cam1", "recipe": "bracket", **recipe}],
        line["store"],
        line["bundle"],
        device=device,
        **mqtt,
    )
    return Daemon(load_config(cfg)).start()


def test_free_run_verdicts_from_a_video_file_reach_a_separate_subscriber_with_every_field(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    sub = Subscriber(broker, ["anomalygpt/free/#"])
    daemon = _start(
        tmp_path, broker, line, {"trigger": "free_run", "fps": 10, "deadline_ms": 1000, "heatmap": True}, "free"
    )
    try:
        verdicts = sub.wait_for(topic_is("/cam1/verdict"), count=40, timeout=30)
        # The first status may say "starting" (engines warming up before READY); then "online".
        status = sub.wait_for(
            lambda m: m.topic == "anomalygpt/free/status" and m.json()["state"] != "starting", timeout=30
        )[0].json()
    finally:
        daemon.stop()
    bodies = [m.json() for m in verdicts]
    for body in bodies:
        missing = [f for f in REQUIRED_VERDICT_FIELDS if f not in body]
        assert not missing, f"verdict lacks {missing}"
        assert body["schema"] == VERDICT_SCHEMA
        assert body["camera"] == "cam1" and body["recipe"] == "bracket"
        assert body["verdict"] in ("OK", "NG")
        assert body["bundle_sha256"] == status["bundle_sha256"]
        assert {"queue_wait", "preprocess", "encoder", "matcher", "decide", "publish", "total"} <= set(
            body["latency_ms"]
        )
        assert body["published_at"] >= body["captured_at"]
    assert len({b["id"] for b in bodies}) == len(bodies), "verdict ids must be unique"
    seqs = [b["frame_seq"] for b in bodies]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # The line has defective parts every third part: the free-run stream shows both outcomes, and an
    # NG carries a located region and a heatmap JPEG.
    kinds = {b["verdict"] for b in bodies}
    assert kinds == {"OK", "NG"}, kinds
    ng = next(b for b in bodies if b["verdict"] == "NG")
    assert ng["regions"] and ng["location"] and ng["score"] > ng["threshold"]
    heat = sub.wait_for(topic_is("/cam1/heatmap"))[0]
    assert heat.payload[:2] == b"\xff\xd8", "heatmap is a JPEG"
    assert dict(heat.properties.UserProperty)["verdict_id"] in {b["id"] for b in bodies}
    assert status["state"] == "online" and status["cameras"]["cam1"]["recipe"] == "bracket"
    assert status["version"] and status["engine_backend"].startswith("onnxruntime")
    offline = sub.wait_for(lambda m: m.topic == "anomalygpt/free/status" and m.json()["state"] == "offline")
    assert offline
    sub.close()


def test_a_plc_trigger_is_answered_with_its_part_id_and_correlation_data_echoed(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    sub = Subscriber(broker, ["anomalygpt/trig/#", "plc/answers"])
    daemon = _start(tmp_path, broker, line, {"trigger": "mqtt", "deadline_ms": 2000}, "trig")
    try:
        sub.wait_for(
            lambda m: m.topic == "anomalygpt/trig/status" and m.json()["cameras"]["cam1"]["status"] == "online"
        )
        for i in range(3):
            sub.publish(
                "anomalygpt/trig/cmd/trigger",
                f'{{"camera": "cam1", "part_id": "P-{i}"}}',
                response_topic="plc/answers",
                correlation=f"corr-{i}".encode(),
            )
        answers = sub.wait_for(topic_is("plc/answers"), count=3)
        verdicts = sub.wait_for(topic_is("/cam1/verdict"), count=3)
        # A fixed absence window (nothing signals "no more"): no free-run verdicts in trigger mode.
        time.sleep(0.5)  # nothing else arrives
        assert len([m for m in sub.messages if m.topic.endswith("/verdict")]) == 3
    finally:
        daemon.stop()
        sub.close()
    by_corr = {bytes(m.properties.CorrelationData): m.json() for m in answers}
    assert set(by_corr) == {b"corr-0", b"corr-1", b"corr-2"}
    for i in range(3):
        body = by_corr[f"corr-{i}".encode()]
        assert body["part_id"] == f"P-{i}" and body["correlation_id"] == f"corr-{i}"
        assert body["verdict"] in ("OK", "NG") and body["trigger"] == "trigger"
        assert "frame_wait" in body["latency_ms"]
    assert {v.json()["part_id"] for v in verdicts} == {"P-0", "P-1", "P-2"}


def test_mqtt_311_trigger_is_answered_on_the_reply_topic(tmp_path: Path, broker: Any, line: dict) -> None:
    import paho.mqtt.client as mqtt

    sub = Subscriber(broker, ["anomalygpt/v311/#"], protocol=mqtt.MQTTv311)
    daemon = _start(tmp_path, broker, line, {"trigger": "mqtt", "deadline_ms": 2000}, "v311", protocol="3.1.1")
    try:
        sub.wait_for(
            lambda m: m.topic == "anomalygpt/v311/status" and m.json()["cameras"]["cam1"]["status"] == "online"
        )
        sub.publish("anomalygpt/v311/cmd/trigger", '{"camera": "cam1", "part_id": 42, "correlation_id": "abc"}')
        reply = sub.wait_for(topic_is("/reply/trigger"))[0].json()
    finally:
        daemon.stop()
        sub.close()
    assert reply["part_id"] == "42" and reply["correlation_id"] == "abc" and reply["verdict"] in ("OK", "NG")


def test_a_trigger_that_cannot_be_inspected_before_its_deadline_gets_an_error_verdict(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    sub = Subscriber(broker, ["anomalygpt/late/#"])
    # 5 ms: no frame can arrive and be inspected in time; the PLC must still hear back, at the deadline.
    daemon = _start(tmp_path, broker, line, {"trigger": "mqtt", "deadline_ms": 5}, "late")
    try:
        sub.wait_for(
            lambda m: m.topic == "anomalygpt/late/status" and m.json()["cameras"]["cam1"]["status"] == "online"
        )
        sent = time.time()
        sub.publish("anomalygpt/late/cmd/trigger", '{"camera": "cam1", "part_id": "slow-1"}', correlation=b"x1")
        reply = sub.wait_for(topic_is("/reply/trigger"))[0]
        verdict = sub.wait_for(topic_is("/cam1/verdict"))[0].json()
        time.sleep(0.5)  # a fixed absence window: a second verdict for the part would arrive in it
        verdicts = [m for m in sub.messages if m.topic.endswith("/verdict")]
    finally:
        daemon.stop()
        sub.close()
    assert verdict["verdict"] == "ERROR" and "deadline exceeded" in verdict["reason"]
    assert verdict["part_id"] == "slow-1"
    assert reply.json()["ok"] is False and bytes(reply.properties.CorrelationData) == b"x1"
    assert reply.at - sent < 1.0, "the ERROR comes at the deadline, not whenever the engine is free"
    assert len(verdicts) == 1, "exactly one answer per part"


def test_a_trigger_on_a_camera_that_is_gone_gets_an_error_verdict(tmp_path: Path, broker: Any, line: dict) -> None:
    sub = Subscriber(broker, ["anomalygpt/gone/#"])
    cameras = {"cam1": {"type": "video_file", "source": str(tmp_path / "missing.avi"), "reconnect_max_s": 0.2}}
    cfg = write_config(
        tmp_path / "gone.yaml",
        broker,
        cameras,
        [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt"}],
        line["store"],
        line["bundle"],
        device="gone",
    )
    daemon = Daemon(load_config(cfg)).start()
    try:
        sub.publish("anomalygpt/gone/cmd/trigger", '{"camera": "cam1", "part_id": "P9"}')
        verdict = sub.wait_for(topic_is("/cam1/verdict"))[0].json()
        status = daemon.status()
    finally:
        daemon.stop()
        sub.close()
    assert verdict["verdict"] == "ERROR" and verdict["part_id"] == "P9"
    assert "not delivering frames" in verdict["reason"] and "not found" in verdict["reason"]
    assert status["cameras"]["cam1"]["status"] == "reconnecting"


def test_cameras_sharing_a_bundle_share_its_engines_and_both_get_verdicts(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    import cv2

    from anomalygpt_edge.runtime.tools import synthetic

    folder = tmp_path / "cam2"
    folder.mkdir()
    for i, image in enumerate(synthetic.read_video_frames(line["video"])[:10]):
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    cameras = {
        "cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10},
        "cam2": {"type": "image_folder", "source": str(folder), "fps": 5},
    }
    recipes = [
        {"camera": "cam1", "recipe": "bracket", "fps": 5, "deadline_ms": 2000},
        {"camera": "cam2", "recipe": "bracket", "fps": 5, "deadline_ms": 2000},
    ]
    cfg = write_config(tmp_path / "two.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="two")
    sub = Subscriber(broker, ["anomalygpt/two/+/verdict"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        sub.wait_for(topic_is("/cam1/verdict"), count=3)
        sub.wait_for(topic_is("/cam2/verdict"), count=3)
        workers = [t.name for t in daemon._threads if t.name.startswith("inspect-")]
    finally:
        daemon.stop()
        sub.close()
    assert len(daemon.pipelines) == 1 and {w.rsplit("-", 1)[0] for w in workers} == {"inspect-0"}, workers  # one queue
    assert daemon.inspectors["cam1"].pipeline is daemon.inspectors["cam2"].pipeline


def test_a_failing_verdict_listener_never_stops_verdicts_and_others_still_observe(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    sub = Subscriber(broker, ["anomalygpt/observed/#"])
    seen: list[str] = []

    def broken(job: Any, vid: str, verdict: Any, msg: dict, image: Any) -> None:
        raise RuntimeError("observer bug")

    daemon = Daemon(
        load_config(
            write_config(
                tmp_path / "line.yaml",
                broker,
                {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10, "loop": True}},
                [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 10, "deadline_ms": 1000}],
                line["store"],
                line["bundle"],
                device="observed",
            )
        )
    )
    daemon.verdict_listeners += [broken, lambda job, vid, verdict, msg, image: seen.append(vid)]
    daemon.start()
    try:
        verdicts = sub.wait_for(topic_is("/cam1/verdict"), count=10, timeout=30)
    finally:
        daemon.stop()
    ids = [m.json()["id"] for m in verdicts]
    assert len(ids) >= 10 and set(ids[:5]) <= set(seen)


class _RecordingLink:
    """A link (runtime/line/link.py's members) that records what the daemon sends through it."""

    def __init__(self) -> None:
        import threading

        self.connected = threading.Event()
        self.on_error: Any = None
        self.stats: dict[str, int] = {"published": 0}
        self.sender = None
        self.network_thread = None
        self.verdicts: list[str] = []
        self.json: list[str] = []

    def start(self, wait_s: float = 10.0) -> bool:
        self.connected.set()
        return True

    def stop(self) -> None:
        self.connected.clear()

    def topic(self, *parts: str) -> str:
        return "/".join(("injected", *parts))

    def publish_json(self, topic: str, body: dict, qos: int = 1, retain: bool = False) -> int:
        self.json.append(topic)
        return 0

    def publish_verdict(self, verdict_id: str, topic: str, payload: bytes, on_durable: Any = None) -> None:
        self.verdicts.append(topic)
        if on_durable is not None:
            on_durable(False)

    def publish_heatmap(self, camera: str, verdict_id: str, jpeg: bytes) -> int:
        return 0

    def reply(self, cmd: Any, body: dict) -> None:
        pass


def test_an_injected_link_carries_the_verdicts_and_no_mqtt_link_is_built(tmp_path: Path, line: dict) -> None:
    from types import SimpleNamespace

    nowhere = SimpleNamespace(host="127.0.0.1", port=1)  # no broker: building an MqttLink would warn and retry
    cfg = write_config(
        tmp_path / "line.yaml",
        nowhere,  # type: ignore[arg-type]
        {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10, "loop": True}},
        [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 10, "deadline_ms": 1000}],
        line["store"],
        line["bundle"],
        device="injected",
    )
    import threading

    link = _RecordingLink()
    seen: list[str] = []
    three = threading.Event()

    def observe(job: Any, vid: str, verdict: Any, msg: dict, image: Any) -> None:
        seen.append(vid)
        if len(seen) >= 3:
            three.set()

    daemon = Daemon(load_config(cfg), link=link)
    daemon.verdict_listeners.append(observe)
    daemon.start(mqtt_wait_s=0.0)
    try:
        three.wait(30)
        status = daemon.status()
    finally:
        daemon.stop()
    assert daemon.link is link and link.on_error is not None
    assert len(seen) >= 3 and set(link.verdicts) == {"injected/cam1/verdict"}, (seen, link.verdicts)
    assert "injected/status" in link.json, "camera changes republish the status through the injected link"
    assert status["cameras"]["cam1"]["status"] == "online" and status["state"] == "online", status["problems"]


def test_the_link_counts_published_and_acknowledged_messages_alike_verdicts_included(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    # The station's system page showed "published 13, acked 252": the sender's verdicts were acked
    # on the link's client but counted as published only by the sender.
    sub = Subscriber(broker, ["anomalygpt/counted/#"])
    daemon = _start(tmp_path, broker, line, {"trigger": "free_run", "fps": 10, "deadline_ms": 1000}, "counted")
    try:
        sub.wait_for(topic_is("/cam1/verdict"), count=20, timeout=30)
        deadline = time.monotonic() + 10
        while True:
            stats = daemon.link.stats
            # Both counters move while the line runs: compare them once no publish is in flight.
            if stats["published"] == stats["acked"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        daemon.stop()
    assert stats["published"] >= 20, stats
    assert abs(stats["published"] - stats["acked"]) <= 2, stats
