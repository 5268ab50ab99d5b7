"""The JSON messages the daemon publishes: verdict, explanation, status and command replies.

Every message carries ``schema`` so a PLC gateway can refuse a format it does not know. Verdict ids
are UUIDv7 (time-ordered, unique across restarts and devices): QoS 1 delivers at least once, so a
subscriber de-duplicates by id.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import threading
import time
import uuid
from typing import Any

from anomalygpt_edge.runtime.inspection.verdict import Verdict

VERDICT_SCHEMA = "anomalygpt-edge/verdict/1"
EXPLANATION_SCHEMA = "anomalygpt-edge/explanation/1"
STATUS_SCHEMA = "anomalygpt-edge/status/1"
REPLY_SCHEMA = "anomalygpt-edge/reply/1"

_uuid_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, a 12-bit counter within the millisecond, random bits.

    Monotonic within this process, so ids sort in publication order.
    """
    global _last_ms, _counter
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                ms, _counter = ms + 1, 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    return str(uuid.UUID(int=value))


def iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def verdict_message(
    verdict: Verdict,
    *,
    verdict_id: str,
    device: str,
    camera: str,
    part_id: str | None,
    frame_seq: int | None,
    captured_at: float | None,
    trigger: str,
    correlation: str | None = None,
) -> dict[str, Any]:
    """The verdict as published on ``<prefix>/<device>/<camera>/verdict`` (``published_at`` set by the publisher)."""
    body = verdict.to_json()
    return {
        "schema": VERDICT_SCHEMA,
        "id": verdict_id,
        "device": device,
        "camera": camera,
        "recipe": body.pop("recipe"),
        "verdict": body.pop("verdict"),
        "score": body.pop("score"),
        "threshold": body.pop("threshold"),
        **body,
        "part_id": part_id,
        "trigger": trigger,
        "correlation_id": correlation,
        "frame_seq": frame_seq,
        "captured_at": iso(captured_at) if captured_at else None,
        "captured_at_epoch": round(captured_at, 6) if captured_at else None,
        "published_at": None,
        "published_at_epoch": None,
    }


def finish_and_encode(message: dict[str, Any], publish_started: float) -> bytes:
    """Stamp ``published_at`` and the publish stage (serialisation up to hand-over) and encode."""
    now = time.time()
    message["published_at"] = iso(now)
    message["published_at_epoch"] = round(now, 6)
    latency = message.setdefault("latency_ms", {})
    latency["publish"] = round((time.perf_counter() - publish_started) * 1e3, 3)
    if message.get("captured_at_epoch"):
        latency["total"] = round((now - message["captured_at_epoch"]) * 1e3, 3)
    return json.dumps(json_safe(message), separators=(",", ":"), allow_nan=False).encode()


def json_safe(value: Any) -> Any:
    """NaN and infinities as null: strict JSON has neither, and a PLC or SCADA parser rejects the message."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def reply(command: str, ok: bool, correlation: str | None = None, **fields: Any) -> dict[str, Any]:
    """A command reply: ``ok`` true with results, or false with ``error``."""
    return {"schema": REPLY_SCHEMA, "command": command, "ok": ok, "correlation_id": correlation, **fields}
