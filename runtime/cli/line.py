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
    b.add_argument("--threads", type=int, default=1, help="engines.threads: ONNX Runtime threads (default 1; 0 = all)")
    b.add_argument("--workdir", type=Path, default=Path("out/bench-line"))
    b.set_defaults(handler="anomalygpt_edge.runtime.tools.line_bench:run")
    if "faults" not in targets.choices:
        f = targets.add_parser(
            "faults",
            help="faults against the daemon: disk full, corrupt spool, damaged recipes, racing enrollment, burst",
        )
        f.add_argument("--json", type=Path, required=True, help="write the figures here")
        f.add_argument("--only", default="", help="comma list of faults to run (default all)")
        f.add_argument("--workdir", type=Path, default=Path("out/bench-faults"))
        f.set_defaults(handler="anomalygpt_edge.runtime.tools.fault_bench:run")
