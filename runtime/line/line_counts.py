"""Per-camera event counters shared by the line's threads (frames, triggers, verdicts, stale...).

``counter[key] += 1`` is a read and a write: two threads that interleave them lose a count, and
with two inspection workers plus the deadline watchdog and the trigger board several threads add
to one camera's counters. So every add goes through :meth:`LineCounts.add` under one lock, and
readers get a copy taken under the same lock (never a dict that changes while it is iterated).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping


class LineCounts(Mapping[str, dict[str, int]]):
    """Counters by camera; ``counts[camera]`` is a snapshot copy, :meth:`add` the only writer."""

    def __init__(self, cameras: Iterable[str]):
        self._lock = threading.Lock()
        self._by_camera: dict[str, collections.Counter[str]] = {c: collections.Counter() for c in cameras}

    def add(self, camera: str, key: str, n: int = 1) -> None:
        """Count ``n`` events ``key`` for ``camera`` (a camera not configured is ignored)."""
        with self._lock:
            counter = self._by_camera.get(camera)
            if counter is not None:
                counter[key] += n

    def __getitem__(self, camera: str) -> dict[str, int]:
        with self._lock:
            return dict(self._by_camera[camera])

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_camera))

    def __len__(self) -> int:
        return len(self._by_camera)
