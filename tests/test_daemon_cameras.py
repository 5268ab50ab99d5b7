"""Camera sources and their grabbing threads with real files (OpenCV video, image folders), a
camera that vanishes and comes back under the running daemon, folder watch, and the embedded broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import faults  # tests/faults.py: bounded polling
import paho.mqtt.client as mqtt
import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion

from anomalygpt_edge.runtime.cameras import Camera, CameraError, create_source
from anomalygpt_edge.runtime.cameras.base import CameraConfig
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.tools import synthetic
from anomalygpt_edge.runtime.tools.local_broker import LocalBroker
from anomalygpt_edge.runtime.tools.mini_broker import MiniBroker, topic_matches


def _frames_folder(folder: Path, video: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic.read_video_frames(video)[:n]):
        cv2.imwrite(str(folder / f"{i:04d}.png"), image)
    return folder


def test_a_camera_config_built_in_code_is_its_kinds_model_with_its_kinds_keys(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from anomalygpt_edge.runtime.cameras.image_folder import ImageFolderCameraConfig
    from anomalygpt_edge.runtime.cameras.opencv import OpenCVCameraConfig
    from anomalygpt_edge.runtime.line import config as line_config

    assert line_config.CameraConfig is CameraConfig  # the old import path still works
    folder = CameraConfig("inbox", "image_folder", str(tmp_path), fps=5, loop=False)
    assert isinstance(folder, ImageFolderCameraConfig) and folder.loop is False and folder.fps == 5.0
    usb = CameraConfig("usb", "opencv", "0", width=640)
    assert isinstance(usb, OpenCVCameraConfig) and usb.width == 640 and usb.loop is True
    with pytest.raises(ValidationError, match="width"):
        CameraConfig("inbox", "image_folder", str(tmp_path), width=640)  # only opencv has a capture size
    with pytest.raises(ValidationError, match="name"):
        CameraConfig("in box", "opencv", "0")


def test_a_registered_camera_kind_joins_the_config_union_with_its_own_model() -> None:
    from typing import Literal

    from pydantic import TypeAdapter

    from anomalygpt_edge.runtime.cameras import base

    class PatternConfig(base.CameraConfig):
        type: Literal["test_pattern"] = "test_pattern"
        stripes: int = 4

    class PatternSource(base.CameraSource):
        config_model = PatternConfig

        def open(self) -> None:
            pass

        def read(self) -> Any:
            raise CameraError("never read")

    try:
        base.register_source("test_pattern")(PatternSource)
        assert base.camera_kinds()[-1] == "test_pattern"
        parsed = TypeAdapter(base.camera_config_union()).validate_python(
            {"name": "p", "type": "test_pattern", "source": "x", "stripes": 8}
        )
        assert isinstance(parsed, PatternConfig) and parsed.stripes == 8
        assert isinstance(create_source(parsed), PatternSource)
    finally:
        base._SOURCES.pop("test_pattern", None)
        base._CONFIGS.pop("test_pattern", None)


def test_the_grabbing_thread_keeps_only_the_newest_frame(line: dict) -> None:
    cfg = CameraConfig("fast", "video_file", str(line["video"]), fps=100, loop=True)
    statuses: list[str] = []
    cam = Camera(create_source(cfg), on_status=lambda name, status, reason: statuses.append(status)).start()
    try:
        first = cam.wait_frame(timeout=5)
        assert first is not None
        time.sleep(0.3)  # a slow consumer: 30 frames were captured meanwhile
        later = cam.wait_frame(newer_than_seq=first.seq, timeout=2)
        assert later is not None
        assert later.seq >= first.seq + 15, "the reader gets the newest frame, not the next queued one"
        assert later.captured_at > first.captured_at and later.captured_mono > first.captured_mono
        assert time.monotonic() - later.captured_mono < 0.1, "no backlog: the frame is fresh"
        assert later.image.shape == (synthetic.HEIGHT, synthetic.WIDTH, 3)
    finally:
        cam.stop()
    assert statuses[:1] == ["online"] and statuses[-1] == "stopped"


def test_a_video_without_loop_ends_and_says_so(tmp_path: Path) -> None:
    synthetic.write_line_video(tmp_path / "short.avi", n_parts=2, frames_per_part=2)
    ended = threading.Event()
    cfg = CameraConfig("once", "video_file", str(tmp_path / "short.avi"), fps=50, loop=False)
    cam = Camera(create_source(cfg), on_status=lambda n, s, r: s == "ended" and ended.set()).start()
    try:
        assert ended.wait(5)
        assert cam.frames == 4 and cam.latest() is None
    finally:
        cam.stop()


def test_an_opencv_device_that_is_not_there_is_a_clear_camera_error(tmp_path: Path, line: dict) -> None:
    with pytest.raises(CameraError, match="cannot open opencv:/dev/video97"):
        create_source(CameraConfig("usb", "opencv", "/dev/video97")).open()
    # The same VideoCapture path reads any FFmpeg URL or file the way it would an RTSP stream.
    src = create_source(CameraConfig("stream", "opencv", str(line["video"])))
    src.open()
    try:
        image, _ = src.read()
        assert image.shape == (synthetic.HEIGHT, synthetic.WIDTH, 3)
    finally:
        src.close()


def test_a_camera_that_vanishes_is_reopened_with_backoff_and_inspection_resumes(
    tmp_path: Path, broker: LocalBroker, line: dict
) -> None:
    folder = _frames_folder(tmp_path / "frames", line["video"], 15)
    cameras = {
        "cam1": {
            "type": "image_folder",
            "source": str(folder),
            "fps": 10,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.4,
        }
    }
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 10, "deadline_ms": 2000}]
    cfg = write_config(tmp_path / "v.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="van")
    sub = Subscriber(broker, ["anomalygpt/van/#"])
    daemon = Daemon(load_config(cfg)).start()

    def camera_status(state: str) -> Any:
        return lambda m: (
            m.topic.endswith("/status") and m.json().get("cameras", {}).get("cam1", {}).get("status") == state
        )

    try:
        sub.wait_for(topic_is("/cam1/verdict"), count=3)
        folder.rename(tmp_path / "unplugged")  # the cable is pulled
        lost = [m.json()["cameras"]["cam1"]["reason"] for m in sub.wait_for(camera_status("reconnecting"), 2, 10)]
        assert "no such image file" in lost[0] and "not found" in lost[1], lost
        # Several reopen attempts fail meanwhile: the drop, then two failed reopens, counted by the camera.
        camera = daemon.cameras["cam1"]
        assert faults.wait_until(lambda: camera.reconnects >= 3, 10), f"reopen attempts: {camera.info()}"
        seen_while_lost = len([m for m in sub.messages if m.topic.endswith("/verdict")])
        (tmp_path / "unplugged").rename(folder)  # and plugged back in
        # The first "online" after the replug: earlier ones (start, heartbeats) say reconnects 0.
        back = sub.wait_for(
            lambda m: camera_status("online")(m) and m.json()["cameras"]["cam1"]["reconnects"] > 0, timeout=10
        )[0].json()
        after = sub.wait_for(topic_is("/cam1/verdict"), count=seen_while_lost + 3, timeout=15)
    finally:
        daemon.stop()
        sub.close()
    assert back["cameras"]["cam1"]["reconnects"] >= 2
    assert all(v.json()["verdict"] in ("OK", "NG") for v in after)
    seqs = [v.json()["frame_seq"] for v in after]
    assert seqs == sorted(seqs), "frame numbers keep counting across the reconnect"


def test_folder_watch_turns_each_new_file_into_a_part_named_by_the_file(
    tmp_path: Path, broker: LocalBroker, line: dict
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cv2.imwrite(str(inbox / "old.png"), synthetic.read_video_frames(line["video"])[0])  # present at start: not a part
    cameras = {"inbox": {"type": "image_folder", "source": str(inbox)}}
    recipes = [{"camera": "inbox", "recipe": "bracket", "trigger": "folder_watch", "deadline_ms": 5000}]
    cfg = write_config(tmp_path / "w.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="fw")
    sub = Subscriber(broker, ["anomalygpt/fw/#"])
    daemon = Daemon(load_config(cfg)).start()
    frames = synthetic.read_video_frames(line["video"])
    try:
        for i in (0, 12):  # a good part and a scratched one (the third part)
            tmp = inbox / f".part-{i}.tmp"
            cv2.imwrite(str(tmp) + ".png", frames[i])
            Path(str(tmp) + ".png").rename(inbox / f"part-{i}.png")
        (inbox / "broken.png").write_bytes(b"not an image")
        verdicts = [m.json() for m in sub.wait_for(topic_is("/inbox/verdict"), count=3, timeout=20)]
    finally:
        daemon.stop()
        sub.close()
    by_part = {v["part_id"]: v for v in verdicts}
    assert set(by_part) == {"part-0", "part-12", "broken"}
    assert by_part["part-0"]["verdict"] == "OK" and by_part["part-12"]["verdict"] == "NG"
    assert by_part["broken"]["verdict"] == "ERROR" and "not a decodable image" in by_part["broken"]["reason"]
    assert all(v["trigger"] == "folder_watch" for v in verdicts)


def test_the_embedded_broker_routes_retained_messages_wildcards_and_the_last_will() -> None:
    assert topic_matches("a/+/c", "a/b/c") and topic_matches("a/#", "a/b/c") and not topic_matches("a/+", "a/b/c")
    broker = MiniBroker().start()
    got: list[tuple[str, bytes, bool]] = []
    done = threading.Event()

    def client(cid: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
        return c

    try:
        pub = client("pub")
        pub.will_set("dev/status", b"offline", qos=1, retain=True)
        pub.connect("127.0.0.1", broker.port, 10)
        pub.loop_start()
        pub.publish("dev/status", b"online", qos=1, retain=True).wait_for_publish(5)
        sub = client("sub")

        def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
            got.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            if len(got) >= 3:
                done.set()

        sub.on_message = on_message
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect("127.0.0.1", broker.port, 10)
        sub.loop_start()
        sub.subscribe("dev/#", qos=1)
        assert subscribed.wait(5)
        pub.publish("dev/cam/verdict", b'{"verdict":"OK"}', qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.socket().close()  # dies without DISCONNECT: the broker publishes its Will
        assert done.wait(5), got
        v5 = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
        refused = threading.Event()
        v5.on_connect = lambda c, u, f, rc, p: rc.is_failure and refused.set()
        v5.connect("127.0.0.1", broker.port, 10)
        v5.loop_start()
        assert refused.wait(5), "MQTT 5 is refused, not half-spoken"
        v5.loop_stop()
        sub.loop_stop()
    finally:
        broker.stop()
    assert got[0] == ("dev/status", b"online", True)
    assert got[1] == ("dev/cam/verdict", b'{"verdict":"OK"}', False)
    assert got[2] == ("dev/status", b"offline", False)
