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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

#: How much a new measurement moves the cost estimate (an exponential moving average).
COST_SMOOTHING = 0.2
#: Before the first batch is measured: a conservative per-image cost (the default bundle on one
#: ONNX Runtime thread takes ~15-20 ms an image on a loaded 2-core box).
FIRST_GUESS_PER_IMAGE_S = 0.025


@dataclass(frozen=True)
class BatchPolicy:
    """The bounds of one worker's batches (from the ``engines`` section)."""

    max_batch: int = 1
    max_wait_s: float = 0.0

    @classmethod
    def from_engines(cls, engines: object) -> BatchPolicy:
        """The policy of an :class:`~anomalygpt_edge.runtime.line.config.EnginesConfig`."""
        max_batch = int(getattr(engines, "max_batch", 1))
        max_wait_ms = float(getattr(engines, "max_wait_ms", 0.0))
        return cls(max(1, max_batch), max(0.0, max_wait_ms) / 1e3)


class BatchCost:
    """Measured seconds to inspect a batch of ``n``: a fixed part plus a part per image.

    Fitted from the batches the worker ran (moving averages of the time per image at each size),
    so the queue can tell whether one more frame still fits before a part's deadline.
    """

    def __init__(self, first_guess_per_image_s: float = FIRST_GUESS_PER_IMAGE_S):
        self._per_size: dict[int, float] = {}
        self._guess = first_guess_per_image_s
        self._lock = threading.Lock()

    def observe(self, n: int, seconds: float) -> None:
        """Record that a batch of ``n`` images took ``seconds``."""
        if n <= 0 or seconds < 0:
            return
        with self._lock:
            old = self._per_size.get(n)
            self._per_size[n] = seconds if old is None else old + COST_SMOOTHING * (seconds - old)

    def predict(self, n: int) -> float:
        """Expected seconds for a batch of ``n``: measured if that size ran, else scaled from the nearest."""
        if n <= 0:
            return 0.0
        with self._lock:
            if n in self._per_size:
                return self._per_size[n]
            if not self._per_size:
                return n * self._guess
            # Batches cost less per image than single images: scaling the nearest size linearly
            # from below over-estimates, which is the safe side for a deadline.
            nearest = min(self._per_size, key=lambda k: (abs(k - n), -k))
            return self._per_size[nearest] * max(1.0, n / nearest)
