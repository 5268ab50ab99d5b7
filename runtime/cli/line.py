"""``anomalygpt-edge run``, ``demo`` and ``bench line``: parsers only (implementations load when they run)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``run`` and ``demo``."""
    r = sub.add_parser("run", help="the line daemon: cameras in, verdicts out over MQTT (see runtime/MQTT.md)")
    r.add_argument("--config", type=Path, required=True, help="YAML config (see runtime/config.example.yaml)")
    r.add_argument("--check", action="store_true", help="validate the config and exit")
    # SUPPRESS: no default of its own, so `anomalygpt-edge --debug run ...` (the global flag) still counts.
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    r.set_defaults(handler="anomalygpt_edge.runtime.cli.line_run:run")

    d = sub.add_parser("demo", help="synthetic line end to end: bundle, video, enrollment, daemon, PLC subscriber")
    d.add_argument("--workdir", type=Path, default=Path("out/demo"), help="where the demo writes (default out/demo)")
    d.add_argument("--config", type=Path, help="take the MQTT broker from this config (default: start a local one)")
    d.add_argument("--parts", type=int, default=24, help="parts on the synthetic line (default 24)")
    d.add_argument("--bundle", type=Path, help="engine bundle (default: the default bundle, exported if missing)")
    d.add_argument(
        "--embedded-broker", action="store_true", help="use the embedded Python broker even if mosquitto is installed"
    )
    d.set_defaults(handler="anomalygpt_edge.runtime.tools.demo:run")


def _line_options(p: argparse.ArgumentParser, workdir: str, cameras: bool = True) -> None:
    """The daemon options ``bench line`` and ``bench line-sweep`` share."""
    if cameras:
        p.add_argument("--cameras", type=int, default=1, help="video-file cameras sharing the bundle (default 1)")
    p.add_argument("--threads", type=int, default=1, help="engines.threads: ONNX Runtime threads (default 1; 0 = all)")
    p.add_argument("--max-batch", type=int, default=1, help="engines.max_batch of the path under test (default 1)")
    p.add_argument(
        "--workers", default="auto", help="engines.workers of the path under test: auto or a number (default auto)"
    )
    p.add_argument(
        "--sparkplug",
        action="store_true",
        help="also the Sparkplug B Edge Node: DDATA p99 beside the JSON path, as ratios",
    )
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="engines.max_wait_ms (default 10)")
    p.add_argument(
        "--no-compare", dest="compare", action="store_false", help="skip the old path (1 worker, max_batch 1) run"
    )
    p.add_argument("--workdir", type=Path, default=Path(workdir))


def add_bench_target(targets: argparse._SubParsersAction) -> None:
    """Register ``bench line``."""
    if "line" in targets.choices:
        return
    b = targets.add_parser("line", help="line daemon latency capture->verdict received, from a separate subscriber")
    b.add_argument("--json", type=Path, required=True, help="write the figures here")
    b.add_argument("--fps", type=float, default=10.0, help="camera and free-run rate (default 10)")
    b.add_argument("--seconds", type=float, default=30.0, help="measured run length (default 30)")
    b.add_argument("--triggers", type=int, default=20, help="PLC triggers sent during the run (default 20)")
    b.add_argument("--bundle", type=Path, default=None, help="engine bundle (default: the default bundle)")
    b.add_argument("--backend", default="auto")
    b.add_argument(
        "--deadline-ms", type=float, default=300.0, help="recipe deadline, trigger or capture to verdict (default 300)"
    )
    _line_options(b, "out/bench-line")
    b.set_defaults(handler="anomalygpt_edge.runtime.tools.line_bench:run")
    w = targets.add_parser("line-sweep", help="bench line over cameras x fps, and batch size -> images/s; JSON + PNG")
    w.add_argument("--out", type=Path, default=Path("bench-results/line-sweep"), help="report folder (JSON + PNG)")
    w.add_argument("--camera-counts", default="1,2,4", help="comma list of camera counts (default 1,2,4)")
    w.add_argument("--fps-list", default="5,10", help="comma list of frame rates (default 5,10)")
    w.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes for images/s and p99 (default 1,2,4,8)")
    w.add_argument("--batch-seconds", type=float, default=4.0, help="seconds per batch size and thread count")
    w.add_argument("--thread-counts", default="1,2", help="engines.threads values for the batch curve (default 1,2)")
    w.add_argument(
        "--worker-counts", default="1,2", help="concurrent loops for the workers curve (default 1,2; '' = none)"
    )
    w.add_argument("--seconds", type=float, default=15.0, help="measured run length per point and mode (default 15)")
    w.add_argument("--triggers", type=int, default=10, help="PLC triggers per run (default 10)")
    w.add_argument("--bundle", type=Path, default=None, help="engine bundle (default: the default bundle)")
    w.add_argument("--backend", default="auto")
    w.add_argument("--deadline-ms", type=float, default=300.0, help="recipe deadline (default 300)")
    _line_options(w, "out/bench-line-sweep", cameras=False)
    w.set_defaults(handler="anomalygpt_edge.runtime.tools.line_sweep:run")
    if "faults" not in targets.choices:
        f = targets.add_parser(
            "faults",
            help="faults against the daemon: disk full, corrupt spool, damaged recipes, racing enrollment, burst",
        )
        f.add_argument("--json", type=Path, required=True, help="write the figures here")
        f.add_argument("--only", default="", help="comma list of faults to run (default all)")
        f.add_argument("--workdir", type=Path, default=Path("out/bench-faults"))
        f.set_defaults(handler="anomalygpt_edge.runtime.tools.fault_bench:run")
