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

Disk (issue 12): with a :class:`DiskBudget` the archive shares one budget with the spool and
both SQLite WALs (their files are measured, not guessed), and it is the first to give way: below
twice the free-space floor (or near the budget) it stops writing images, below the floor (or over
the budget) it stops writing rows too and keeps them in memory (bounded) until there is room
again, so the spool always finds space for verdicts. Everything resumes by itself. An archive
database that cannot be opened is moved aside (``archive.db.corrupt-<UTC time>``) and a fresh one
started; the images already on disk are taken back into the quota ledger. Labels on verdicts
(issue 14) are rows of their own, and pin their images against eviction: ``archive_labels.py``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The format, the disk budget and the background writer live in modules of their own; the line's
# storage, the station and the tests import them from here.
from anomalygpt_edge.runtime.delivery.archive_format import (
    CSV_COLUMNS,
    SCHEMA,
    ArchiveError,
    csv_cell,
    iso,
    parse_time,
    safe_file_name,
    verdict_row,
    verdict_time,
)
from anomalygpt_edge.runtime.delivery.archive_labels import LABEL_SCHEMA, ArchiveLabels
from anomalygpt_edge.runtime.delivery.archive_writer import ArchiveWriter
from anomalygpt_edge.runtime.delivery.disk_budget import LEVELS, DiskBudget
from anomalygpt_edge.runtime.delivery.spool_files import (
    close_quietly,
    connect_wal,
    is_damaged,
    is_disk_full,
    move_aside,
)

log = logging.getLogger(__name__)

DEFAULT_QUOTA_BYTES = 2 * 1024**3
JPEG_QUALITY = 90
#: Rows held in memory while the disk is too full to write them (then the oldest are dropped, counted).
MAX_DEFERRED_ROWS = 5000

