"""The archive's background writer: JPEG encoding and disk writes off the verdict's path."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the archive imports this writer to offer it under its old name
    from anomalygpt_edge.runtime.delivery.archive import Archive

# The archive's own logger: the writer's failures are the archive's, and logs are filtered by it.
log = logging.getLogger("anomalygpt_edge.runtime.delivery.archive")


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

    @property
    def thread(self) -> threading.Thread:
        """The writer thread (for liveness checks)."""
        return self._thread

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                # Idle: rows kept back by a full disk go in by themselves once there is room.
                with contextlib.suppress(Exception):
                    self.archive.flush_deferred()
                continue
            if item is None:
                self._queue.task_done()
                return
            try:
                self.archive.record(*item)
            except Exception as exc:  # never let the writer thread die: count and carry on
                self.archive.stats.rows_failed += 1
                self.archive.stats.last_error = f"archive writer: {exc!r}"
                log.exception("archive writer")
                if self._on_error:
                    with contextlib.suppress(Exception):
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
