"""The Sparkplug B metrics of the Edge Node and its cameras, and their payloads (pysparkplug's classes).

Every payload is built and encoded by ``pysparkplug`` (the Eclipse Tahu ``sparkplug_b.proto``);
nothing here touches protobuf bytes. The MQTT side is the product's own paho 2 client
(``sparkplug_node.py``): pysparkplug's own client needs paho-mqtt < 2, so it is never used, and
the package is installed without its dependencies (see ``./edge``).

Aliases are unique across the whole Edge Node (node metrics 1..9, camera ``i``'s metrics
``1000 * (i + 1) + offset``), declared in the BIRTH with every metric's name and datatype; DATA
carries the alias only and no datatype (spec 3.0: datatypes SHOULD NOT be repeated in DATA).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pysparkplug import DataType, DBirth, DData, DDeath, Metric, NBirth, NData, NDeath

BD_SEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
TRIGGER = "Trigger"
VERDICT = "Inspection/Verdict"
PART_ID = "Inspection/Part ID"
CAPTURED_AT = "Inspection/Captured At"
REDELIVERED = "Inspection/Redelivered"

#: Node metrics (name -> (alias, datatype)); bdSeq has no alias: the NDEATH names it.
NODE_METRICS: dict[str, tuple[int, DataType]] = {
    REBIRTH: (1, DataType.BOOLEAN),
    "Spool/Depth": (2, DataType.UINT64),
    "Properties/Backend": (3, DataType.STRING),
    "Properties/Version": (4, DataType.STRING),
}
#: Per camera (Device) metrics: name -> (alias offset, datatype).
DEVICE_METRICS: dict[str, tuple[int, DataType]] = {
    VERDICT: (0, DataType.STRING),  # OK / NG / ERROR
    "Inspection/Score": (1, DataType.DOUBLE),
    "Inspection/Threshold": (2, DataType.DOUBLE),
    PART_ID: (3, DataType.STRING),
    "Inspection/Verdict ID": (4, DataType.STRING),
    CAPTURED_AT: (5, DataType.DATETIME),
    REDELIVERED: (6, DataType.BOOLEAN),  # a resend from the spool: the SCADA may have it already
    "Counts/OK": (7, DataType.UINT64),
    "Counts/NG": (8, DataType.UINT64),
    "Counts/ERROR": (9, DataType.UINT64),
    "Performance/Inspected FPS": (10, DataType.DOUBLE),
    "Performance/Latency p99 ms": (11, DataType.DOUBLE),
    "Camera/State": (12, DataType.STRING),
    "Recipe": (13, DataType.STRING),
    TRIGGER: (14, DataType.STRING),  # writable by DCMD: the value is the part id
}


def now_ms() -> int:
    """Sparkplug timestamps: UTC milliseconds since the epoch."""
    return int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)


def device_alias(index: int, name: str) -> int:
    """The alias of camera number ``index``'s metric ``name``."""
    return 1000 * (index + 1) + DEVICE_METRICS[name][0]


def _wire(datatype: DataType, value: Any) -> Any:
    """``value`` as pysparkplug expects it for ``datatype`` (None stays None: a null metric)."""
    if value is None:
        return None
    if datatype == DataType.DATETIME:
        return dt.datetime.fromtimestamp(float(value) / 1000.0, tz=dt.timezone.utc)
    if datatype in (DataType.UINT64, DataType.INT64):
        return int(value)
    if datatype == DataType.DOUBLE:
        return float(value)
    if datatype == DataType.BOOLEAN:
        return bool(value)
    return str(value)


def bd_seq_metric(bd_seq: int, ts: int) -> Metric:
    """The bdSeq metric (Int64, as Eclipse Tahu declares it) of an NBIRTH and its NDEATH."""
    return Metric(timestamp=ts, name=BD_SEQ, datatype=DataType.INT64, value=bd_seq)


