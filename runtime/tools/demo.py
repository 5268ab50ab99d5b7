"""``anomalygpt-edge demo`` (the README's ``./edge demo``): the line daemon end to end on a fresh machine.

1. exports the default engine bundle if it is missing (the same first run as every command's);
2. renders a synthetic line (brackets on a belt, some scratched, stained or missing a hole) and a
   few golden parts as real video files;
3. enrolls the golden parts, read back through the OpenCV video-file camera;
4. starts a broker (the configured one, else mosquitto on a free port, else the embedded one);
5. runs the daemon on the line video and shows the verdicts as a PLC subscriber (a separate MQTT
   client) receives them; a simulated PLC also sends a few triggers with part ids;
6. checks that ``mosquitto_sub`` (a subscriber that is not our code) got schema-complete verdicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.defaults import DEFAULT_BUNDLE

DEVICE = "demo-line"
FRAMES_PER_PART = 5
FPS = 10.0
GOLDEN = 20
REQUIRED = (
    "schema", "id", "camera", "recipe", "verdict", "score", "threshold", "regions", "location", "sentence",
    "part_id", "frame_seq", "captured_at", "published_at", "latency_ms", "bank_version", "bundle_sha256",
)  # fmt: skip


def say(text: str = "") -> None:
    print(text, flush=True)


def ensure_bundle(path: Path) -> Path:
    """The default bundle, exported by the product's own exporter when it is not there yet.

    The same first run as every command's (export/first_run.py): one line, a lock against a
    concurrent first run, and a clear error on an install without the export extra.
    """
    from anomalygpt_edge.export.first_run import ensure_default_bundle

    return ensure_default_bundle(path)


def read_through_camera(video: Path) -> list[Any]:
    """Every frame of ``video`` via the OpenCV video-file camera source (as the daemon reads the line)."""
    from anomalygpt_edge.runtime.cameras.base import EndOfStreamError, create_source
    from anomalygpt_edge.runtime.cameras.video_file import VideoFileCameraConfig

    src = create_source(VideoFileCameraConfig(name="golden", source=str(video), fps=1000, loop=False))
    src.open()
    frames = []
    try:
        while True:
            frames.append(src.read()[0])
    except EndOfStreamError:
        pass
    finally:
        src.close()
    return frames


def write_config(path: Path, work: Path, bundle: Path, host: str, port: int, protocol: str, mqtt_extra: str) -> Path:
    path.write_text(
        f"""# Written by `anomalygpt-edge demo`: the synthetic line, run as a plant would run it.
device:
  id: {DEVICE}
cameras:
  cam1:
    type: video_file
    source: {work / "line.avi"}
    fps: {FPS:g}
    loop: false
recipes:
  - camera: cam1
    recipe: bracket
    trigger: free_run
    fps: {FPS:g}
    deadline_ms: 500
    heatmap: true
engines:
  bundle: {bundle}
  backend: auto
mqtt:
  host: {host}
  port: {port}
  protocol: "{protocol}"
{mqtt_extra}storage:
  store: {work / "store"}
  data: {work / "state"}
"""
    )
    return path


class PlcView:
    """A separate MQTT client, as a PLC gateway would be: prints verdicts and trigger answers as they arrive."""

    def __init__(self, host: str, port: int, protocol: str, prefix: str, extra: dict[str, Any]):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.prefix = prefix
        self.verdicts: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.received_at: list[float] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"demo-plc-{int(time.time())}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        if extra.get("username"):
            self.client.username_pw_set(extra["username"], extra.get("password"))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        topics = [(f"{prefix}/{DEVICE}/+/verdict", 1), ("demo/plc/answers", 1), (f"{prefix}/{DEVICE}/reply/trigger", 1)]
        self.client.on_connect = lambda c, *a: c.subscribe(topics)
        self.client.on_message = self._on_message
        self.client.connect(host, port, 30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit(f"demo: cannot subscribe at {host}:{port}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        body = json.loads(msg.payload)
        with self._lock:
            if msg.topic.endswith("/verdict"):
                self.verdicts.append(body)
                self.received_at.append(now)
                self._print(body, now)
            else:
                self.answers.append(body)
                corr = body.get("correlation_id")
                say(f"  PLC  answer to trigger {corr}: part {body.get('part_id')} -> {body.get('verdict')}")

    @staticmethod
    def _print(v: dict[str, Any], now: float) -> None:
        latency = (now - v["captured_at_epoch"]) * 1e3 if v.get("captured_at_epoch") else float("nan")
        score = f"{v['score']:.3f}/{v['threshold']:.3f}" if v["score"] is not None else "-"
        where = f"  {v['location']}" if v.get("location") else ""
        part = f"part {v['part_id']}" if v.get("part_id") else f"frame {v['frame_seq']:>3}"
        note = f"  ({v['reason']})" if v.get("reason") else where
        when = v["published_at"][11:23]
        say(f"  PLC  {when}  {v['camera']}  {part:<11} {v['verdict']:<5} {score}  {latency:5.0f} ms{note}")

    def trigger(self, part_id: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if self.client.protocol == 5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "demo/plc/answers"
            props.CorrelationData = f"plc-{part_id}".encode()
        body = json.dumps({"camera": "cam1", "part_id": part_id, "correlation_id": f"plc-{part_id}"})
        self.client.publish(f"{self.prefix}/{DEVICE}/cmd/trigger", body, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class _Broker:
    """Where the demo's daemon and PLC connect: a started local broker, or the one a config names."""

    host: str
    port: int
    protocol: str
    prefix: str
    extra: dict[str, Any] = field(default_factory=dict)  # username / password for the PLC client
    mqtt_extra: str = ""  # lines added under mqtt: in the daemon's config
    local: Any = None  # the broker this demo started (stopped at the end), None for a configured one


