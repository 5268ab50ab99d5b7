"""``anomalygpt-edge bench line``: the daemon on video cameras, measured from a separate process.

The parent renders a synthetic line video and golden parts, enrolls them with the default bundle,
starts mosquitto, and runs the daemon (``--cameras`` looping video-file cameras sharing one bundle,
each free-run at ``--fps`` and paced at the same rate). A separate subscriber process (``python -m
anomalygpt_edge.runtime.tools.line_bench --subscribe ...``, its own interpreter and MQTT connection, like
a PLC gateway) records when each verdict arrives and sends PLC triggers (round robin over the
cameras) with correlation data.

The daemon runs twice in the same bench run, each with a fresh daemon and subscriber: the path
under test (``--workers`` inspection workers per bundle queue, default ``auto``, and
``--max-batch``, default 1) and the old path (one worker, ``max_batch: 1``). The figures of the
path under test are the top-level keys, the old path's are under ``unbatched`` (the key kept from
when the comparison was batched vs unbatched; ``baseline`` says what it ran) and ``ratios``
compares them (new ÷ old). ``--no-compare`` runs the path under test alone.

Figures, overall and per camera: capture→verdict-received latency p50/p99/max (the verdict's
``captured_at_epoch`` against the subscriber's clock: same host, same clock), sustained
verdicts/s, the share of captured frames that got a verdict, ERROR verdicts, triggered parts
answered (with trigger→answer latency); the bench process's CPU % (daemon and camera threads,
100 % = one core) and peak RSS; the mean batch size.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WARMUP_S = 3.0  # engine warm-up and first connections: not part of the measured window


def _subscriber(
    host: str, port: int, prefix: str, out: Path, seconds: float, triggers: int, cameras: int = 1, spb: bool = False
) -> None:
    """The separate process: record verdicts (and Sparkplug DDATA with ``spb``), send triggers, write what it saw."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from anomalygpt_edge.runtime.tools.sparkplug_bench import SparkplugRecorder

    verdicts: list[dict[str, Any]] = []
    answers: dict[str, float] = {}
    lock = threading.Lock()
    subscribed = threading.Event()
    recorder = SparkplugRecorder()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        with lock:
            if recorder.on_message(msg, now):
                return
        body = json.loads(msg.payload)
        with lock:
            if msg.topic.endswith("/verdict"):
                verdicts.append(
                    {
                        "camera": msg.topic.split("/")[-2],
                        "received": now,
                        "captured": body.get("captured_at_epoch"),
                        "seq": body.get("frame_seq"),
                        "trigger": body.get("trigger"),
                        "verdict": body.get("verdict"),
                        "reason": body.get("reason"),
                        "stages": body.get("latency_ms", {}),
                    }
                )
            elif msg.topic == "bench/answers":
                answers[bytes(msg.properties.CorrelationData).decode()] = now

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-plc-{os.getpid()}", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    topics = [(f"{prefix}/+/verdict", 1), ("bench/answers", 1), *(recorder.topics() if spb else [])]
    client.on_connect = lambda c, *a: c.subscribe(topics)
    client.connect(host, port, 30)
    client.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)  # the parent starts the daemon now
    start = time.monotonic()
    sent = _send_triggers(client, prefix, start, seconds, triggers, cameras)
    time.sleep(max(0.0, start + seconds + 1.5 - time.monotonic()))
    client.disconnect()
    client.loop_stop()
    with lock:
        out.write_text(
            json.dumps({"verdicts": verdicts, "sent": sent, "answers": answers, "sparkplug": recorder.records})
        )


