"""The verdict archive's format: its SQLite schema, a verdict's row, CSV cells and times."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    captured_at TEXT NOT NULL,
    camera TEXT,
    recipe TEXT,
    verdict TEXT NOT NULL,
    score REAL,
    threshold REAL,
    part_id TEXT,
    frame_seq INTEGER,
    reason TEXT,
    image TEXT,
    heatmap TEXT,
    images_evicted INTEGER NOT NULL DEFAULT 0,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_ts ON verdicts(ts);
CREATE INDEX IF NOT EXISTS verdicts_camera_ts ON verdicts(camera, ts);
CREATE INDEX IF NOT EXISTS verdicts_recipe_ts ON verdicts(recipe, ts);
CREATE INDEX IF NOT EXISTS verdicts_verdict_ts ON verdicts(verdict, ts);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    verdict_id TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_ts ON files(ts);
"""

# The columns every verdict CSV starts with (the archive's export and the station's history
# download), so that a spreadsheet made from one reads the other the same way.
VERDICT_CSV_COLUMNS = ("id", "captured_at", "camera", "recipe", "verdict", "score", "threshold")

CSV_COLUMNS = (
    *VERDICT_CSV_COLUMNS,
    "part_id",
    "frame_seq",
    "reason",
    "location",
    "sentence",
    "image",
    "heatmap",
)


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet never runs as a formula: text starting with = + - @ is quoted.

    Part ids and sentences can come from a PLC or an LLM; exported CSVs are opened in Excel.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class ArchiveError(RuntimeError):
    """The archive cannot be opened or a query is malformed."""


def parse_time(text: str | float | dt.datetime) -> float:
    """Seconds since the epoch from an ISO-8601 string (naive = UTC), a datetime or a number."""
    if isinstance(text, (int, float)):
        return float(text)
    if isinstance(text, dt.datetime):
        moment = text
    else:
        try:
            moment = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            raise ArchiveError(f"not an ISO-8601 time: {text!r} (e.g. 2026-11-23T08:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def safe_file_name(name: str) -> str:
    """A verdict id as a file name: anything outside ``[A-Za-z0-9_.-]`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:128] or "_"


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _opt_int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def verdict_time(verdict: dict[str, Any]) -> float:
    """When a verdict's part was captured (else published, else now), in seconds since the epoch."""
    try:
        return parse_time(verdict.get("captured_at") or verdict.get("published_at") or dt.datetime.now(dt.timezone.utc))
    except ArchiveError:
        return dt.datetime.now(dt.timezone.utc).timestamp()


def verdict_row(verdict: dict[str, Any], ts: float, paths: dict[str, str | None]) -> tuple:
    """The ``verdicts`` row of a published verdict, with the image files kept for it (``paths``)."""
    return (
        str(verdict.get("id") or ""),
        ts,
        iso(ts),
        _opt_str(verdict.get("camera")),
        _opt_str(verdict.get("recipe")),
        str(verdict.get("verdict", "ERROR")),
        _opt_float(verdict.get("score")),
        _opt_float(verdict.get("threshold")),
        _opt_str(verdict.get("part_id")),
        _opt_int(verdict.get("frame_seq")),
        _opt_str(verdict.get("reason")),
        paths["image"],
        paths["heatmap"],
        json.dumps(verdict, separators=(",", ":"), default=str),
    )
