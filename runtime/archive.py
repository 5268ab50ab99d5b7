"""Verdict archive: every verdict as a SQLite row, NG images and heatmaps (and a sample of OK
images) on disk under a quota, and an export of a time range to CSV + images.

Layout::

    <root>/archive.db                       verdict rows and the image-file ledger (WAL)
    <root>/images/<YYYY-MM-DD>/<id>.<kind>.jpg   kind: image | heatmap

The verdict row is the plant's quality evidence and is always kept; images are the bulky part and
are bounded by ``quota_bytes``: before a file is written, the oldest files are evicted until the
new one fits (the row keeps its place and records that its image was evicted). When the disk
itself is full (``ENOSPC``) or a write fails, the archive counts it, remembers the error and
carries on: inspection never stops because the archive cannot write.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_QUOTA_BYTES = 2 * 1024**3
JPEG_QUALITY = 90

_SCHEMA = """
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

CSV_COLUMNS = (
    "id",
    "captured_at",
    "camera",
    "recipe",
    "verdict",
    "score",
    "threshold",
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


@dataclass
class ArchiveStats:
    """What the archive did since it was opened, for the status heartbeat."""

    rows: int = 0
    rows_failed: int = 0
    images_written: int = 0
    images_evicted: int = 0
    images_skipped_quota: int = 0
    images_failed: int = 0  # ENOSPC or another write error
    ok_sampled: int = 0
    queue_dropped: int = 0
    bytes_used: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Archive:
    """The on-device verdict archive. Thread-safe; :meth:`record` never raises for disk problems."""

    def __init__(
        self,
        root: Path | str,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        ok_sample_rate: float = 0.0,
        jpeg_quality: int = JPEG_QUALITY,
    ):
        if quota_bytes < 0:
            raise ValueError(f"archive quota_bytes must be >= 0, got {quota_bytes}")
        if not 0.0 <= ok_sample_rate <= 1.0:
            raise ValueError(f"archive ok_sample_rate must be in [0, 1], got {ok_sample_rate}")
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.quota_bytes = int(quota_bytes)
        self.ok_sample_rate = float(ok_sample_rate)
        self.jpeg_quality = int(jpeg_quality)
        self.stats = ArchiveStats()
        self._ok_credit = 0.0  # deterministic sampling: keep one OK image each time credit reaches 1
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.root / "archive.db", isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: after a power cut the last few rows may roll back, but never corrupt; the
            # spool (synchronous=FULL) is what guarantees delivery, the archive is the local copy.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self.stats.bytes_used = int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(f"archive {self.root}: {exc}") from exc

    # -- writing ---------------------------------------------------------------------------------

    def wants_image(self, verdict: str) -> bool:
        """Whether a verdict of this kind keeps its image: NG and ERROR always, OK at the sample rate."""
        if verdict != "OK":
            return True
        with self._lock:
            self._ok_credit += self.ok_sample_rate
            if self._ok_credit >= 1.0:
                self._ok_credit -= 1.0
                return True
        return False

    def record(
        self,
        verdict: dict[str, Any],
        image: np.ndarray | None = None,
        heatmap: np.ndarray | None = None,
        keep_image: bool | None = None,
    ) -> bool:
        """Archive one verdict (its published JSON) with optional BGR image and heatmap overlay.

        ``keep_image`` None decides by :meth:`wants_image`. Returns whether the row was stored;
        disk problems are counted in :attr:`stats`, never raised.
        """
        vid = str(verdict.get("id") or "")
        if not vid:
            self._fail_row("verdict without an id")
            return False
        try:
            ts = parse_time(
                verdict.get("captured_at") or verdict.get("published_at") or dt.datetime.now(dt.timezone.utc)
            )
        except ArchiveError:
            ts = dt.datetime.now(dt.timezone.utc).timestamp()
        kind = str(verdict.get("verdict", "ERROR"))
        if keep_image is None:
            keep_image = image is not None and self.wants_image(kind)
        paths: dict[str, str | None] = {"image": None, "heatmap": None}
        if keep_image:
            day = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")
            for name, array in (("image", image), ("heatmap", heatmap)):
                if array is not None:
                    paths[name] = self._write_image(f"{day}/{_safe(vid)}.{name}.jpg", array, vid, ts)
            if kind == "OK" and paths["image"]:
                self.stats.ok_sampled += 1
        row = (
            vid,
            ts,
            iso(ts),
            _opt_str(verdict.get("camera")),
            _opt_str(verdict.get("recipe")),
            kind,
            _opt_float(verdict.get("score")),
            _opt_float(verdict.get("threshold")),
            _opt_str(verdict.get("part_id")),
            _opt_int(verdict.get("frame_seq")),
            _opt_str(verdict.get("reason")),
            paths["image"],
            paths["heatmap"],
            json.dumps(verdict, separators=(",", ":"), default=str),
        )
        try:
            with self._lock:
                # OR IGNORE: a redelivered or replayed verdict keeps its first row.
                self._db.execute(
                    "INSERT OR IGNORE INTO verdicts(id, ts, captured_at, camera, recipe, verdict, score, threshold,"
                    " part_id, frame_seq, reason, image, heatmap, json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                self.stats.rows += 1
            return True
        except sqlite3.DatabaseError as exc:  # "database or disk is full", read-only, …
            self._fail_row(f"archive row {vid}: {exc}")
            return False

    def _write_image(self, rel: str, array: np.ndarray, vid: str, ts: float) -> str | None:
        import cv2  # imported here so that querying/exporting needs no OpenCV

        ok, buf = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            self._fail_image(f"cannot encode image of {vid} as JPEG")
            return None
        data = buf.tobytes()
        with self._lock:
            if len(data) > self.quota_bytes:
                self.stats.images_skipped_quota += 1
                self.stats.last_error = f"image of {vid} ({len(data)} B) exceeds the archive quota"
                return None
            try:
                self._evict_until(self.quota_bytes - len(data))
            except sqlite3.DatabaseError as exc:
                self._fail_image(f"archive eviction: {exc}", locked=True)
                return None
            path = self.images_dir / rel
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Temp name then rename: a crash never leaves a half JPEG under the final name.
                # No fsync: these are evidence copies, the fsync per frame is not worth its latency.
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
                self._db.execute(
                    "INSERT OR REPLACE INTO files(path, verdict_id, bytes, ts) VALUES (?, ?, ?, ?)",
                    (rel, vid, len(data), ts),
                )
            except (OSError, sqlite3.DatabaseError) as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self._fail_image(f"{'disk full' if full else 'write failed'}: {path}: {exc}", locked=True)
                return None
            self.stats.images_written += 1
            self.stats.bytes_used += len(data)
        return rel

    def _evict_until(self, budget: int) -> None:
        """Delete the oldest image files until at most ``budget`` bytes are used (lock held)."""
        while self.stats.bytes_used > budget:
            oldest = self._db.execute("SELECT path, verdict_id, bytes FROM files ORDER BY ts, path LIMIT 1").fetchone()
            if oldest is None:
                self.stats.bytes_used = 0
                return
            rel, vid, size = oldest
            with contextlib.suppress(FileNotFoundError):
                (self.images_dir / rel).unlink()
            self._db.execute("DELETE FROM files WHERE path = ?", (rel,))
            self._db.execute(
                "UPDATE verdicts SET images_evicted = 1,"
                " image = CASE WHEN image = ? THEN NULL ELSE image END,"
                " heatmap = CASE WHEN heatmap = ? THEN NULL ELSE heatmap END WHERE id = ?",
                (rel, rel, vid),
            )
            self.stats.bytes_used -= int(size)
            self.stats.images_evicted += 1

    def _fail_row(self, message: str) -> None:
        with self._lock:
            self.stats.rows_failed += 1
            self.stats.last_error = message
        log.warning("archive: %s", message)

    def _fail_image(self, message: str, locked: bool = False) -> None:
        if locked:
            self.stats.images_failed += 1
            self.stats.last_error = message
        else:
            with self._lock:
                self.stats.images_failed += 1
                self.stats.last_error = message
        log.warning("archive: %s", message)

    # -- reading ---------------------------------------------------------------------------------

    def query(
        self,
        start: str | float | dt.datetime | None = None,
        end: str | float | dt.datetime | None = None,
        camera: str | None = None,
        recipe: str | None = None,
        verdict: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Verdict rows with ``start <= captured < end``, oldest first, filtered by the given fields.

        Each row is the published verdict JSON plus ``image``/``heatmap`` (paths relative to
        ``images/``, None when not kept or evicted).
        """
        where, args = ["1=1"], []
        if start is not None:
            where.append("ts >= ?")
            args.append(parse_time(start))
        if end is not None:
            where.append("ts < ?")
            args.append(parse_time(end))
        for column, value in (("camera", camera), ("recipe", recipe), ("verdict", verdict)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT json, image, heatmap FROM verdicts WHERE {' AND '.join(where)} ORDER BY ts, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for text, image, heatmap in rows:
            data = json.loads(text)
            data["image"], data["heatmap"] = image, heatmap
            out.append(data)
        return out

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def summary(self) -> dict[str, Any]:
        """Rows per verdict, oldest and newest capture time, image bytes on disk."""
        with self._lock:
            per = dict(self._db.execute("SELECT verdict, COUNT(*) FROM verdicts GROUP BY verdict").fetchall())
            lo, hi = self._db.execute("SELECT MIN(ts), MAX(ts) FROM verdicts").fetchone()
        return {
            "rows": sum(per.values()),
            "by_verdict": per,
            "oldest": iso(lo) if lo is not None else None,
            "newest": iso(hi) if hi is not None else None,
            "image_bytes": self.stats.bytes_used,
            "quota_bytes": self.quota_bytes,
        }

    def export(self, start: str | float | dt.datetime, end: str | float | dt.datetime, out: Path | str) -> dict:
        """Write ``verdicts.csv`` and the kept images of ``[start, end)`` into ``out``; returns counts."""
        out = Path(out)
        if parse_time(end) <= parse_time(start):
            raise ArchiveError(f"--to ({end}) must be after --from ({start})")
        rows = self.query(start, end)
        out.mkdir(parents=True, exist_ok=True)
        copied = missing = 0
        with open(out / "verdicts.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                for key in ("image", "heatmap"):
                    rel = row.get(key)
                    if rel:
                        src = self.images_dir / rel
                        dst = out / "images" / rel
                        try:
                            dst.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(src, dst)
                            row[key] = f"images/{rel}"
                            copied += 1
                        except FileNotFoundError:
                            row[key] = None
                            missing += 1
                writer.writerow({k: csv_cell(row.get(k)) for k in CSV_COLUMNS})
        return {"rows": len(rows), "images": copied, "images_missing": missing, "out": str(out)}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ArchiveWriter:
    """Runs :meth:`Archive.record` on a background thread so JPEG encoding and disk writes never
    delay a verdict. A full queue drops the archive entry (counted in ``queue_dropped``)."""

    def __init__(self, archive: Archive, maxsize: int = 64, on_error: Callable[[str], None] | None = None):
        self.archive = archive
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=maxsize)
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)
        self._thread.start()

    def submit(
        self, verdict: dict[str, Any], image: np.ndarray | None = None, heatmap: np.ndarray | None = None
    ) -> bool:
        """Queue one verdict; False (and counted) when the writer is behind."""
        try:
            self._queue.put_nowait((verdict, image, heatmap))
            return True
        except queue.Full:
            self.archive.stats.queue_dropped += 1
            return False

    def depth(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.archive.record(*item)
            except Exception as exc:  # never let the writer thread die: count and carry on
                self.archive.stats.rows_failed += 1
                self.archive.stats.last_error = f"archive writer: {exc!r}"
                if self._on_error:
                    self._on_error(self.archive.stats.last_error)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until everything queued so far is written."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


def _safe(name: str) -> str:
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
