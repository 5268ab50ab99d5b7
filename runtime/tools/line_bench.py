"""``anomalygpt-edge bench line``: the daemon on a video camera, measured from a separate process.

The parent renders a synthetic line video and golden parts, enrolls them with the default bundle,
starts mosquitto, and runs the daemon (free-run at ``--fps`` on a looping video-file camera
paced at the same rate). A separate subscriber process (``python -m
anomalygpt_edge.runtime.tools.line_bench --subscribe ...``, its own interpreter and MQTT connection, like
a PLC gateway) records when each verdict arrives and sends PLC triggers with correlation data.

Figures: capture→verdict-received latency p50/p99/max (the verdict's ``captured_at_epoch`` against
the subscriber's clock: same host, same clock), sustained verdicts/s, the share of captured frames
that got a verdict, and triggered parts answered (with trigger→answer latency).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WARMUP_S = 3.0  # engine warm-up and first connections: not part of the measured window


def _subscriber(host: str, port: int, prefix: str, out: Path, seconds: float, triggers: int) -> None:
    """The separate process: record verdicts, send triggers, write what it saw as JSON."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    verdicts: list[dict[str, Any]] = []
    answers: dict[str, float] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        body = json.loads(msg.payload)
        with lock:
            if msg.topic.endswith("/verdict"):
                verdicts.append(
                    {
                        "received": now,
                        "captured": body.get("captured_at_epoch"),
                        "seq": body.get("frame_seq"),
                        "trigger": body.get("trigger"),
                        "verdict": body.get("verdict"),
                        "stages": body.get("latency_ms", {}),
                    }
                )
            elif msg.topic == "bench/answers":
                answers[bytes(msg.properties.CorrelationData).decode()] = now

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-plc-{os.getpid()}", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe([(f"{prefix}/+/verdict", 1), ("bench/answers", 1)])
    client.connect(host, port, 30)
    client.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)  # the parent starts the daemon now
    sent: dict[str, float] = {}
    start = time.monotonic()
    gap = (seconds - WARMUP_S - 2.0) / max(1, triggers)
    for i in range(triggers):
        time.sleep(max(0.0, start + WARMUP_S + gap * (i + 0.5) - time.monotonic()))
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bench/answers"
        props.CorrelationData = f"t{i}".encode()
        sent[f"t{i}"] = time.time()
        client.publish(f"{prefix}/cmd/trigger", json.dumps({"camera": "cam1", "part_id": f"P{i}"}), 1, properties=props)
    time.sleep(max(0.0, start + seconds + 1.5 - time.monotonic()))
    client.disconnect()
    client.loop_stop()
    with lock:
        out.write_text(json.dumps({"verdicts": verdicts, "sent": sent, "answers": answers}))


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 1) if values else None


def _write_config(path: Path, args: argparse.Namespace, work: Path, bundle: Path, host: str, port: int) -> Path:
    """The daemon's config: one free-running video camera on the enrolled recipe (YAML written as JSON)."""
    path.write_text(
        json.dumps(
            {
                "device": {"id": "bench"},
                "cameras": {"cam1": {"type": "video_file", "source": str(work / "line.avi"), "fps": args.fps}},
                "recipes": [
                    {
                        "camera": "cam1",
                        "recipe": "bracket",
                        "trigger": "free_run",
                        "fps": args.fps,
                        "deadline_ms": args.deadline_ms,
                    }
                ],
                "engines": {"bundle": str(bundle), "backend": args.backend, "threads": args.threads},
                "mqtt": {"host": host, "port": port},
                "storage": {"store": str(work / "store"), "data": str(work / "state")},
            }
        )
    )
    return path


