"""The files around a SQLite store: a damaged one moved aside, free space, and the reserve file the
spool frees when the disk fills. The spool and the archive share them."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

#: Pages (4 KiB) of WAL before SQLite checkpoints by itself: 1 MiB instead of the default 4 MiB.
WAL_AUTOCHECKPOINT_PAGES = 256
#: Bytes a WAL is truncated back to after a checkpoint (by default it keeps its largest size).
JOURNAL_SIZE_LIMIT = 1024 * 1024


def connect_wal(path: Path, synchronous: str, timeout: float = 5.0) -> tuple[sqlite3.Connection, str]:
    """A connection in WAL mode with a bounded WAL (so it cannot fill the disk), and the journal mode
    SQLite reports. ``isolation_level=None``: the caller issues its own BEGIN. Closed again if a pragma fails.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    except BaseException:
        close_quietly(db)
        raise
    return db, str(mode)


def close_quietly(db: sqlite3.Connection | None) -> None:
    """Close a connection being given up on; its own close error would only hide the first one."""
    if db is not None:
        with contextlib.suppress(sqlite3.Error):
            db.close()


def utc_stamp(t: float | None = None) -> str:
    """``20261201T213000Z``: the suffix of a store moved aside."""
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def is_disk_full(exc: BaseException) -> bool:
    """Whether an SQLite or OS error means the disk (or a quota) is full."""
    text = str(exc).lower()
    return "full" in text or "no space" in text or getattr(exc, "errno", None) in (28, 122)  # ENOSPC, EDQUOT


#: Error texts that mean the store itself is damaged (and moving it aside helps), as opposed to
#: locked by another process, read-only or out of space (where it would only hide good data).
DAMAGED = ("not a database", "malformed", "is a directory", "quick check", "corrupt", "unsupported file format")


def is_damaged(exc: BaseException) -> bool:
    """Whether an error opening a store means the file itself is damaged."""
    text = str(exc).lower()
    return any(marker in text for marker in DAMAGED)


def move_aside(path: Path, companions: Sequence[str] = ("-wal", "-shm"), now: float | None = None) -> Path:
    """Rename ``path`` (file or folder) and its SQLite companions to ``<name>.corrupt-<UTC time>``.

    Nothing is deleted: the moved file is the evidence (and what a person can still try to recover).
    """
    stamp = utc_stamp(now)
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():  # two recoveries within a second
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    for suffix in companions:
        side = path.with_name(path.name + suffix)
        if side.exists():
            with contextlib.suppress(OSError):
                os.replace(side, target.with_name(target.name + suffix))
    return target


def free_bytes(path: Path) -> int:
    """Bytes available to this process on the filesystem holding ``path`` (0 if it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return int(st.f_bavail) * int(st.f_frsize)


class DiskReserve:
    """A file of ``size`` bytes held back for the spool, released when a commit finds the disk full."""

    def __init__(self, path: Path, size: int):
        self.path = Path(path)
        self.size = max(0, int(size))
        self.releases = 0

    @property
    def held(self) -> bool:
        """Whether the reserve file is there at full size (always true for a zero-size reserve)."""
        return self.size == 0 or (self.path.exists() and self.path.stat().st_size >= self.size)

    def ensure(self, floor_bytes: int = 0) -> bool:
        """Create the reserve when there is room for it above ``floor_bytes``; True when it is held."""
        if self.held:
            return True
        if free_bytes(self.path.parent) < self.size + floor_bytes:
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            # Real blocks (not a sparse file): on tmpfs and ext4 alike, deleting it frees that much.
            with open(tmp, "wb") as fh:
                chunk = b"\0" * 65536
                left = self.size
                while left > 0:
                    left -= fh.write(chunk[: min(left, len(chunk))])
            os.replace(tmp, self.path)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False

    def release(self) -> bool:
        """Delete the reserve; True if there was one to free."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False
        self.releases += 1
        return True
