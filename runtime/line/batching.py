"""Deadline-aware micro-batching for one bundle's inspection worker.

Cameras that share a bundle share its engines, and a batch of 8 images runs about twice the
images per second of one at a time on ONNX Runtime CPU (``bench vision``). The worker therefore
takes *batches* from its :class:`~anomalygpt_edge.runtime.line.jobs.WorkQueue`:

* a triggered part never waits for a batch to fill: it is taken at once, together with the parts
  and free-run frames already waiting, as many as fit before the earliest triggered deadline by
  the measured cost of a batch (:class:`BatchCost`);
* free-run frames alone wait at most ``engines.max_wait_ms`` for the other cameras' frames, and
  never past the earliest frame deadline less the expected time to inspect the batch;
* no batch is larger than ``engines.max_batch`` (1 = one job at a time, as before batching).

The batch is then inspected in one pass per bundle (one encoder run for every image, one
bank-matcher run per recipe: :func:`~anomalygpt_edge.runtime.recipes.inspector.inspect_many`).

Several workers per queue (``engines.workers``, :func:`worker_count`): each takes its own batches
with the same admission, and runs its own inference. ONNX Runtime's ``Run`` is thread-safe and
releases the GIL, so two single-thread inferences use two cores without the spin-waiting of one
2-thread pool (TensorRT serialises its context behind a lock; CPU work around it still overlaps).
A camera is inspected by one worker at a time (:meth:`WorkQueue.get_batch` ``hold``), which keeps
its verdicts in order and its per-camera state (last verdict, counters) single-writer.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

#: How fast the per-image cost estimate follows a slower batch, and a faster one. Rising fast and
#: falling slowly keeps the estimate near the recent worst case: on a loaded box one batch can take
#: twice the last, and an estimate of the mean would let batches run past their deadlines.
COST_RISE, COST_FALL = 0.5, 0.05
#: Before the first batch is measured: a conservative per-image cost (the default bundle on one
#: ONNX Runtime thread takes ~15-20 ms an image on a loaded 2-core box).
FIRST_GUESS_PER_IMAGE_S = 0.025
#: ``engines.workers: auto`` never starts more workers than this per queue: the most measured
#: (BENCHMARKS.md, "Two inspection workers"); a larger box may set a number.
AUTO_WORKERS_MAX = 2


def worker_count(workers: int | str, threads: int, cpus: int | None = None) -> int:
    """Inspection workers per bundle queue for ``engines.workers`` (``auto`` or a number).

    ``auto``: one worker per ``threads`` ONNX Runtime threads that fit the cores, at least 1 and at
    most :data:`AUTO_WORKERS_MAX` (on 2 cores with ``threads: 1``: 2). ``threads: 0`` (a pool on
    every core) gets one worker: a second would only fight the first pool for the same cores.
    """
    if workers != "auto":
        return max(1, int(workers))
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    if threads <= 0:
        return 1
    return max(1, min(AUTO_WORKERS_MAX, cores // threads))


@dataclass(frozen=True)
class BatchPolicy:
    """The bounds of one worker's batches (from the ``engines`` section)."""

    max_batch: int = 1
    max_wait_s: float = 0.0
    workers: int = 1  # inspection workers sharing the queue

    @classmethod
    def from_engines(cls, engines: object) -> BatchPolicy:
        """The policy of an :class:`~anomalygpt_edge.runtime.line.config.EnginesConfig`."""
        max_batch = int(getattr(engines, "max_batch", 1))
        max_wait_ms = float(getattr(engines, "max_wait_ms", 0.0))
        workers = worker_count(getattr(engines, "workers", 1), int(getattr(engines, "threads", 1)))
        return cls(max(1, max_batch), max(0.0, max_wait_ms) / 1e3, workers)


class BatchCost:
    """Expected seconds to inspect (and answer) a batch of ``n``: ``n`` times a per-image cost.

    Measured from the batches the worker ran. Linear in ``n`` because a batch never costs more per
    image than single images, so the estimate errs on the slow side, which is the safe side for a
    deadline; the per-image figure rises fast and falls slowly (:data:`COST_RISE`, :data:`COST_FALL`).
    """

    def __init__(self, first_guess_per_image_s: float = FIRST_GUESS_PER_IMAGE_S):
        self.per_image_s = first_guess_per_image_s
        self._lock = threading.Lock()

    def observe(self, n: int, seconds: float) -> None:
        """Record that a batch of ``n`` images took ``seconds``."""
        if n <= 0 or seconds < 0:
            return
        with self._lock:
            new, old = seconds / n, self.per_image_s
            self.per_image_s = old + (COST_RISE if new > old else COST_FALL) * (new - old)

    def predict(self, n: int) -> float:
        """Expected seconds for a batch of ``n``."""
        with self._lock:
            return max(0, n) * self.per_image_s