def _figures(data: dict[str, Any], t0: float, args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """The bench's figures from what the subscriber recorded, past the warm-up after ``t0``."""
    verdicts = [v for v in data["verdicts"] if v["captured"] and v["captured"] >= t0 + WARMUP_S]
    free = [v for v in verdicts if v["trigger"] == "free_run"]
    lat = [(v["received"] - v["captured"]) * 1e3 for v in verdicts]
    seqs = sorted({v["seq"] for v in free})
    window = (max(v["received"] for v in verdicts) - min(v["received"] for v in verdicts)) if verdicts else 0.0
    trig_lat = [(data["answers"][k] - data["sent"][k]) * 1e3 for k in data["answers"] if k in data["sent"]]
    stage_names = ("queue_wait", "preprocess", "encoder", "matcher", "decide", "publish")
    stages = {s: _pct([v["stages"].get(s, 0.0) for v in verdicts], 50) for s in stage_names}
    figures = {
        "fps": args.fps,
        "seconds_measured": round(window, 1),
        "verdicts": len(verdicts),
        "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": round(max(lat), 1) if lat else None},
        "verdicts_per_s": round((len(verdicts) - 1) / window, 2) if window > 0 else None,
        "share_of_frames_inspected": round(len(seqs) / (seqs[-1] - seqs[0] + 1), 4) if seqs else None,
        "errors_free_run": sum(v["verdict"] == "ERROR" for v in free),
        "errors_triggered": sum(v["verdict"] == "ERROR" for v in verdicts if v["trigger"] != "free_run"),
        "triggers": {
            "sent": len(data["sent"]),
            "answered": len(data["answers"]),
            "latency_ms_p50": _pct(trig_lat, 50),
            "latency_ms_max": round(max(trig_lat), 1) if trig_lat else None,
        },
        "stage_ms_p50": stages,
        "deadline_ms": args.deadline_ms,
        "backend": args.backend,
        "threads": args.threads,
        "bundle": str(bundle),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    return figures


def _print_figures(figures: dict[str, Any]) -> None:
    """The figures as the lines BENCHMARKS.md quotes."""
    lt, tr = figures["latency_ms"], figures["triggers"]
    measured = f"{figures['seconds_measured']} s measured ({figures['verdicts']} verdicts)"
    print(f"line daemon at {figures['fps']:g} fps, {measured}")
    print(f"  capture -> verdict received   p50 {lt['p50']} ms   p99 {lt['p99']} ms   max {lt['max']} ms")
    print(f"  sustained verdicts/s          {figures['verdicts_per_s']}")
    print(f"  share of frames inspected     {figures['share_of_frames_inspected']}")
    errors = f"{figures['errors_free_run']} free-run, {figures['errors_triggered']} triggered"
    print(f"  ERROR verdicts                {errors}")
    print(f"  triggered parts answered      {tr['answered']} of {tr['sent']} (p50 {tr['latency_ms_p50']} ms)")
    print("  stage medians (ms)            " + ", ".join(f"{k} {v}" for k, v in figures["stage_ms_p50"].items()))


def run(args: argparse.Namespace) -> int:
    """``bench line``: enroll, run the daemon free-running at ``--fps`` against mosquitto, report."""
    import logging

    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.defaults import DEFAULT_BUNDLE
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.tools import synthetic
    from anomalygpt_edge.runtime.tools.demo import ensure_bundle
    from anomalygpt_edge.runtime.tools.local_broker import start_mosquitto

    logging.getLogger("anomalygpt_edge").setLevel(logging.WARNING)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle).resolve() if args.bundle else ensure_bundle(DEFAULT_BUNDLE.resolve())
    synthetic.write_line_video(work / "line.avi", n_parts=30, frames_per_part=5, fps=args.fps)
    synthetic.write_golden_video(work / "golden.avi", 20)
    import shutil

    shutil.rmtree(work / "store", ignore_errors=True)
    shutil.rmtree(work / "state", ignore_errors=True)
    enroller = Enroller(RecipeStore(work / "store"), EngineBundle.open(bundle, backend=args.backend))
    enroller.open_or_create("bracket", roi=synthetic.PART_ROI)
    enroller.add("bracket", [(f"g{i}", im) for i, im in enumerate(synthetic.read_video_frames(work / "golden.avi"))])

    broker = start_mosquitto()
    cfg = _write_config(work / "bench.yaml", args, work, bundle, broker.host, broker.port)
    seen = work / "subscriber.json"
    seen.unlink(missing_ok=True)
    sub = subprocess.Popen(
        [sys.executable, "-m", "anomalygpt_edge.runtime.tools.line_bench", "--subscribe", broker.host, str(broker.port),
         "anomalygpt/bench", str(seen), str(args.seconds), str(args.triggers)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sub.stdout is not None
        sub.stdout.readline()  # "ready"
        t0 = time.time()
        daemon = Daemon(load_config(cfg)).start()
        try:
            time.sleep(args.seconds)
        finally:
            daemon.stop()
        sub.wait(30)
    finally:
        broker.stop()
    figures = _figures(json.loads(seen.read_text()), t0, args, bundle)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    _print_figures(figures)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--subscribe":
        host, port, prefix, out, seconds, triggers = sys.argv[2:]
        _subscriber(host, int(port), prefix, Path(out), float(seconds), int(triggers))
    else:
        sys.exit("usage: python -m anomalygpt_edge.runtime.tools.line_bench --subscribe HOST PORT PREFIX OUT SECONDS N")