def _send_triggers(
    client: Any, prefix: str, start: float, seconds: float, triggers: int, cameras: int
) -> dict[str, float]:
    """PLC triggers spread over the measured window (round robin over the cameras); correlation -> sent at."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    sent: dict[str, float] = {}
    gap = (seconds - WARMUP_S - 2.0) / max(1, triggers)
    for i in range(triggers):
        time.sleep(max(0.0, start + WARMUP_S + gap * (i + 0.5) - time.monotonic()))
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bench/answers"
        props.CorrelationData = f"t{i}".encode()
        sent[f"t{i}"] = time.time()
        body = {"camera": f"cam{i % cameras + 1}", "part_id": f"P{i}"}
        client.publish(f"{prefix}/cmd/trigger", json.dumps(body), 1, properties=props)
    return sent


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 1) if values else None


#: The old path the bench compares against: one inspection worker, one job at a time.
BASELINE = {"max_batch": 1, "workers": 1}


def _write_config(
    path: Path, args: argparse.Namespace, work: Path, bundle: Path, broker: Any, mode: dict[str, Any], label: str
) -> Path:
    """The daemon's config: ``--cameras`` free-running video cameras on the enrolled recipe (YAML as JSON)."""
    names = [f"cam{i + 1}" for i in range(args.cameras)]
    cameras = {n: {"type": "video_file", "source": str(work / "line.avi"), "fps": args.fps} for n in names}
    recipes = [
        {"camera": n, "recipe": "bracket", "trigger": "free_run", "fps": args.fps, "deadline_ms": args.deadline_ms}
        for n in names
    ]
    engines = {"bundle": str(bundle), "backend": args.backend, "threads": args.threads}
    engines.update({"max_batch": mode["max_batch"], "max_wait_ms": args.max_wait_ms, "workers": mode["workers"]})
    path.write_text(
        json.dumps(
            {
                "device": {"id": "bench"},
                "cameras": cameras,
                "recipes": recipes,
                "engines": engines,
                "mqtt": {"host": broker.host, "port": broker.port},
                "storage": {"store": str(work / "store"), "data": str(work / f"state-{label}")},
                **({"sparkplug": {"group": "bench"}} if getattr(args, "sparkplug", False) else {}),
            }
        )
    )
    return path


