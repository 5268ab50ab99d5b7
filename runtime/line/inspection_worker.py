"""The inspection worker: takes jobs from one bundle's work queue, runs the camera's inspector on the
frame and hands the verdict to the publisher.

The middle of the line's data flow (preprocess and engines run inside :meth:`Inspector.inspect`).
An engine or image failure is an explicit ERROR verdict, never silence; a verdict that arrives
after the part's deadline becomes an ERROR saying so (the watchdog answered it already, so the
publisher drops it as late).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.line.status import DaemonHealth
from anomalygpt_edge.runtime.line.verdict_publisher import VerdictPublisher

log = logging.getLogger(__name__)


class InspectionWorker:
    """One loop per work queue; ``deadline_ms(camera)`` names the deadline in late-verdict reasons."""

    def __init__(
        self,
        slots: RecipeSlots,
        publisher: VerdictPublisher,
        health: DaemonHealth,
        counts: dict[str, collections.Counter[str]],
        deadline_ms: Callable[[str], float],
    ):
        self.slots = slots
        self.publisher = publisher
        self.health = health
        self.counts = counts
        self.deadline_ms = deadline_ms

    def run(self, queue: WorkQueue, stop: threading.Event) -> None:
        """Inspect jobs from ``queue`` until ``stop`` is set."""
        loop = threading.current_thread().name
        while not stop.is_set():
            # Fed every iteration (get() wakes at least every 0.2 s): a hung engine stops the
            # systemd watchdog pings, and systemd restarts the daemon.
            self.health.tick(loop)
            job = queue.get(0.2)
            if job is None or job.answered:
                continue
            self.inspect(job)
        self.health.forget_loop(loop)

    def inspect(self, job: Job) -> None:
        """Inspect one job and answer it (or drop a free-run frame that is already too old)."""
        start = time.monotonic()
        if not job.triggered and start > job.deadline_mono:
            self.counts[job.camera]["stale"] += 1  # a newer frame will come; this one is too old to matter
            return
        inspector, problem, recipe = self.slots.current(job.camera)
        if inspector is None:
            self.publisher.answer_error(job, f"recipe {recipe} cannot inspect: {problem}")
            return
        image = job.pixels()
        assert image is not None
        try:
            verdict = inspector.inspect(image, f"{job.camera} frame")
        except Exception as exc:  # engine or image failure: an explicit ERROR, never silence
            log.exception("camera %s: inspection failed", job.camera)
            verdict = Verdict.error(inspector.recipe.name, f"inspection failed: {exc}")
        verdict = self._in_time(job, verdict, inspector.recipe.name)
        verdict.latency_ms = {"queue_wait": (start - (job.queued_mono or start)) * 1e3, **verdict.latency_ms}
        if job.kind == "trigger" and job.frame is not None:
            verdict.latency_ms["frame_wait"] = (job.frame.captured_mono - job.created_mono) * 1e3
        self.publisher.answer(job, verdict, image)

    def _in_time(self, job: Job, verdict: Verdict, recipe: str) -> Verdict:
        """``verdict``, or an ERROR when it came after the part's deadline."""
        done = time.monotonic()
        if done <= job.deadline_mono or verdict.verdict == "ERROR":
            return verdict
        late = (done - job.created_mono) * 1e3
        return Verdict.error(
            recipe,
            f"deadline exceeded: {verdict.verdict} after {late:.0f} ms > {self.deadline_ms(job.camera):g} ms",
            latency_ms=verdict.latency_ms,
            bank_version=verdict.bank_version,
            bundle_sha256=verdict.bundle_sha256,
        )
