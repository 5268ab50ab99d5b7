"""The deadline watchdog: answers a triggered part with ERROR the moment its deadline passes while it
still waits for a frame, a queue slot or the engine.

It answers a little *before* the deadline (:data:`ANSWER_MARGIN` of the budget, at most
:data:`ANSWER_MARGIN_MAX_S`), leaving time to publish, so the ERROR reaches the PLC in time.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from anomalygpt_edge.runtime.line.jobs import Job

log = logging.getLogger(__name__)
#: The deadline watchdog answers this share of the deadline early (at most ANSWER_MARGIN_MAX_S),
#: leaving time to publish, so the ERROR reaches the PLC before the deadline rather than after it.
ANSWER_MARGIN = 0.15
ANSWER_MARGIN_MAX_S = 0.15


class DeadlineWatchdog:
    """Answers triggered jobs whose deadline passed before the worker could."""

    def __init__(self, on_expired: Callable[[Job], None], on_error: Callable[[str], None] | None = None):
        self._on_expired = on_expired
        self._on_error = on_error
        self._heap: list[tuple[float, int, Job]] = []
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self.failures = 0
        self.thread = threading.Thread(target=self._guarded, name="deadline-watchdog", daemon=True)
        self.thread.start()

    @staticmethod
    def answer_by(job: Job) -> float:
        """When the watchdog answers ``job``: its deadline less a publishing margin."""
        budget = max(0.0, job.deadline_mono - job.created_mono)
        return job.deadline_mono - min(ANSWER_MARGIN_MAX_S, ANSWER_MARGIN * budget)

    def track(self, job: Job) -> None:
        """Answer ``job`` at :meth:`answer_by` unless someone answered it first."""
        with self._cond:
            heapq.heappush(self._heap, (self.answer_by(job), next(self._ids), job))
            self._cond.notify()

    def stop(self) -> None:
        """End the watchdog thread (parts still tracked are no longer answered by it)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self.thread.join(2.0)

    def _guarded(self) -> None:
        # Last resort: the watchdog is what answers parts nobody else could; it must not die.
        while True:
            try:
                self._run()
                return
            except Exception as exc:
                self._fail(f"deadline watchdog failed: {exc!r}")
                time.sleep(0.05)

    def _fail(self, message: str) -> None:
        self.failures += 1
        log.exception(message)
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(message)

    def _next_expired(self) -> Job | None:
        """Wait for the next job due an answer; None when stopping."""
        with self._cond:
            while not self._stop:
                while self._heap and self._heap[0][2].answered:
                    heapq.heappop(self._heap)  # answered in time: forget it
                if self._heap and self._heap[0][0] <= time.monotonic():
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
            return None

    def _run(self) -> None:
        while (job := self._next_expired()) is not None:
            try:
                self._on_expired(job)
            except Exception as exc:
                self._fail(f"deadline answer for camera {job.camera} failed: {exc!r}")
