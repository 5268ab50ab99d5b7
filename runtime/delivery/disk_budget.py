"""The one disk budget of the daemon's state folder, shared by the spool, the archive, their WALs
and the archive's images: measured free space and file sizes, turned into a level (ok, low, critical).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.delivery.spool_files import free_bytes

#: Disk levels, from healthy to full (see :class:`DiskBudget`).
LEVELS = ("ok", "low", "critical")


class DiskBudget:
    """One disk budget for the daemon's state folder: spool, archive, their WALs and images.

    ``level()`` is ``ok``; ``low`` when free space is under twice ``floor_bytes`` or the files use
    more than 90 % of ``budget_bytes`` (the archive stops writing images); ``critical`` under the
    floor or over the budget (the archive stops writing rows too). ``budget_bytes`` 0 = no budget,
    free space alone decides. Measured at most every ``interval_s`` (a few ``stat`` calls).
    """

    def __init__(
        self,
        root: Path | str,
        budget_bytes: int = 0,
        floor_bytes: int = 0,
        reserve_bytes: int = 0,
        interval_s: float = 0.25,
    ):
        self.root = Path(root)
        self.budget_bytes = max(0, int(budget_bytes))
        self.floor_bytes = max(0, int(floor_bytes))
        self.reserve_bytes = max(0, int(reserve_bytes))
        self.interval_s = interval_s
        self._files: list[Path] = []
        self._extra: list[Callable[[], int]] = []
        self._lock = threading.Lock()
        self._cached: tuple[float, str, int, int] | None = None

    def track(self, *paths: Path) -> None:
        """Count these files (and their ``-wal``/``-shm`` companions) against the budget."""
        with self._lock:
            for p in paths:
                p = Path(p)
                self._files += [p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm")]

    def track_bytes(self, source: Callable[[], int]) -> None:
        """Count ``source()`` bytes too (the archive's image files, which it tallies itself)."""
        with self._lock:
            self._extra.append(source)

    def used_bytes(self) -> int:
        """Bytes of every tracked file (missing ones count 0) plus the tracked byte sources."""
        total = 0
        for p in list(self._files):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        for source in list(self._extra):
            with contextlib.suppress(Exception):
                total += int(source())
        return total

    def measure(self) -> tuple[str, int, int]:
        """``(level, used_bytes, free_bytes)``, cached for ``interval_s``."""
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self.interval_s:
                return self._cached[1:]
        used, free = self.used_bytes(), free_bytes(self.root)
        level = "ok"
        budget = self.budget_bytes
        if free < self.floor_bytes or (budget and used > budget):
            level = "critical"
        elif free < 2 * self.floor_bytes or (budget and used > 0.9 * budget):
            level = "low"
        with self._lock:
            self._cached = (now, level, used, free)
        return level, used, free

    def level(self) -> str:
        """``ok``, ``low`` or ``critical`` (see the class)."""
        return self.measure()[0]

    def image_allowance(self, image_bytes: int) -> int | None:
        """Bytes of images the budget leaves room for (None: no budget), after the other files and
        a tenth of the budget kept for rows and WAL growth."""
        if not self.budget_bytes:
            return None
        other = self.used_bytes() - image_bytes
        return max(0, int(self.budget_bytes * 0.9) - other - self.reserve_bytes)

    def stats(self) -> dict[str, Any]:
        """Level, bytes used by the tracked files, free bytes, budget and floor (the status's ``disk``)."""
        level, used, free = self.measure()
        return {
            "level": level,
            "used_bytes": used,
            "free_bytes": free,
            "budget_bytes": self.budget_bytes or None,
            "floor_bytes": self.floor_bytes,
        }
