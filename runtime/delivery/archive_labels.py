"""Labels on archived verdicts: ``good`` or ``defect`` (optional defect type and note), by whom,
when and from where (the station, an MQTT client, the CLI's bulk import).

A label is a row of its own in the archive database (table ``labels``), never an edit of the
verdict row: a verdict can be labelled again, the latest row is its current label and every
earlier row stays as its history. Labelled verdicts pin their images: the archive's quota evicts
every unlabelled image (oldest first) before it touches a labelled one (:data:`OLDEST_UNLABELLED`).

Edge cases, decided here:

* A verdict whose row is still held in memory (the disk was critical, see ``archive.py``) is
  written first when there is room; while it cannot be, the label is refused with
  :class:`LabelWriteError` ("send it again when the disk has room"), never dropped silently.
* A label write that fails (disk full, read-only database) raises :class:`LabelWriteError`.
* An archive moved aside as damaged keeps its labels in the moved file; the fresh archive knows
  none of the old verdicts, so labels for them are refused as :class:`UnknownVerdict`.
* An OK verdict whose image was not sampled (or was evicted) can still be labelled, but no label
  brings the image back: :meth:`ArchiveLabels.verdict_image` says None and the replies say
  ``image: false``.

:class:`ArchiveLabels` is a mixin of :class:`~anomalygpt_edge.runtime.delivery.archive.Archive`:
it uses the archive's connection, lock and deferred rows.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = ("good", "defect")
SOURCES = ("station", "mqtt", "cli", "auto")
#: Defect types as recipes name them (letters, digits, space, ``_ . -``; at most 64).
DEFECT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_ .-]{0,63}$")
MAX_NOTE_CHARS = 500
MAX_AUTHOR_CHARS = 128
MAX_VERDICT_ID_CHARS = 128

LABEL_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    verdict_id TEXT NOT NULL,
    label TEXT NOT NULL,
    defect_type TEXT,
    note TEXT,
    author TEXT NOT NULL,
    source TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_verdict ON labels(verdict_id, seq);
"""

#: The image file the quota evicts next: the oldest one whose verdict has no label.
OLDEST_UNLABELLED = (
    "SELECT path, verdict_id, bytes FROM files WHERE verdict_id NOT IN (SELECT verdict_id FROM labels)"
    " ORDER BY ts, path LIMIT 1"
)
#: Only when every image left is labelled: the oldest of those.
OLDEST_FILE = "SELECT path, verdict_id, bytes FROM files ORDER BY ts, path LIMIT 1"

_LATEST = (
    "SELECT l.verdict_id, l.label, l.defect_type, l.note, l.author, l.source, l.at FROM labels l"
    " WHERE l.seq = (SELECT MAX(seq) FROM labels m WHERE m.verdict_id = l.verdict_id)"
)


class UnknownVerdict(LookupError):  # noqa: N818 - the name other modules code against
    """No verdict with this id is in the archive."""


class LabelWriteError(RuntimeError):
    """The label could not be stored (disk full, verdict row still held in memory, database error)."""


@dataclass(frozen=True)
class Label:
    """One label row; rows are never updated, a relabel is a new row."""

    verdict_id: str
    label: str
    defect_type: str | None
    note: str | None
    author: str
    source: str  # "station" | "mqtt" | "cli" (| "auto")
    at: float  # unix time

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LabelledVerdict:
    """The latest label of one verdict joined with the verdict row.

    ``image_path`` is the archived image if it is still on disk: the frame as the inspector saw it,
    i.e. cropped to the recipe's ROI when the recipe has one (the line archives the ROI crop), else
    the full frame; None when it was never kept (an unsampled OK) or was evicted.
    """

    verdict_id: str
    camera: str
    recipe: str
    ts: float
    verdict: str
    score: float
    threshold: float
    label: str
    defect_type: str | None
    author: str
    at: float
    image_path: Path | None


def check_label(
    verdict_id: Any, label: Any, author: Any, source: Any, defect_type: Any = None, note: Any = None
) -> None:
    """ValueError naming the first field that is wrong (every entry point checks through here)."""
    if not isinstance(verdict_id, str) or not 0 < len(verdict_id) <= MAX_VERDICT_ID_CHARS:
        raise ValueError(
            f"field 'id' must be a verdict id (1..{MAX_VERDICT_ID_CHARS} characters), got {verdict_id!r:.60}"
        )
    if label not in LABELS:
        raise ValueError(f"field 'label' must be one of {', '.join(LABELS)}, got {label!r:.40}")
    if defect_type is not None and (not isinstance(defect_type, str) or not DEFECT_TYPE.match(defect_type)):
        raise ValueError(
            f"field 'defect_type' {defect_type!r:.40} is invalid: letters, digits, ' ', '_', '.', '-' (max 64)"
        )
    if defect_type is not None and label != "defect":
        raise ValueError("field 'defect_type' is only for a 'defect' label")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise ValueError(f"field 'note' must be text of at most {MAX_NOTE_CHARS} characters")
    if not isinstance(author, str) or not author.strip() or len(author) > MAX_AUTHOR_CHARS:
        raise ValueError(f"the label's author must be a name of 1..{MAX_AUTHOR_CHARS} characters")
    if source not in SOURCES:
        raise ValueError(f"the label's source must be one of {', '.join(SOURCES)}, got {source!r:.40}")


