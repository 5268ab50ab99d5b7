"""``bench line --sparkplug``: the Sparkplug B path measured beside the JSON path in the same run.

The bench's subscriber process (``line_bench._subscriber``) also subscribes to ``spBv1.0/bench/#``
and hands those messages to :class:`SparkplugRecorder`, which decodes them with pysparkplug (each
DDATA against its camera's DBIRTH, as a SCADA host does) and records, per verdict DDATA, when it
arrived and the ``Inspection/Captured At`` it carries. The figures put capture -> DDATA received
p50/p99 beside capture -> JSON verdict received of the same frames, as ratios.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

GROUP = "bench"
CAPTURED_AT = "Inspection/Captured At"


class SparkplugRecorder:
    """Decodes the node's BIRTH and DDATA messages; keeps (camera, received, captured) per verdict."""

    def __init__(self) -> None:
        self.births: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.seqs: list[int] = []

    @staticmethod
    def topics() -> list[tuple[str, int]]:
        """What the subscriber subscribes to for the Sparkplug side."""
        return [(f"spBv1.0/{GROUP}/#", 1)]

    def on_message(self, msg: Any, now: float) -> bool:
        """Record ``msg`` if it is a Sparkplug message (True), else leave it to the JSON side (False)."""
        if not msg.topic.startswith("spBv1.0/"):
            return False
        from pysparkplug import DBirth, DData, Message, MessageType, Topic

        topic = Topic.from_str(msg.topic)
        if topic.message_type not in (MessageType.DBIRTH, MessageType.DDATA):
            return True
        camera = str(topic.device_id)
        decoded = Message.from_mqtt_message(msg, birth=self.births.get(camera))
        if isinstance(decoded.payload, DBirth):
            self.births[camera] = decoded.payload
        elif isinstance(decoded.payload, DData):
            self.seqs.append(decoded.payload.seq)
            captured = next((m.value for m in decoded.payload.metrics if m.name == CAPTURED_AT), None)
            if isinstance(captured, dt.datetime):
                self.records.append({"camera": camera, "received": now, "captured": captured.timestamp()})
        return True


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 1) if values else None


def sparkplug_figures(
    records: list[dict[str, Any]], t0: float, warmup_s: float, json_figures: dict[str, Any]
) -> dict[str, Any]:
    """Capture -> DDATA received p50/p99/max past the warm-up, and its ratios to the JSON path's."""
    kept = [r for r in records if r["captured"] >= t0 + warmup_s]
    lat = [(r["received"] - r["captured"]) * 1e3 for r in kept]
    json_lat = json_figures["latency_ms"]
    p50, p99 = _pct(lat, 50), _pct(lat, 99)
    return {
        "ddata_verdicts": len(kept),
        "latency_ms": {"p50": p50, "p99": p99, "max": round(max(lat), 1) if lat else None},
        "json_latency_ms": {"p50": json_lat["p50"], "p99": json_lat["p99"]},
        "ratio_p99_sparkplug_over_json": round(p99 / json_lat["p99"], 3)
        if p99 is not None and json_lat["p99"]
        else None,
        "ratio_p50_sparkplug_over_json": round(p50 / json_lat["p50"], 3)
        if p50 is not None and json_lat["p50"]
        else None,
        "captured_at_resolution_ms": 1,  # Sparkplug DateTime is milliseconds
    }


def print_sparkplug(figures: dict[str, Any]) -> None:
    """The lines BENCHMARKS.md quotes."""
    lt, js, n = figures["latency_ms"], figures["json_latency_ms"], figures["ddata_verdicts"]
    print(f"  Sparkplug DDATA received      p50 {lt['p50']} ms   p99 {lt['p99']} ms   max {lt['max']} ms   ({n})")
    print(f"  JSON verdict, same run        p50 {js['p50']} ms   p99 {js['p99']} ms")
    p99, p50 = figures["ratio_p99_sparkplug_over_json"], figures["ratio_p50_sparkplug_over_json"]
    print(f"  Sparkplug / JSON              p99 x{p99}   p50 x{p50}")
