"""The spool's SQLite layer: its schema, a row decoded (or why it cannot be), the rows that can still
be read from a damaged file, and the transaction that turns SQLite errors into :class:`SpoolError`."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: How many corrupt-file probes salvaging may take (each one jumps further past a bad page).
SALVAGE_PROBES = 48

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    verdict_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_attempt REAL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq, verdict_id, topic, payload, created, attempts,
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
INSERT OR IGNORE INTO counters(name, value) VALUES ('dropped_full', 0), ('dropped_age', 0), ('quarantined', 0);
"""
COLUMNS = "seq, verdict_id, topic, payload, created, attempts"


class SpoolError(RuntimeError):
    """The spool database cannot be opened or written (disk full, unreadable, not a database)."""


@dataclass(frozen=True)
class SpoolItem:
    """One undelivered verdict."""

    seq: int
    verdict_id: str
    topic: str
    payload: bytes
    created: float
    attempts: int

    @property
    def redelivered(self) -> bool:
        """True when an earlier publish of this item may have reached the broker (resend = duplicate)."""
        return self.attempts > 0


def mark_redelivered(payload: bytes) -> bytes:
    """``payload`` (a JSON object) with ``"redelivered": true`` set; other payloads are returned as is.

    The subscriber recognises the duplicate by ``id``; the flag tells it a duplicate is possible.
    """
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload
    if not isinstance(data, dict):
        return payload
    data["redelivered"] = True
    return json.dumps(data, separators=(",", ":")).encode()


def decode_row(r: tuple) -> tuple[SpoolItem | None, str]:
    """A row as a :class:`SpoolItem`, or None and why it cannot be delivered."""
    seq, vid, topic, payload, created, attempts = r
    if not isinstance(seq, int):
        return None, f"seq is {type(seq).__name__}"
    if not isinstance(vid, str) or not vid:
        return None, f"verdict_id is {type(vid).__name__}"
    if not isinstance(topic, str) or not topic or any(c in topic for c in "+#\0"):
        return None, f"topic is not a publishable topic ({topic!r:.40})"
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes):
        return None, f"payload is {type(payload).__name__}"
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None, "payload is not JSON"
    if not isinstance(body, dict):
        return None, "payload is not a JSON object"
    if not isinstance(created, (int, float)) or not isinstance(attempts, int):
        return None, "created/attempts are not numbers"
    return SpoolItem(seq, vid, topic, payload, float(created), attempts), ""


def salvage_rows(path: Path) -> list[tuple]:
    """The rows of a damaged spool file that can still be read, oldest first (best effort, bounded).

    The file is read into memory (never written; Python 3.10 reads a temporary copy) and, if it
    was cut short, padded with zeros to the size its header declares, so SQLite can still reach
    the pages that survived. A damaged
    page makes a scan fail where it starts; the scan resumes past it by jumping further ahead
    each time, so one bad page costs the rows on it, not the rows behind it.
    """
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError:
        return []
    if len(data) < 100:
        return []
    page = int.from_bytes(data[16:18], "big")
    page = 65536 if page == 1 else page
    declared = int.from_bytes(data[28:32], "big") * page
    image = bytearray(data)
    if page >= 512 and len(image) < declared <= 4 * len(image) + (1 << 20):
        image += b"\0" * (declared - len(image))
    image[:16] = b"SQLite format 3\x00"  # a damaged magic string alone must not cost every row
    image[18:20] = b"\x01\x01"  # WAL-mode image -> rollback mode: an in-memory copy has no WAL to open
    rows: dict[int, tuple] = {}
    try:
        with _opened_image(bytes(image)) as db:
            _salvage_into(db, rows)
    except (sqlite3.Error, OSError):
        pass
    return [rows[k] for k in sorted(rows)]


@contextlib.contextmanager
def _opened_image(image: bytes) -> Iterator[sqlite3.Connection]:
    """A connection on the database ``image``: in memory (``Connection.deserialize``, Python 3.11+),
    else (3.10, e.g. JetPack 6) on a temporary copy read only and deleted after."""
    if sys.version_info >= (3, 11):
        db = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            db.deserialize(image)
            yield db
        finally:
            db.close()
    else:
        with tempfile.TemporaryDirectory(prefix="spool-salvage-") as folder:
            copy = Path(folder) / "spool.db"
            copy.write_bytes(image)
            db = sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True, check_same_thread=False)
            try:
                yield db
            finally:
                db.close()


def _salvage_into(db: sqlite3.Connection, rows: dict[int, tuple]) -> None:
    """The readable spool rows of ``db`` into ``rows`` by ``seq``, probing past damaged pages."""
    after, jump = 0, 1
    for _ in range(SALVAGE_PROBES):
        try:
            for r in db.execute(f"SELECT {COLUMNS} FROM spool WHERE seq > ? ORDER BY seq", (after,)):
                item, _problem = decode_row(tuple(r))
                if item is not None and item.seq > after:
                    it = item
                    rows[it.seq] = (it.seq, it.verdict_id, it.topic, it.payload, it.created, it.attempts)
                    after = item.seq
            break
        except sqlite3.Error:
            after += jump
            jump *= 2


class Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on error; SQLite errors become :class:`SpoolError`.

    SQLite rolls a transaction back by itself on some errors (``SQLITE_FULL``, ``SQLITE_IOERR``):
    the ROLLBACK here is then refused ("no transaction is active"). It is issued only while a
    transaction is open and its own failure is never raised: the caller gets one
    :class:`SpoolError` naming the real cause, never a raw ``sqlite3.OperationalError``.
    """

    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db = db
        self.path = path

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: {exc}") from exc

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as err:
                self._rollback()
                raise SpoolError(f"spool {self.path}: {err}") from err
        self._rollback()
        if isinstance(exc, sqlite3.Error):
            raise SpoolError(f"spool {self.path}: {exc}") from exc
