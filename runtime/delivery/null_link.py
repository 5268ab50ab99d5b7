"""A link that publishes nowhere: the line daemon without an MQTT broker (the standalone station).

:class:`NullLink` has every method and attribute the daemon uses on
:class:`~anomalygpt_edge.runtime.delivery.mqtt_link.MqttLink`: ``start``/``stop``, ``connected``,
``stats``, ``sender``, ``network_thread``, ``on_error``, ``topic``, ``publish``, ``publish_json``,
``publish_status``, ``publish_verdict``, ``publish_heatmap`` and ``reply``. Every publish succeeds
at once and goes nowhere, so the daemon runs exactly as on the line: verdicts still reach its
archive and its listeners (the station's history), a verdict's ``on_durable`` callback still runs
(with ``durable=False``: nothing was spooled), and no PLC is waiting for an answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: What the station's system page says about the broker of a standalone station.
NOTE = "no MQTT broker: standalone station"


class NullLink:
    """A stand-in for ``MqttLink`` that is always ``connected`` and sends nothing anywhere."""

    note = NOTE

    def __init__(self, device: str = "standalone", prefix: str = "anomalygpt"):
        self.device = device
        self.base = f"{prefix}/{device}"
        self.connected = threading.Event()
        # The same keys as MqttLink's, so status and metrics read alike; ``not_sent`` counts what
        # would have been published on a line.
        self.stats = {"published": 0, "acked": 0, "resent": 0, "commands": 0, "connects": 0, "not_sent": 0}
        self.on_error: Callable[[str], None] | None = None
        self.sender = None  # no spool sender: nothing waits for a broker's acknowledgement
        self._lock = threading.Lock()

    @property
    def network_thread(self) -> threading.Thread | None:
        """No network thread to watch."""
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> bool:
        """ "Connected" at once: there is nothing to connect to, and nothing to wait for."""
        with self._lock:
            self.stats["connects"] += 1
        self.connected.set()
        return True

    def stop(self, drain_s: float = 2.0) -> None:
        """Nothing to drain or disconnect."""
        self.connected.clear()

    # -- publishing (nowhere) --------------------------------------------------------------------
    def topic(self, *parts: str) -> str:
        """The topic a line would use, for messages and logs that name it."""
        return "/".join((self.base, *parts))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, properties: Any = None) -> int:
        """Count and drop; returns a message id of 0 like an immediate QoS 0 publish."""
        with self._lock:
            self.stats["not_sent"] += 1
        return 0

    def publish_json(self, topic: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> int:
        """As :meth:`publish` (the body is not even encoded)."""
        return self.publish(topic, b"", qos, retain)

    def publish_status(self) -> None:
        """The retained status has no broker to go to."""
        self.publish(self.topic("status"), b"", 1, True)

    def publish_verdict(
        self, verdict_id: str, topic: str, payload: bytes, on_durable: Callable[[bool], None] | None = None
    ) -> None:
        """Drop the verdict and run ``on_durable(False)`` at once, as MqttLink does without a spool."""
        try:
            self.publish(topic, payload, 1)
        finally:
            if on_durable is not None:
                on_durable(False)

    def publish_heatmap(self, camera: str, verdict_id: str, jpeg: bytes) -> int:
        """Drop the overlay (the station's history keeps its own)."""
        return self.publish(self.topic(camera, "heatmap"), jpeg)

    def reply(self, cmd: Any, body: dict[str, Any]) -> None:
        """No command arrives without a broker; a reply (if the daemon makes one) is dropped."""
        self.publish(self.topic("reply", getattr(cmd, "name", "command")), b"", 1)