def node_birth(bd_seq: int, values: Mapping[str, Any], ts: int) -> NBirth:
    """NBIRTH (seq 0): bdSeq and every node metric with its name, alias, datatype and value."""
    metrics = [bd_seq_metric(bd_seq, ts)]
    for name, (alias, dtype) in NODE_METRICS.items():
        value = False if name == REBIRTH else values.get(name)
        metrics.append(Metric(timestamp=ts, name=name, datatype=dtype, value=_wire(dtype, value), alias=alias))
    return NBirth(timestamp=ts, seq=0, metrics=tuple(metrics))


def node_death(bd_seq: int) -> NDeath:
    """NDEATH, the Will: the bdSeq of the NBIRTH of the same connection (no timestamp: sent by the broker)."""
    return NDeath(timestamp=None, bd_seq_metric=bd_seq_metric(bd_seq, now_ms()))


def device_birth(index: int, values: Mapping[str, Any], seq: int, ts: int) -> DBirth:
    """DBIRTH of camera ``index``: every device metric with name, alias, datatype and current value."""
    metrics = tuple(
        Metric(
            timestamp=ts,
            name=name,
            datatype=dtype,
            value=_wire(dtype, "" if name == TRIGGER else values.get(name)),
            alias=device_alias(index, name),
        )
        for name, (_, dtype) in DEVICE_METRICS.items()
    )
    return DBirth(timestamp=ts, seq=seq, metrics=metrics)


def device_death(seq: int, ts: int) -> DDeath:
    """DDEATH of a camera (on a clean stop, before the node's own death)."""
    return DDeath(timestamp=ts, seq=seq)


def device_data(index: int, values: Mapping[str, Any], seq: int, ts: int, metric_ts: int | None = None) -> DData:
    """DDATA of camera ``index``: the given metrics by alias only (no name, no datatype)."""
    metrics = tuple(
        Metric(
            timestamp=metric_ts or ts,
            name=None,
            datatype=DEVICE_METRICS[name][1],
            value=_wire(DEVICE_METRICS[name][1], value),
            alias=device_alias(index, name),
        )
        for name, value in values.items()
        if name in DEVICE_METRICS
    )
    return DData(timestamp=ts, seq=seq, metrics=metrics)


def node_data(values: Mapping[str, Any], seq: int, ts: int) -> NData:
    """NDATA: the given node metrics by alias only."""
    metrics = tuple(
        Metric(
            timestamp=ts,
            name=None,
            datatype=NODE_METRICS[n][1],
            value=_wire(NODE_METRICS[n][1], v),
            alias=NODE_METRICS[n][0],
        )
        for n, v in values.items()
        if n in NODE_METRICS
    )
    return NData(timestamp=ts, seq=seq, metrics=metrics)


def verdict_values(msg: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    """The device metrics a verdict message changes (``msg`` is the JSON verdict message)."""
    captured = msg.get("captured_at_epoch")
    return {
        VERDICT: msg.get("verdict"),
        "Inspection/Score": msg.get("score"),
        "Inspection/Threshold": msg.get("threshold"),
        PART_ID: msg.get("part_id"),
        "Inspection/Verdict ID": msg.get("id"),
        CAPTURED_AT: None if captured is None else round(float(captured) * 1000.0),
        REDELIVERED: False,
        "Counts/OK": counts.get("OK", 0),
        "Counts/NG": counts.get("NG", 0),
        "Counts/ERROR": counts.get("ERROR", 0),
        "Recipe": msg.get("recipe"),
    }


def camera_facts(status: Mapping[str, Any], camera: str) -> dict[str, Any]:
    """A camera's slow-changing metrics from the daemon's status document (health figures merged in)."""
    info = (status.get("cameras") or {}).get(camera) or {}
    return {
        "Performance/Inspected FPS": info.get("inspected_fps"),
        "Performance/Latency p99 ms": (info.get("latency_ms") or {}).get("p99"),
        "Camera/State": info.get("status"),
        "Recipe": info.get("recipe"),
    }


def node_facts(status: Mapping[str, Any]) -> dict[str, Any]:
    """The node metrics from the daemon's status document."""
    spool = status.get("spool")
    return {
        "Spool/Depth": int(spool.get("depth", 0)) if isinstance(spool, Mapping) else 0,
        "Properties/Backend": status.get("engine_backend"),
        "Properties/Version": status.get("version"),
    }