def _enroll(work: Path, bundle: Path) -> bool:
    """Enroll the golden parts read through the OpenCV video camera; whether a live recipe came of it."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.tools import synthetic

    say(f"[demo] enrolling {GOLDEN} golden parts read through the OpenCV video camera ...")
    enroller = Enroller(RecipeStore(work / "store"), EngineBundle.open(bundle))
    enroller.open_or_create("bracket", roi=synthetic.PART_ROI)
    golden = read_through_camera(work / "golden.avi")
    result = enroller.add("bracket", [(f"golden-{i:02d}", im) for i, im in enumerate(golden)])
    t = result.threshold
    say(f"       recipe bracket: {len(result.recipe.samples)} golden parts, quality check "
        f"{'passed' if result.quality and result.quality.ok else 'FAILED'}, threshold {t.value:.4g} ({t.method})"
        if t else "       recipe bracket: no threshold")  # fmt: skip
    return result.recipe.live


def _broker(args: argparse.Namespace) -> _Broker:
    """The broker of ``--config`` (raises ConfigError), else a local one started now."""
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.tools.local_broker import start_local_broker

    if args.config is not None:
        user = load_config(args.config).mqtt
        mqtt_extra = f"  prefix: {user.prefix}\n"
        if user.username:
            mqtt_extra += f"  username: {user.username}\n  password_file: {user.password_file}\n"
        say(f"[demo] using the broker from {args.config}: {user.host}:{user.port}")
        extra = {"username": user.username, "password": user.password}
        return _Broker(user.host, user.port, user.protocol, user.prefix, extra, mqtt_extra)
    broker = start_local_broker(prefer_embedded=args.embedded_broker)
    protocol = "5" if "5" in broker.protocols else "3.1.1"
    what = "mosquitto" if broker.kind == "mosquitto" else "the embedded Python broker (MQTT 3.1.1)"
    say(f"[demo] no broker configured: started {what} on {broker.host}:{broker.port}")
    return _Broker(broker.host, broker.port, protocol, "anomalygpt", local=broker)


def _start_subscriber(b: _Broker, topic: str, out: Path) -> subprocess.Popen | None:
    """``mosquitto_sub`` on the verdict topic writing to ``out``, where it is installed."""
    if not shutil.which("mosquitto_sub"):
        return None
    # A subscriber that is not our code: its output is checked for schema-complete verdicts below.
    cmd = ["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-t", topic, "-q", "1", "-W", "90"]
    cmd += ["-V", "mqttv5" if b.protocol == "5" else "mqttv311"]
    if b.extra.get("username"):
        cmd += ["-u", b.extra["username"], "-P", b.extra.get("password") or ""]
    return subprocess.Popen(cmd, stdout=open(out, "wb"), stderr=subprocess.DEVNULL)  # noqa: SIM115


def _run_line(daemon: Any, plc: PlcView, n_parts: int) -> int:
    """Let the video play through, with three PLC triggers along the way; how many were sent."""
    cam = daemon.cameras["cam1"]
    triggered = 0
    deadline = time.monotonic() + n_parts * FRAMES_PER_PART / FPS + 20
    next_trigger = time.monotonic() + 2.0
    while cam.status not in ("ended", "stopped") and time.monotonic() < deadline:
        if triggered < 3 and time.monotonic() >= next_trigger:
            triggered += 1
            plc.trigger(f"T-{triggered}")  # the PLC asks about the part under the camera now
            next_trigger += 3.0
        time.sleep(0.05)
    time.sleep(1.0)  # the last frames' verdicts are in flight
    return triggered


def run(args: argparse.Namespace) -> int:
    """``anomalygpt-edge demo``: render a line, enroll, run the daemon against a broker, summarise."""
    t_start = time.monotonic()
    if not getattr(args, "verbose", False):
        # The demo's own lines tell the story; the daemon's INFO log would interleave with them.
        logging.getLogger("anomalygpt_edge").setLevel(logging.WARNING)
    from anomalygpt_edge.runtime.line.config import ConfigError, load_config
    from anomalygpt_edge.runtime.tools import synthetic

    work = args.workdir.resolve()
    for old in ("store", "state"):
        shutil.rmtree(work / old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle((getattr(args, "bundle", None) or DEFAULT_BUNDLE).resolve())

    say(f"[demo] rendering the synthetic line: {args.parts} brackets, {FRAMES_PER_PART} frames each at {FPS:g} fps")
    parts = synthetic.write_line_video(work / "line.avi", n_parts=args.parts, frames_per_part=FRAMES_PER_PART, fps=FPS)
    synthetic.write_golden_video(work / "golden.avi", GOLDEN)
    defects = {p.number: p.defect for p in parts if p.defect}
    say(f"       {work / 'line.avi'}; defective parts: " + ", ".join(f"#{n} {d}" for n, d in defects.items()))
    if not _enroll(work, bundle):
        say("demo: the golden parts did not make a live recipe")
        return 1
    try:
        b = _broker(args)
    except ConfigError as exc:
        say(f"error: {exc}")
        return 2
    cfg_path = write_config(work / "line.yaml", work, bundle, b.host, b.port, b.protocol, b.mqtt_extra)
    config = load_config(cfg_path)
    say(f"[demo] daemon config: {cfg_path}")
    topic = f"{b.prefix}/{DEVICE}/+/verdict"
    say(f"[demo] watch it yourself while it runs:  mosquitto_sub -h {b.host} -p {b.port} -t '{topic}' -v")
    sub_out = work / "mosquitto_sub.txt"
    sub_proc = _start_subscriber(b, topic, sub_out)
    plc = PlcView(b.host, b.port, b.protocol, b.prefix, b.extra)
    time.sleep(0.3)  # let mosquitto_sub subscribe before the first verdict

    # Imported here, as before the split: the import's time also lets mosquitto_sub subscribe.
    from anomalygpt_edge.runtime.line.daemon import Daemon

    daemon = Daemon(config).start()
    say("[demo] line running; verdicts as the PLC receives them:")
    triggered = 0
    try:
        triggered = _run_line(daemon, plc, len(parts))
    finally:
        daemon.stop()
        plc.close()
        if sub_proc is not None:
            time.sleep(0.3)
            sub_proc.terminate()
            sub_proc.wait(5)
        if b.local is not None:
            b.local.stop()
    return summarize(plc, parts, defects, sub_out if sub_proc else None, triggered, time.monotonic() - t_start)


def summarize(
    plc: PlcView, parts: list[Any], defects: dict[int, str], sub_out: Path | None, triggered: int, seconds: float
) -> int:
    import numpy as np

    free = [v for v in plc.verdicts if v["trigger"] == "free_run"]
    per_part: dict[int, list[str]] = {}
    for v in free:
        per_part.setdefault((v["frame_seq"] - 1) // FRAMES_PER_PART + 1, []).append(v["verdict"])
    caught = [n for n in defects if "NG" in per_part.get(n, [])]
    good = [p.number for p in parts if not p.defect]
    false = [n for n in good if per_part.get(n, []).count("NG") > len(per_part.get(n, [])) / 2]
    lat = np.array([(t - v["captured_at_epoch"]) * 1e3 for v, t in zip(plc.verdicts, plc.received_at)])
    counts = {k: sum(v["verdict"] == k for v in plc.verdicts) for k in ("OK", "NG", "ERROR")}
    say()
    say("[demo] summary")
    say(f"  verdicts received by the PLC subscriber: {len(plc.verdicts)} ({counts['OK']} OK, {counts['NG']} NG, "
        f"{counts['ERROR']} ERROR) for {len(parts) * FRAMES_PER_PART} frames")  # fmt: skip
    say(f"  defective parts caught: {len(caught)} of {len(defects)}; good parts rejected: {len(false)} of {len(good)}")
    if lat.size:
        say(f"  capture -> verdict received: p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms")
    say(f"  PLC triggers answered: {len(plc.answers)} of {triggered}")
    ok = bool(plc.verdicts) and len(plc.answers) == triggered
    if sub_out is not None:
        lines = [ln for ln in sub_out.read_bytes().splitlines() if ln.strip()]
        complete = 0
        for ln in lines:
            try:
                body = json.loads(ln)
                complete += all(k in body for k in REQUIRED)
            except ValueError:
                pass
        say(f"  mosquitto_sub (not our code) received {len(lines)} verdicts, {complete} schema-complete ({sub_out})")
        ok = ok and complete > 0 and complete == len(lines)
    say(f"  done in {seconds:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(
        run(argparse.Namespace(workdir=Path("out/demo"), config=None, parts=24, embedded_broker=False, bundle=None))
    )
