"""``cmd/ask`` bookkeeping: which MQTT command awaits which explanation.

An ask is keyed by its request's own key (``ask-<n>:<correlation>``, unique for the daemon's
life), never by ``id(request)``: CPython reuses the id of a request the explanation worker dropped,
so a later explanation would have answered the stale ask. The camera travels with the request
(:class:`LineExplainRequest`), not parsed back out of the key.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from anomalygpt_edge.runtime.delivery.mqtt_link import Command
from anomalygpt_edge.runtime.explain.explainer import ExplainRequest
from anomalygpt_edge.runtime.inspection.verdict import Verdict

#: An ask still unanswered this long after the worker's own age limit gets a "dropped" reply.
ASK_GRACE_S = 60.0


@dataclass
class LineExplainRequest(ExplainRequest):
    """An explanation request that names the camera whose verdict it explains."""

    camera: str = ""


@dataclass
class PendingAsk:
    """An ask awaiting its explanation."""

    command: Command
    camera: str
    started_mono: float


class AskBook:
    """Open asks by request key; thread-safe (the commands thread adds, the explanation worker takes)."""

    def __init__(self) -> None:
        self._pending: dict[str, PendingAsk] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def open(self, cmd: Command, camera: str, verdict_id: str, verdict: Verdict, question: str) -> LineExplainRequest:
        """Record an ask about ``camera``'s verdict ``verdict_id``; the request to submit."""
        key = f"ask-{next(self._ids)}:{cmd.correlation_text or verdict_id}"
        request = LineExplainRequest(verdict, question, key=key, verdict_id=verdict_id, camera=camera)
        with self._lock:
            self._pending[key] = PendingAsk(cmd, camera, time.monotonic())
        return request

    def take(self, request: ExplainRequest) -> PendingAsk | None:
        """The ask ``request`` answers (removed from the book), or None for a verdict's own explanation."""
        with self._lock:
            return self._pending.pop(request.key, None)

    def expire(self, max_age_s: float) -> list[PendingAsk]:
        """Remove and return the asks older than ``max_age_s`` + :data:`ASK_GRACE_S` (dropped by the worker)."""
        now = time.monotonic()
        with self._lock:
            stale = [k for k, a in self._pending.items() if now - a.started_mono > max_age_s + ASK_GRACE_S]
            return [self._pending.pop(k) for k in stale]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
