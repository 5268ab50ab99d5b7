"""The inspection worker: takes batches of jobs from one bundle's work queue, runs each camera's
inspector on its frame and hands every verdict to the publisher.

``engines.workers`` loops share each queue (threads ``inspect-<bundle>-<i>``, one
:class:`InspectionWorker` and one :class:`BatchCost` per queue). Each loop holds the cameras of
the batch it inspects (:meth:`WorkQueue.get_batch` ``hold``), so a camera is in one loop at a
time: its verdicts keep their order, and what the loop touches per camera (the publisher's last
verdict, the camera's counters) has one writer. What loops share per frame is read-only or
thread-safe: the inspector (recipe, bank arrays, head weights, threshold), the engines (ONNX
Runtime ``Run``; TensorRT behind its lock), the heatmap overlay (a pure function), the queue's
counters (:meth:`WorkQueue.record_batch`) and the cost estimate (its lock).

The middle of the line's data flow (preprocess and engines run inside
:func:`~anomalygpt_edge.runtime.recipes.inspector.inspect_many`). Batches are bounded by
``engines.max_batch`` and ``engines.max_wait_ms`` and by the earliest deadline in the queue
(:mod:`.batching`); ``max_batch: 1`` inspects one job at a time. An engine or image failure is an
explicit ERROR verdict for every part it touched, never silence; a verdict that arrives after the
part's deadline becomes an ERROR saying so (the watchdog answered it already, so the publisher
drops it as late).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.batching import BatchCost, BatchPolicy
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.line.line_counts import LineCounts
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.line.status import DaemonHealth
from anomalygpt_edge.runtime.line.verdict_publisher import VerdictPublisher
from anomalygpt_edge.runtime.recipes.inspector import Inspector, inspect_many

log = logging.getLogger(__name__)


class InspectionWorker:
    """One loop per work queue; ``deadline_ms(camera)`` names the deadline in late-verdict reasons.

    ``policy`` bounds the batches (default: the ``engines`` section of the slots' config).
    """

    def __init__(
        self,
        slots: RecipeSlots,
        publisher: VerdictPublisher,
        health: DaemonHealth,
        counts: LineCounts,
        deadline_ms: Callable[[str], float],
        policy: BatchPolicy | None = None,
    ):
        self.slots = slots
        self.publisher = publisher
        self.health = health
        self.counts = counts
        self.deadline_ms = deadline_ms
        self.policy = policy or BatchPolicy.from_engines(slots.config.engines)
        self._costs: dict[int, BatchCost] = {}  # per queue: each queue has its own bundle and engines
        self._costs_lock = threading.Lock()

    def cost(self, queue: WorkQueue) -> BatchCost:
        """The queue's batch-cost estimate, shared by every loop on it."""
        with self._costs_lock:
            return self._costs.setdefault(id(queue), BatchCost())

    def run(self, queue: WorkQueue, stop: threading.Event) -> None:
        """Inspect batches from ``queue`` until ``stop`` is set (one of ``policy.workers`` loops on it)."""
        loop = threading.current_thread().name
        cost = self.cost(queue)
        while not stop.is_set():
            # Fed every iteration (get_batch() wakes at least every 0.2 s): a hung engine stops the
            # systemd watchdog pings, and systemd restarts the daemon.
            self.health.tick(loop)
            batch = queue.get_batch(self.policy.max_batch, self.policy.max_wait_s, 0.2, cost.predict, hold=True)
            try:
                jobs = [job for job in batch if not job.answered]
                if not jobs:
                    continue
                queue.record_batch(len(jobs))
                start = time.monotonic()
                inspected = self.inspect_batch(jobs)
                if inspected:
                    cost.observe(inspected, time.monotonic() - start)
            finally:  # even when this loop dies: its cameras must not stay held
                queue.release(batch)
        self.health.forget_loop(loop)

    def inspect(self, job: Job) -> None:
        """Inspect one job and answer it (or drop a free-run frame that is already too old)."""
        self.inspect_batch([job])

    def inspect_batch(self, jobs: list[Job]) -> int:
        """Inspect and answer every job (stale free-run frames are dropped); returns how many were inspected.

        Each job is judged by its own camera's recipe as it is when the batch starts, so a recipe
        switch between two jobs of a batch answers each with its own recipe.
        """
        start = time.monotonic()
        ready: list[tuple[Job, Inspector, np.ndarray]] = []
        for job in jobs:
            if not job.triggered and start > job.deadline_mono:
                self.counts.add(job.camera, "stale")  # a newer frame will come; this one is too old to matter
                continue
            inspector, problem, recipe = self.slots.current(job.camera)
            if inspector is None:
                self.publisher.answer_error(job, f"recipe {recipe} cannot inspect: {problem}")
                continue
            image = job.pixels()
            assert image is not None
            ready.append((job, inspector, image))
        if not ready:
            return 0
        verdicts = self._verdicts(ready)
        for (job, inspector, image), verdict in zip(ready, verdicts):
            self._answer(job, verdict, inspector.recipe.name, image, start)
        return len(ready)

    def _verdicts(self, ready: list[tuple[Job, Inspector, np.ndarray]]) -> list[Verdict]:
        """One verdict per ready job; anything unexpected answers every job of the batch ERROR."""
        try:
            return inspect_many([(inspector, image, f"{job.camera} frame") for job, inspector, image in ready])
        except Exception as exc:  # engine or image failure: an explicit ERROR, never silence
            log.exception("inspection of a batch of %d failed", len(ready))
            return [Verdict.error(inspector.recipe.name, f"inspection failed: {exc}") for _, inspector, _ in ready]

    def _answer(self, job: Job, verdict: Verdict, recipe: str, image: np.ndarray, start: float) -> None:
        """Stamp the queue wait (and a trigger's frame wait), turn a late verdict into ERROR, publish."""
        verdict = self._in_time(job, verdict, recipe)
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
