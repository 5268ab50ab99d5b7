"""Verdict records for the station's pages: the record of one verdict, and the bounded recent log.

A record is the daemon's published verdict message plus what the pages need (``id``, ``camera``,
``ts``, ``has_image``, ``explanation``); the log keeps the newest :data:`HISTORY_SIZE` of them with
their JPEGs (images only for NG/ERROR and a sample of OK), per-camera last verdict, recent
overlays and rates. Verdict ids are the daemon's (uuid7, time-ordered).
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from typing import Any

import cv2
import numpy as np

from anomalygpt_edge.runtime.delivery.messages import uuid7
from anomalygpt_edge.runtime.inspection.heatmap import overlay
from anomalygpt_edge.runtime.inspection.verdict import Region, Verdict
from anomalygpt_edge.runtime.web.station_protocol import HistoryQuery, NotFoundError, StationError

JPEG_QUALITY = 85
#: Verdicts kept in memory for the history page (images only for NG/ERROR and a sample of OK).
HISTORY_SIZE = 2000
KEEP_OK_IMAGE_EVERY = 10


def _iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def jpeg(image: np.ndarray) -> bytes:
    """``image`` (BGR) as JPEG bytes at the station's quality."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise StationError("cannot encode image as JPEG")
    return buf.tobytes()


def verdict_from_record(record: dict[str, Any]) -> Verdict:
    """Rebuild a :class:`Verdict` (without its map) from a record, for the LLM."""
    regions = [
        Region(tuple(r["bbox"]), float(r["area_pct"]), float(r["peak"]), r["location"])
        for r in record.get("regions") or []
    ]
    nan = float("nan")
    return Verdict(
        verdict=record["verdict"],
        score=nan if record.get("score") is None else float(record["score"]),
        threshold=nan if record.get("threshold") is None else float(record["threshold"]),
        recipe=record.get("recipe") or "",
        regions=regions,
        sentence=record.get("sentence") or "",
        reason=record.get("reason"),
    )


class VerdictLog:
    """Recent verdicts for the web page: records (newest last), their JPEGs, per-camera last verdict,
    recent overlays and rates. Thread-safe; bounded (:data:`HISTORY_SIZE` records)."""

    def __init__(self, size: int = HISTORY_SIZE):
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._by_id: dict[str, dict[str, Any]] = {}
        self._images: dict[str, tuple[bytes, bytes | None]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._overlays: dict[str, collections.OrderedDict[str, bytes]] = collections.defaultdict(
            collections.OrderedDict
        )
        self._times: dict[str, collections.deque[float]] = collections.defaultdict(lambda: collections.deque(maxlen=50))
        self._latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=50)
        )
        self._lock = threading.Lock()

    def add(
        self,
        record: dict[str, Any],
        roi_image: np.ndarray | None,
        verdict: Verdict,
        keep_image: bool,
    ) -> dict[str, Any]:
        """Store one verdict record (``id``, ``camera``, ``captured_at_epoch`` …) with its images."""
        camera = record["camera"]
        overlay_jpeg = jpeg(overlay(roi_image, verdict)) if roi_image is not None else None
        record["has_image"] = bool(keep_image and roi_image is not None)
        image_jpeg = jpeg(roi_image) if keep_image and roi_image is not None else None
        now = time.time()
        with self._lock:
            if len(self._records) == self._records.maxlen:
                old = self._records[0]["id"]
                self._images.pop(old, None)
                self._by_id.pop(old, None)
            self._records.append(record)
            self._by_id[record["id"]] = record
            if image_jpeg is not None:
                self._images[record["id"]] = (image_jpeg, overlay_jpeg)
            self._last[camera] = record
            if overlay_jpeg is not None:
                ring = self._overlays[camera]
                ring[record["id"]] = overlay_jpeg
                while len(ring) > 8:
                    ring.popitem(last=False)
            self._times[camera].append(time.monotonic())
            if record.get("ts"):
                self._latencies[camera].append(1e3 * (now - record["ts"]))
        return record

    def explain(self, verdict_id: str, text: str) -> None:
        """Attach an LLM explanation to a recorded verdict (it comes later, asynchronously)."""
        with self._lock:
            r = self._by_id.get(verdict_id)
            if r is not None:
                r["explanation"] = text

    def last(self, camera: str) -> dict[str, Any] | None:
        """The camera's newest record, or None before its first verdict."""
        with self._lock:
            return self._last.get(camera)

    def overlay(self, camera: str, verdict_id: str | None) -> bytes | None:
        """JPEG overlay of the camera's newest verdict, or of one of its last 8 by id; None if none."""
        with self._lock:
            ring = self._overlays.get(camera)
            if not ring:
                return None
            return next(reversed(ring.values())) if verdict_id is None else ring.get(verdict_id)

    def rates(self, camera: str) -> dict[str, Any]:
        """Verdicts per second and capture-to-verdict latency over the camera's last 50 verdicts."""
        with self._lock:
            times = list(self._times.get(camera, ()))
            lat = sorted(self._latencies.get(camera, ()))
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 and times[-1] > times[0] else None
        return {
            "inspect_fps": round(fps, 2) if fps else None,
            "latency_ms_p50": round(lat[len(lat) // 2], 1) if lat else None,
            "latency_ms_max": round(lat[-1], 1) if lat else None,
        }

    def query(self, q: HistoryQuery) -> list[dict[str, Any]]:
        """Records matching ``q``, newest first, at most ``q.limit``."""
        with self._lock:
            items = list(self._records)
        out = []
        for r in reversed(items):
            if q.camera and r["camera"] != q.camera:
                continue
            if q.recipe and r["recipe"] != q.recipe:
                continue
            if q.ng_only and r["verdict"] == "OK":
                continue
            if q.since is not None and r["ts"] < q.since:
                continue
            if q.until is not None and r["ts"] >= q.until:
                continue
            out.append(r)
            if len(out) >= q.limit:
                break
        return out

    def item(self, verdict_id: str) -> dict[str, Any]:
        """One record by id (NotFoundError when it left the log or never was)."""
        with self._lock:
            r = self._by_id.get(verdict_id)
        if r is None:
            raise NotFoundError(f"no verdict '{verdict_id}' in the recent history")
        return r

    def image(self, verdict_id: str, kind: str) -> bytes:
        """The kept ``image`` or ``heatmap`` JPEG of a verdict (NotFoundError when not kept)."""
        with self._lock:
            pair = self._images.get(verdict_id)
        if pair is None:
            raise NotFoundError(f"no image kept for verdict '{verdict_id}' (OK images are sampled)")
        data = pair[0] if kind == "image" else pair[1]
        if data is None:
            raise NotFoundError(f"no {kind} for verdict '{verdict_id}'")
        return data


def make_record(
    camera: str,
    verdict: Verdict,
    frame_seq: int | None,
    captured_at: float,
    verdict_id: str | None = None,
    message: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The history record of one verdict: the published message when there is one, else the verdict's JSON."""
    base = dict(message) if message is not None else verdict.to_json()
    return {
        **base,
        "id": verdict_id or uuid7(),  # the daemon's scheme: one kind of verdict id everywhere
        "camera": camera,
        "recipe": verdict.recipe,
        "verdict": verdict.verdict,
        "regions": base.get("regions", [r.to_json() for r in verdict.regions]),
        "sentence": verdict.sentence,
        "frame_seq": frame_seq,
        "captured_at": _iso(captured_at),
        "ts": captured_at,
        "explanation": None,
    }