class ArchiveLabels:
    """Label rows of the archive's verdicts (mixed into ``Archive``, which provides the attributes)."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    _deferred: deque[tuple]
    images_dir: Path

    def _disk_level(self) -> str:  # provided by Archive
        raise NotImplementedError

    def _write_deferred(self) -> None:  # provided by Archive
        raise NotImplementedError

    def add_label(
        self,
        verdict_id: str,
        label: str,
        *,
        author: str,
        source: str,
        defect_type: str | None = None,
        note: str | None = None,
    ) -> Label:
        """Store one label row for an archived verdict; raises :class:`UnknownVerdict` for an id the
        archive does not have, ValueError for a bad field, :class:`LabelWriteError` when it cannot
        be written (nothing is stored then)."""
        return self.add_labels([(verdict_id, label, defect_type, note)], author=author, source=source)[0]

    def add_labels(
        self, rows: list[tuple[str, str, str | None, str | None]], *, author: str, source: str
    ) -> list[Label]:
        """Store ``(verdict_id, label, defect_type, note)`` rows in one transaction: all or none
        (the CLI's bulk import); raises like :meth:`add_label` for the first row that is wrong."""
        now = time.time()
        labels = []
        for vid, label, defect_type, note in rows:
            check_label(vid, label, author, source, defect_type, note)
            labels.append(Label(vid, label, defect_type, note or None, author.strip(), source, now))
        with self._lock:
            for x in labels:
                self._ensure_written(x.verdict_id)
            try:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO labels(verdict_id, label, defect_type, note, author, source, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(x.verdict_id, x.label, x.defect_type, x.note, x.author, x.source, x.at) for x in labels],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                first = labels[0].verdict_id if len(labels) == 1 else f"{len(labels)} verdicts"
                raise LabelWriteError(f"label for {first} not stored: {exc}") from exc
        return labels

    def known_verdicts(self, verdict_ids: list[str]) -> set[str]:
        """Which of these ids the archive has a verdict for (rows held in memory included)."""
        ids = list(dict.fromkeys(verdict_ids))
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(r[0] for r in self._db.execute(f"SELECT id FROM verdicts WHERE id IN ({marks})", chunk))
            wanted = set(ids)
            found.update(r[0] for r in self._deferred if r[0] in wanted)
        return found

    def _ensure_written(self, verdict_id: str) -> None:
        """Lock held: the verdict's row is in the database (deferred rows written first), else raise."""
        if self._db.execute("SELECT 1 FROM verdicts WHERE id = ?", (verdict_id,)).fetchone():
            return
        if not any(r[0] == verdict_id for r in self._deferred):
            raise UnknownVerdict(f"no verdict '{verdict_id[:80]}' in the archive")
        if self._disk_level() != "critical":
            try:
                self._write_deferred()
                return
            except sqlite3.DatabaseError:
                pass
        raise LabelWriteError(
            f"verdict {verdict_id} is held in memory until the disk has room; send its label again later"
        )

    def label_history(self, verdict_id: str) -> list[Label]:
        """Every label of one verdict, oldest first (the last is its current label)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT verdict_id, label, defect_type, note, author, source, at FROM labels"
                " WHERE verdict_id = ? ORDER BY seq",
                (verdict_id,),
            ).fetchall()
        return [Label(*r) for r in rows]

    def current_labels(self, verdict_ids: list[str]) -> dict[str, Label]:
        """The current label of each of these verdicts that has one (for history pages)."""
        out: dict[str, Label] = {}
        ids = list(dict.fromkeys(verdict_ids))
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for r in self._db.execute(f"{_LATEST} AND l.verdict_id IN ({marks})", chunk).fetchall():
                    out[r[0]] = Label(*r)
        return out

    def labelled(self, recipe: str | None = None, since: float | None = None) -> list[LabelledVerdict]:
        """Labelled verdicts (their latest label) of ``recipe``, labelled at or after ``since``,
        oldest label first."""
        sql = (
            "SELECT v.id, v.camera, v.recipe, v.ts, v.verdict, v.score, v.threshold, l.label, l.defect_type,"
            f" l.author, l.at, v.image FROM ({_LATEST}) l JOIN verdicts v ON v.id = l.verdict_id WHERE 1=1"
        )
        args: list[Any] = []
        if recipe is not None:
            sql += " AND v.recipe = ?"
            args.append(recipe)
        if since is not None:
            sql += " AND l.at >= ?"
            args.append(float(since))
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY l.at, v.id", args).fetchall()
        out = []
        for vid, camera, rec, ts, verdict, score, threshold, label, dtype, author, at, image in rows:
            path = self.images_dir / image if image else None
            out.append(
                LabelledVerdict(
                    vid,
                    camera or "",
                    rec or "",
                    ts,
                    verdict,
                    _num(score),
                    _num(threshold),
                    label,
                    dtype,
                    author,
                    at,
                    path if path is not None and path.is_file() else None,
                )  # fmt: skip
            )
        return out

    def verdict_image(self, verdict_id: str) -> Path | None:
        """The verdict's archived image if it is on disk (None: never kept, evicted, or no such verdict)."""
        with self._lock:
            row = self._db.execute("SELECT image FROM verdicts WHERE id = ?", (verdict_id,)).fetchone()
        if row is None or not row[0]:
            return None
        path = self.images_dir / row[0]
        return path if path.is_file() else None

    def _oldest_file(self) -> tuple[str, str, int] | None:
        """Lock held: the image file to evict next (unlabelled first, oldest first)."""
        found = self._db.execute(OLDEST_UNLABELLED).fetchone() or self._db.execute(OLDEST_FILE).fetchone()
        return None if found is None else (str(found[0]), str(found[1]), int(found[2]))


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
