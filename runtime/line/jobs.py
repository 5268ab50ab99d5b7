"""Inspection jobs and the bounded queue between cameras/triggers and an inspection worker.

Back-pressure is explicit and different for the two kinds of work:

* free-run frames: one slot per camera; a newer frame replaces a waiting older one (drop-oldest,
  counted as ``superseded``), so a slow pipeline inspects the newest frame, never a backlog;
* triggered parts (PLC trigger, folder watch): never dropped. They wait in FIFO order ahead of
  free-run frames; when the queue is full or the deadline passes, the part is *answered* with an
  ERROR verdict instead (see :class:`Job.answer`), so the PLC always hears back.

Several workers may take from one queue (``engines.workers``). A worker that takes with
``hold=True`` holds the cameras of its batch until it calls :meth:`WorkQueue.release`: no other
worker takes a job of a held camera meanwhile, so one camera is inspected by one worker at a time
and its verdicts never overtake each other (the order the PLC sees is the order of one worker).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from anomalygpt_edge.runtime.cameras.base import Frame
from anomalygpt_edge.runtime.delivery.mqtt_link import Command

#: Where a part came from: a free-run frame (may be superseded), a PLC trigger, a watched file.
JobKind = Literal["free_run", "trigger", "folder_watch"]
#: A camera that offered no free-run frame for this long no longer holds a batch open for its frame.
ACTIVE_CAMERA_S = 1.0
#: A batch is admitted only if it ends before its deadlines with this factor on its expected cost:
#: the worker shares the GIL and the cores with camera decoding and publishing, and a batch that
#: runs past a frame's deadline turns every verdict in it into ERROR.
BATCH_COST_MARGIN = 1.5


@dataclass
class Job:
    """One part (or free-run frame) to inspect and answer exactly once."""

    camera: str
    kind: JobKind
    deadline_mono: float
    created_mono: float = field(default_factory=time.monotonic)
    frame: Frame | None = None  # set when the image is there (triggers wait for the next frame)
    image: np.ndarray | None = None  # folder watch: the file's image (no camera frame)
    captured_at: float | None = None  # epoch seconds of capture (or of the trigger for folder files)
    part_id: str | None = None
    command: Command | None = None  # the PLC's trigger, for the reply with its correlation data
    correlation: str | None = None
    queued_mono: float | None = None
    _answered: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def triggered(self) -> bool:
        return self.kind != "free_run"

    def claim(self) -> bool:
        """First caller wins the right to answer (the worker or the deadline watchdog); never both."""
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True

    @property
    def answered(self) -> bool:
        return self._answered

    def pixels(self) -> np.ndarray | None:
        return self.frame.image if self.frame is not None else self.image


class WorkQueue:
    """Triggered FIFO (bounded, never silently dropped) ahead of one free-run slot per camera."""

    def __init__(self, max_triggered: int = 64):
        self.max_triggered = max_triggered
        self._triggered: collections.deque[Job] = collections.deque()
        self._free: dict[str, Job] = {}
        self._order: collections.deque[str] = collections.deque()  # round robin over cameras
        self._last_free: dict[str, float] = {}  # camera -> when it last offered a frame
        self._period: dict[str, float] = {}  # camera -> seconds between its frames (moving average)
        self._cond = threading.Condition()
        self._held: set[str] = set()  # cameras whose batch a worker is inspecting (hold=True)
        self.batch_waiters = 0  # workers waiting for a free-run batch to fill (tests wait on it)
        self.counts: collections.Counter[str] = collections.Counter()

    def put_triggered(self, job: Job) -> bool:
        """Queue a triggered part; False when full (the caller must answer it with ERROR)."""
        with self._cond:
            if len(self._triggered) >= self.max_triggered:
                self.counts["triggered_refused"] += 1
                return False
            job.queued_mono = time.monotonic()
            self._triggered.append(job)
            self._cond.notify()
            return True

    def put_free(self, job: Job) -> None:
        """Offer a free-run frame; it replaces the camera's waiting one (drop-oldest)."""
        with self._cond:
            job.queued_mono = time.monotonic()
            last = self._last_free.get(job.camera)
            if last is not None and job.queued_mono - last < ACTIVE_CAMERA_S:
                old = self._period.get(job.camera, job.queued_mono - last)
                self._period[job.camera] = old + 0.2 * (job.queued_mono - last - old)
            self._last_free[job.camera] = job.queued_mono
            if job.camera in self._free:
                self.counts["superseded"] += 1
            else:
                self._order.append(job.camera)
            self._free[job.camera] = job
            self._cond.notify()

    def get(self, timeout: float) -> Job | None:
        """Next job: triggered parts first, then free-run frames round robin; None on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._triggered and not self._free:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._triggered:
                return self._triggered.popleft()
            camera = self._order.popleft()
            return self._free.pop(camera)

    def get_batch(
        self,
        max_batch: int,
        max_wait_s: float,
        timeout: float,
        cost_s: Callable[[int], float] | None = None,
        hold: bool = False,
    ) -> list[Job]:
        """Up to ``max_batch`` jobs, triggered parts first; ``[]`` on timeout.

        A triggered part never waits for a batch to fill: the parts and frames already waiting join
        it while the batch, at :data:`BATCH_COST_MARGIN` times ``cost_s(n)`` (the expected seconds
        for a batch of n), still ends before every deadline in it. Free-run frames alone wait for
        the frames due from other cameras up to ``max_wait_s``, and never past the earliest frame
        deadline less ``cost_s`` of the batch. Jobs of cameras another worker holds are left
        waiting; with ``hold`` the batch's cameras are held until :meth:`release`.
        """
        cost = cost_s or (lambda n: 0.0)
        end = time.monotonic() + timeout
        with self._cond:
            while not self._takeable():
                left = end - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            if max_batch > 1 and not self._takeable_triggered():
                self._wait_for_frames(max_batch, max_wait_s, cost)
            batch = self._take(max_batch, cost)
            if hold:
                self._held.update(job.camera for job in batch)
            return batch

    def release(self, batch: list[Job]) -> None:
        """The worker that took ``batch`` with ``hold=True`` is done with it: its cameras are free again."""
        if not batch:
            return
        with self._cond:
            self._held.difference_update(job.camera for job in batch)
            self._cond.notify_all()

    def record_batch(self, jobs: int) -> None:
        """Count one inspected batch of ``jobs`` (several workers count into the same counters)."""
        with self._cond:
            self.counts["batches"] += 1
            self.counts["batched_jobs"] += jobs

    def _takeable_triggered(self) -> bool:
        return any(job.camera not in self._held for job in self._triggered)

    def _free_cameras(self) -> list[str]:
        """Cameras with a waiting free-run frame that no other worker holds, in round-robin order."""
        return [camera for camera in self._order if camera not in self._held]

    def _takeable(self) -> bool:
        return self._takeable_triggered() or bool(self._free_cameras())

    def _wait_for_frames(self, max_batch: int, max_wait_s: float, cost: Callable[[int], float]) -> None:
        """Hold a free-run batch open for the frames due within ``max_wait_s``, unless a trigger comes.

        Only cameras whose next frame is due inside the window are waited for: cameras at one rate
        keep their phase, so a camera whose frames come just after the window would never join and
        every frame would wait for nothing.
        """
        now = time.monotonic()
        first = min(self._free[c].queued_mono or now for c in self._free_cameras())
        until = first + max_wait_s
        due = [self._last_free[c] + p for c, p in self._period.items() if c not in self._free and c not in self._held]
        coming = sum(1 for t in due if now - ACTIVE_CAMERA_S < t <= until)
        want = min(max_batch, len(self._free_cameras()) + coming)
        self.batch_waiters += 1
        try:
            while not self._takeable_triggered() and 0 < len(ready := self._free_cameras()) < want:
                earliest = min(self._free[c].deadline_mono for c in ready)
                left = min(until, earliest - cost(min(want, len(ready) + 1))) - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
        finally:
            self.batch_waiters -= 1

    def _take(self, max_batch: int, cost: Callable[[int], float]) -> list[Job]:
        """Triggered parts (FIFO), then free-run frames (round robin), while the batch ends before every deadline in it.

        The first job goes alone whatever its chances. A part that would make the batch late waits
        for the next batch (it is still answered by its deadline); a frame that would stays queued
        until the camera's next frame supersedes it or it is dropped as stale. Jobs of held cameras
        stay queued (their parts keep their FIFO order behind the one being inspected).
        """
        batch: list[Job] = []
        due = float("inf")

        def fits(job: Job) -> bool:
            ends = time.monotonic() + BATCH_COST_MARGIN * cost(len(batch) + 1)
            return not batch or ends <= min(due, job.deadline_mono)

        waiting: collections.deque[Job] = collections.deque()  # rebuilt by identity (a Job compares by fields)
        blocked = False  # once a part does not fit, every later part waits too (FIFO)
        for job in self._triggered:
            if blocked or len(batch) >= max_batch or job.camera in self._held:
                waiting.append(job)
            elif fits(job):
                batch.append(job)
                due = min(due, job.deadline_mono)
            else:
                blocked = True
                waiting.append(job)
        self._triggered = waiting
        for camera in self._free_cameras():
            if len(batch) >= max_batch:
                break
            if fits(self._free[camera]):
                self._order.remove(camera)
                batch.append(self._free.pop(camera))
                due = min(due, batch[-1].deadline_mono)
        return batch

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def depth(self) -> dict[str, Any]:
        with self._cond:
            return {"triggered": len(self._triggered), "free_run": len(self._free)}
