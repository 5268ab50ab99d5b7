"""What the line daemon needs of its link to the PLC: the :class:`Link` protocol.

``runtime/delivery/mqtt_link.py``'s ``MqttLink`` is the link on the line; a link that publishes
nowhere (the standalone station's) implements the same members. The daemon calls only these:

* ``start(wait_s) -> bool`` and ``stop()``: connect (True once connected within ``wait_s``) / disconnect;
* ``connected``: a ``threading.Event``, set while status documents can be published;
* ``topic(*parts) -> str``: ``<prefix>/<device>/<parts...>``;
* ``publish_json(topic, body, qos=1, retain=False)``: status, heartbeat and explanations;
* ``publish_verdict(verdict_id, topic, payload, on_durable)``: a verdict; ``on_durable(durable)``
  must be called once (it sends the PLC's reply);
* ``publish_heatmap(camera, verdict_id, jpeg)``: an NG overlay;
* ``reply(command, body)``: the answer to a command;
* ``on_error``: an attribute the daemon sets to its error reporter (``None`` until then);
* ``stats``: a dict of counters; ``sender``: the verdict sender (``None`` when there is none);
  ``network_thread``: the thread to watch for liveness (``None`` when there is none).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.delivery.mqtt_link import Command


class Link(Protocol):
    """The members of a link the daemon uses (see the module docstring)."""

    connected: threading.Event
    on_error: Callable[[str], None] | None
    sender: Any

    @property
    def stats(self) -> dict[str, int]: ...

    @property
    def network_thread(self) -> threading.Thread | None: ...

    def start(self, wait_s: float = 10.0) -> bool: ...

    def stop(self) -> None: ...

    def topic(self, *parts: str) -> str: ...

    def publish_json(self, topic: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> int: ...

    def publish_verdict(
        self, verdict_id: str, topic: str, payload: bytes, on_durable: Callable[[bool], None] | None = None
    ) -> None: ...

    def publish_heatmap(self, camera: str, verdict_id: str, jpeg: bytes) -> int: ...

    def reply(self, cmd: Command, body: dict[str, Any]) -> None: ...