def _stream_figures(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency, rate, inspected share and ERROR counts of one camera's (or every camera's) verdicts."""
    free = [v for v in verdicts if v["trigger"] == "free_run"]
    lat = [(v["received"] - v["captured"]) * 1e3 for v in verdicts]
    window = (max(v["received"] for v in verdicts) - min(v["received"] for v in verdicts)) if verdicts else 0.0
    inspected = spans = 0
    for camera in {v["camera"] for v in free}:
        seqs = sorted({v["seq"] for v in free if v["camera"] == camera})
        inspected, spans = inspected + len(seqs), spans + seqs[-1] - seqs[0] + 1
    return {
        "verdicts": len(verdicts),
        "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": round(max(lat), 1) if lat else None},
        "verdicts_per_s": round((len(verdicts) - 1) / window, 2) if window > 0 else None,
        "share_of_frames_inspected": round(inspected / spans, 4) if spans else None,
        "errors_free_run": sum(v["verdict"] == "ERROR" for v in free),
        "errors_triggered": sum(v["verdict"] == "ERROR" for v in verdicts if v["trigger"] != "free_run"),
        "error_share": round(sum(v["verdict"] == "ERROR" for v in verdicts) / len(verdicts), 4) if verdicts else None,
        "error_reasons": dict(
            collections.Counter(
                re.sub(r"[\d.]+ ms", "N ms", v.get("reason") or "") for v in verdicts if v["verdict"] == "ERROR"
            ).most_common(4)
        ),
    }


def _figures(data: dict[str, Any], t0: float, args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """The bench's figures from what the subscriber recorded, past the warm-up after ``t0``."""
    verdicts = [v for v in data["verdicts"] if v["captured"] and v["captured"] >= t0 + WARMUP_S]
    window = (max(v["received"] for v in verdicts) - min(v["received"] for v in verdicts)) if verdicts else 0.0
    trig_lat = [(data["answers"][k] - data["sent"][k]) * 1e3 for k in data["answers"] if k in data["sent"]]
    stage_names = ("queue_wait", "preprocess", "encoder", "matcher", "decide", "publish")
    stages = {s: _pct([v["stages"].get(s, 0.0) for v in verdicts], 50) for s in stage_names}
    cameras = sorted({v["camera"] for v in verdicts})
    return {
        "cameras": args.cameras,
        "fps": args.fps,
        "seconds_measured": round(window, 1),
        **_stream_figures(verdicts),
        "per_camera": {c: _stream_figures([v for v in verdicts if v["camera"] == c]) for c in cameras},
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
        "max_wait_ms": args.max_wait_ms,
        "bundle": str(bundle),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


class _Usage:
    """This process's CPU % (100 = one core) and peak resident memory while the daemon runs in it."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.rss_mb = 0.0
        self._thread = threading.Thread(target=self._sample, name="bench-usage", daemon=True)

    def __enter__(self) -> _Usage:
        self._t0, self._cpu0 = time.monotonic(), _cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_percent = round(100 * (_cpu_seconds() - self._cpu0) / max(1e-6, time.monotonic() - self._t0), 1)
        self._stop.set()
        self._thread.join(2)

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.rss_mb = max(self.rss_mb, _rss_mb())


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """Videos and the enrolled ``bracket`` recipe in the work folder; returns (work folder, bundle)."""
    import shutil

    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.defaults import DEFAULT_BUNDLE
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.tools import synthetic
    from anomalygpt_edge.runtime.tools.demo import ensure_bundle

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle).resolve() if args.bundle else ensure_bundle(DEFAULT_BUNDLE.resolve())
    synthetic.write_line_video(work / "line.avi", n_parts=30, frames_per_part=5, fps=args.fps)
    synthetic.write_golden_video(work / "golden.avi", 20)
    for old in [work / "store", *work.glob("state-*")]:
        shutil.rmtree(old, ignore_errors=True)
    enroller = Enroller(RecipeStore(work / "store"), EngineBundle.open(bundle, backend=args.backend))
    enroller.open_or_create("bracket", roi=synthetic.PART_ROI)
    enroller.add("bracket", [(f"g{i}", im) for i, im in enumerate(synthetic.read_video_frames(work / "golden.avi"))])
    return work, bundle


def _phase(args: argparse.Namespace, work: Path, bundle: Path, broker: Any, mode: dict[str, Any]) -> dict[str, Any]:
    """One daemon run with ``mode`` (``max_batch``, ``workers``) against a fresh subscriber process; its figures."""
    from anomalygpt_edge.runtime.line.batching import worker_count
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon

    max_batch = mode["max_batch"]
    label = f"batch{max_batch}-workers{mode['workers']}"
    cfg = _write_config(work / f"bench-{label}.yaml", args, work, bundle, broker, mode, label)
    seen = work / f"subscriber-{label}.json"
    seen.unlink(missing_ok=True)
    sub = subprocess.Popen(
        [sys.executable, "-m", "anomalygpt_edge.runtime.tools.line_bench", "--subscribe", broker.host, str(broker.port),
         "anomalygpt/bench", str(seen), str(args.seconds), str(args.triggers), str(args.cameras),
         *(["sparkplug"] if getattr(args, "sparkplug", False) else [])],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sub.stdout is not None
    sub.stdout.readline()  # "ready"
    t0 = time.time()
    daemon = Daemon(load_config(cfg)).start()
    try:
        with _Usage() as usage:
            time.sleep(args.seconds)
        stats = daemon.stats()
    finally:
        daemon.stop()
    sub.wait(30)
    data = json.loads(seen.read_text())
    figures = _figures(data, t0, args, bundle)
    if getattr(args, "sparkplug", False):  # the Sparkplug path of the same frames, as ratios to the JSON path
        from anomalygpt_edge.runtime.tools.sparkplug_bench import sparkplug_figures

        figures["sparkplug"] = sparkplug_figures(data["sparkplug"], t0, WARMUP_S, figures)
    queues = list(stats["queues"].values())
    batches = sum(q.get("batches", 0) for q in queues)
    figures["max_batch"] = max_batch
    figures["workers"] = worker_count(mode["workers"], args.threads)
    figures["workers_config"] = mode["workers"]
    figures["mean_batch"] = round(sum(q.get("batched_jobs", 0) for q in queues) / batches, 2) if batches else None
    figures["cpu_percent"], figures["rss_mb_peak"] = usage.cpu_percent, round(usage.rss_mb, 1)
    return figures


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _compare(batched: dict[str, Any], unbatched: dict[str, Any]) -> dict[str, Any]:
    """New ÷ old path: throughput (verdicts/s; > 1 is better) and p99 (< 1 is better)."""
    return {
        "verdicts_per_s": _ratio(batched["verdicts_per_s"], unbatched["verdicts_per_s"]),
        "share_of_frames_inspected": _ratio(
            batched["share_of_frames_inspected"], unbatched["share_of_frames_inspected"]
        ),
        "latency_p99": _ratio(batched["latency_ms"]["p99"], unbatched["latency_ms"]["p99"]),
        "latency_p50": _ratio(batched["latency_ms"]["p50"], unbatched["latency_ms"]["p50"]),
    }


def _print_figures(figures: dict[str, Any], title: str = "") -> None:
    """The figures as the lines BENCHMARKS.md quotes."""
    lt, tr = figures["latency_ms"], figures["triggers"]
    measured = f"{figures['seconds_measured']} s measured ({figures['verdicts']} verdicts)"
    cams = f"{figures['cameras']} camera(s) at {figures['fps']:g} fps, max_batch {figures['max_batch']}"
    cams += f", {figures.get('workers', 1)} worker(s)"
    print(f"line daemon{title}: {cams}, {measured}")
    print(f"  capture -> verdict received   p50 {lt['p50']} ms   p99 {lt['p99']} ms   max {lt['max']} ms")
    print(f"  sustained verdicts/s          {figures['verdicts_per_s']}   (mean batch {figures['mean_batch']})")
    print(f"  share of frames inspected     {figures['share_of_frames_inspected']}")
    errors = f"{figures['errors_free_run']} free-run, {figures['errors_triggered']} triggered"
    print(f"  ERROR verdicts                {errors}")
    for reason, count in figures["error_reasons"].items():
        print(f"    {count} x {reason}")
    print(f"  triggered parts answered      {tr['answered']} of {tr['sent']} (p50 {tr['latency_ms_p50']} ms)")
    print(f"  bench process                 CPU {figures['cpu_percent']} %   peak RSS {figures['rss_mb_peak']} MB")
    print("  stage medians (ms)            " + ", ".join(f"{k} {v}" for k, v in figures["stage_ms_p50"].items()))
    for camera, f in figures["per_camera"].items():
        share, lat = f["share_of_frames_inspected"], f["latency_ms"]
        print(f"    {camera}: p50 {lat['p50']} / p99 {lat['p99']} ms, inspected {share}, ERROR {f['error_share']}")


def _mode(args: argparse.Namespace) -> dict[str, Any]:
    """The path under test: ``--max-batch`` and ``--workers`` (``auto`` or a number)."""
    workers = getattr(args, "workers", "auto")
    return {"max_batch": args.max_batch, "workers": workers if workers == "auto" else int(workers)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs (the path under test, then the old path unless they are the same or ``--no-compare``)."""
    import logging

    from anomalygpt_edge.runtime.line.batching import worker_count
    from anomalygpt_edge.runtime.tools.local_broker import start_mosquitto

    logging.getLogger("anomalygpt_edge").setLevel(logging.WARNING)
    mode = _mode(args)
    same = mode["max_batch"] == 1 and worker_count(mode["workers"], args.threads) == 1
    work, bundle = _prepare(args)
    broker = start_mosquitto()
    try:
        if same or not args.compare:
            return _phase(args, work, bundle, broker, mode)
        # The sweep alternates which goes first, so that a load change favours neither.
        first = getattr(args, "unbatched_first", False)
        unbatched = _phase(args, work, bundle, broker, BASELINE) if first else None
        figures = _phase(args, work, bundle, broker, mode)
        unbatched = unbatched or _phase(args, work, bundle, broker, BASELINE)
        figures["unbatched"] = unbatched
        figures["baseline"] = dict(BASELINE)
        figures["ratios"] = _compare(figures, unbatched)
    finally:
        broker.stop()
    return figures


def run(args: argparse.Namespace) -> int:
    """``bench line``: enroll, run the daemon on ``--cameras`` cameras at ``--fps`` against mosquitto, report."""
    figures = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    _print_figures(figures, " (path under test)" if "unbatched" in figures else "")
    if "sparkplug" in figures:
        from anomalygpt_edge.runtime.tools.sparkplug_bench import print_sparkplug

        print_sparkplug(figures["sparkplug"])
    if "unbatched" in figures:
        _print_figures(figures["unbatched"], " (old path: 1 worker, max_batch 1)")
        print("  new / old path                " + ", ".join(f"{k} {v}" for k, v in figures["ratios"].items()))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (8, 9, 10) and sys.argv[1] == "--subscribe":
        host, port, prefix, out, seconds, triggers = sys.argv[2:8]
        cameras = int(sys.argv[8]) if len(sys.argv) >= 9 else 1
        spb = len(sys.argv) == 10 and sys.argv[9] == "sparkplug"
        _subscriber(host, int(port), prefix, Path(out), float(seconds), int(triggers), cameras, spb)
    else:
        usage = "--subscribe HOST PORT PREFIX OUT SECONDS N [CAMERAS [sparkplug]]"
        sys.exit(f"usage: python -m anomalygpt_edge.runtime.tools.line_bench {usage}")