__all__ = [
    "CSV_COLUMNS", "DEFAULT_QUOTA_BYTES", "JPEG_QUALITY", "LEVELS", "MAX_DEFERRED_ROWS", "Archive", "ArchiveError",
    "ArchiveStats", "ArchiveWriter", "DiskBudget", "csv_cell", "iso", "parse_time",
]  # fmt: skip


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
    images_skipped_disk: int = 0  # not written: disk low (free space under twice the floor) or budget
    rows_deferred: int = 0  # held in memory: disk critical or full, written when space returns
    rows_dropped_disk: int = 0  # deferred rows beyond MAX_DEFERRED_ROWS
    bytes_used: int = 0
    disk: str = "ok"
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Archive(ArchiveLabels):
    """The on-device verdict archive. Thread-safe; :meth:`record` never raises for disk problems.

    Labels (``add_label``, ``label_history``, ``labelled``) come from :mod:`archive_labels`."""

    def __init__(
        self,
        root: Path | str,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        ok_sample_rate: float = 0.0,
        jpeg_quality: int = JPEG_QUALITY,
        disk: DiskBudget | None = None,
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
        self._lock = threading.RLock()
        self.disk = disk
        self._deferred: deque[tuple] = deque()
        #: What happened to the store (moved aside …), for the status and logs.
        self.events: list[dict[str, Any]] = []
        self.db_path = self.root / "archive.db"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"archive {self.root}: cannot create the folder: {exc.strerror or exc}") from exc
        try:
            self._db = self._connect()
        except ArchiveError as exc:
            if not self.db_path.exists() or not is_damaged(exc):
                raise  # locked, read-only, full: moving a good archive aside would only hide it
            # A damaged archive must not stop the line: keep it as evidence, start a fresh one.
            try:
                moved = move_aside(self.db_path)
            except OSError as err:
                raise ArchiveError(f"{exc}; and it cannot be moved aside: {err}") from err
            message = f"{exc}; moved aside to {moved.name}, a fresh archive started"
            self.events.append({"kind": "moved_aside", "message": message, "at": iso(time.time())})
            self.stats.last_error = message
            log.error("%s", message)
            self._db = self._connect()
            self._adopt_images()
        if disk is not None:
            disk.track(self.db_path)
            disk.track_bytes(lambda: self.stats.bytes_used)

    def _connect(self) -> sqlite3.Connection:
        db = None
        try:
            if self.db_path.is_dir():
                raise ArchiveError(f"archive {self.db_path}: is a directory, not a database file")
            # NORMAL: after a power cut the last few rows may roll back, but never corrupt; the
            # spool (synchronous=FULL) is what guarantees delivery, the archive is the local copy.
            db, _mode = connect_wal(self.db_path, "NORMAL")
            db.executescript(SCHEMA + LABEL_SCHEMA)
            self.stats.bytes_used = int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files").fetchone()[0])
            return db
        except (sqlite3.DatabaseError, OSError) as exc:
            close_quietly(db)
            raise ArchiveError(f"archive {self.db_path}: {exc}") from exc

    def _adopt_images(self) -> None:
        """Put the image files already on disk back into the ledger, so the quota still covers them."""
        rows = []
        for path in self.images_dir.rglob("*.jpg") if self.images_dir.is_dir() else ():
            with contextlib.suppress(OSError):
                st = path.stat()
                rows.append(
                    (path.relative_to(self.images_dir).as_posix(), path.name.split(".")[0], st.st_size, st.st_mtime)
                )
        with contextlib.suppress(sqlite3.Error):
            self._db.executemany("INSERT OR REPLACE INTO files(path, verdict_id, bytes, ts) VALUES (?, ?, ?, ?)", rows)
            self.stats.bytes_used = sum(r[2] for r in rows)

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
        ts = verdict_time(verdict)
        kind = str(verdict.get("verdict", "ERROR"))
        if keep_image is None:
            keep_image = image is not None and self.wants_image(kind)
        level = self._disk_level()
        if keep_image and level != "ok":
            with self._lock:
                self.stats.images_skipped_disk += 1  # images give way first, so rows and the spool keep room
            keep_image = False
        paths: dict[str, str | None] = {"image": None, "heatmap": None}
        if keep_image:
            paths = self._keep_images(vid, ts, kind, image, heatmap)
        row = verdict_row(verdict, ts, paths)
        if level == "critical":
            self._defer(row)
            return False
        try:
            with self._lock:
                self._write_deferred()
                self._insert([row])
            return True
        except sqlite3.DatabaseError as exc:  # "database or disk is full", read-only, …
            if is_disk_full(exc):
                self._defer(row, f"archive row {vid} deferred: {exc}")
            else:
                self._fail_row(f"archive row {vid}: {exc}")
            return False

    def _keep_images(
        self, vid: str, ts: float, kind: str, image: np.ndarray | None, heatmap: np.ndarray | None
    ) -> dict[str, str | None]:
        """Write the part's image and heatmap under the capture day; their paths (None: not kept)."""
        paths: dict[str, str | None] = {"image": None, "heatmap": None}
        day = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")
        for name, array in (("image", image), ("heatmap", heatmap)):
            if array is not None:
                paths[name] = self._write_image(f"{day}/{safe_file_name(vid)}.{name}.jpg", array, vid, ts)
        if kind == "OK" and paths["image"]:
            self.stats.ok_sampled += 1
        return paths

    def _insert(self, rows: list[tuple]) -> None:
        """Lock held. One transaction; OR IGNORE: a redelivered or replayed verdict keeps its first row."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT OR IGNORE INTO verdicts(id, ts, captured_at, camera, recipe, verdict, score, threshold,"
                " part_id, frame_seq, reason, image, heatmap, json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise
        self.stats.rows += len(rows)

    def _defer(self, row: tuple, message: str | None = None) -> None:
        with self._lock:
            self._deferred.append(row)
            self.stats.rows_deferred += 1
            while len(self._deferred) > MAX_DEFERRED_ROWS:
                self._deferred.popleft()
                self.stats.rows_dropped_disk += 1
            if message:
                self.stats.last_error = message

    def _write_deferred(self) -> None:
        """Lock held: rows kept back while the disk was full go in first (raises like an insert)."""
        while self._deferred:
            batch = [self._deferred[i] for i in range(min(500, len(self._deferred)))]
            self._insert(batch)
            for _ in batch:
                self._deferred.popleft()

    def deferred_rows(self) -> int:
        """Rows held in memory until the disk has room for them."""
        with self._lock:
            return len(self._deferred)

    def flush_deferred(self) -> int:
        """Write rows kept back by a full disk if there is room now; returns how many are still waiting."""
        with self._lock:
            if self._deferred and self._disk_level() != "critical":
                with contextlib.suppress(sqlite3.DatabaseError):
                    self._write_deferred()
            return len(self._deferred)

    def _disk_level(self) -> str:
        level = self.disk.level() if self.disk is not None else "ok"
        if level != self.stats.disk:
            log.warning("archive: disk level %s -> %s", self.stats.disk, level)
            self.stats.disk = level
        return level

    def _write_image(self, rel: str, array: np.ndarray, vid: str, ts: float) -> str | None:
        import cv2  # imported here so that querying/exporting needs no OpenCV

        ok, buf = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            self._fail_image(f"cannot encode image of {vid} as JPEG")
            return None
        data = buf.tobytes()
        with self._lock:
            quota = self.quota_bytes
            allowance = self.disk.image_allowance(self.stats.bytes_used) if self.disk is not None else None
            if allowance is not None:
                quota = min(quota, allowance)  # the one disk budget caps the image quota too
            if len(data) > quota:
                self.stats.images_skipped_quota += 1
                self.stats.last_error = f"image of {vid} ({len(data)} B) exceeds the archive quota"
                return None
            try:
                self._evict_until(quota - len(data))
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
        """Delete image files until at most ``budget`` bytes are used (lock held): the oldest
        unlabelled first, labelled ones only when no unlabelled image is left."""
        while self.stats.bytes_used > budget:
            oldest = self._oldest_file()
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
        where: list[str] = ["1=1"]
        args: list[float | str] = []
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

    def export(
        self,
        start: str | float | dt.datetime,
        end: str | float | dt.datetime,
        out: Path | str,
        on_row: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Write ``verdicts.csv`` and the kept images of ``[start, end)`` into ``out``; returns counts.

        ``on_row(done, total)`` hears of each row written (the command line's progress bar).
        """
        out = Path(out)
        if parse_time(end) <= parse_time(start):
            raise ArchiveError(f"--to ({end}) must be after --from ({start})")
        rows = self.query(start, end)
        out.mkdir(parents=True, exist_ok=True)
        copied = missing = 0
        with open(out / "verdicts.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for done, row in enumerate(rows, 1):
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
                if on_row is not None:
                    on_row(done, len(rows))
        return {"rows": len(rows), "images": copied, "images_missing": missing, "out": str(out)}

    def close(self) -> None:
        with self._lock:
            self._db.close()
