"""The audit log: who changed which recipe or enrollment, and when; append-only JSON lines.

Every line is one complete JSON object written with a single ``write`` on a file opened in
append mode, then fsynced: a power cut loses at most the entry being written, never an earlier
one, and concurrent writers never interleave within a line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class AuditLog:
    """Append-only JSON-lines file of changes made through the station."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(
        self, user: str, role: str, action: str, target: str | None = None, details: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record one change (``action`` such as ``enroll.add``; ``target`` e.g. the recipe) durably."""
        entry = {
            "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "user": user,
            "role": role,
            "action": action,
            "target": target,
            "details": details or {},
        }
        line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # after a torn last line: start a fresh one, never extend it
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:  # the file's directory entry must survive a power cut too
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return entry

    def entries(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, oldest first; a torn last line (power cut) is skipped."""
        return list(self._read())[-limit:]

    def _read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
