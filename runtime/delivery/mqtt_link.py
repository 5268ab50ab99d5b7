"""The daemon's MQTT connection (paho-mqtt 2.x): status and Last Will, commands in, verdicts out.

* On every (re)connect: subscribe to ``<prefix>/<device>/cmd/+`` and publish the retained
  ``online`` status; the Last Will publishes a retained ``offline`` status if the link dies.
* Verdicts go out with QoS 1 through :meth:`MqttLink.publish_verdict`: when a
  :class:`~anomalygpt_edge.runtime.delivery.spool.VerdictSpool` is attached, each verdict is committed to it
  and published by the :class:`~anomalygpt_edge.runtime.delivery.sender.VerdictSender` thread in
  capture order; the broker's PUBACK removes it, and after a reconnect whatever is still spooled
  is sent again (marked ``redelivered``).
* Commands arrive on paho's network thread and are handed to ``on_command`` at once; handlers must
  not block (the daemon queues slow ones on its own thread).
* Replies go to the request's MQTT 5 Response Topic with its Correlation Data echoed, else to
  ``<prefix>/<device>/reply/<command>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from anomalygpt_edge.runtime.delivery.callbacks import guard_callback
from anomalygpt_edge.runtime.delivery.mqtt_config import MqttConfig
from anomalygpt_edge.runtime.delivery.sender import VerdictSender
from anomalygpt_edge.runtime.delivery.spool import VerdictSpool

log = logging.getLogger(__name__)
COMMANDS = ("trigger", "enroll", "recipe", "ask", "label")


@dataclass
class Command:
    """One command message as received."""

    name: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    received_at: float  # epoch seconds
    received_mono: float
    user_properties: list[tuple[str, str]] | None = None  # MQTT 5: client_id / token for the command gate
    sender: str | None = None  # the client id the command gate accepted it from (a label's author)

    @property
    def correlation_text(self) -> str | None:
        """Correlation Data for JSON replies: UTF-8 text when it is text, else hex."""
        if self.correlation_data is None:
            return None
        try:
            return self.correlation_data.decode()
        except UnicodeDecodeError:
            return self.correlation_data.hex()


class MqttLink:
    """One paho client for the daemon; thread-safe publishing."""

    def __init__(
        self,
        config: MqttConfig,
        device: str,
        on_command: Callable[[Command], None],
        status: Callable[[], dict[str, Any]],
        spool: VerdictSpool | None = None,
    ):
        self.config = config
        self.device = device
        self.base = f"{config.prefix}/{device}"
        self.on_command = on_command
        self.status = status
        self.spool = spool
        self.v5 = config.protocol == "5"
        self.connected = threading.Event()
        self._counts = {"published": 0, "acked": 0, "resent": 0, "commands": 0, "connects": 0}
        self._lock = threading.Lock()  # stats only; never held while calling into paho
        client_id = config.client_id or f"anomalygpt-edge-{device}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            # 3.1.1: a persistent session would replay commands queued while we were away; a PLC
            # that got no answer has already failed safe, so stale triggers must not run later.
            clean_session=None if self.v5 else True,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        # A burst answers hundreds of parts at once (verdict + reply, both QoS 1): a small in-flight
        # window would queue replies behind PUBACKs of other verdicts (mosquitto acks at once).
        self.client.max_inflight_messages_set(1000)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            t = config.tls
            self.client.tls_set(
                ca_certs=str(t.ca) if t.ca else None,
                certfile=str(t.cert) if t.cert else None,
                keyfile=str(t.key) if t.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self.client.tls_insecure_set(not t.check_hostname)
        self.client.will_set(self.topic("status"), self._offline_payload(), qos=1, retain=True)
        # Every callback runs on paho's network thread: an exception escaping one would end that
        # thread (and with it every publish and PUBACK), so each is wrapped by _guard.
        self.client.on_connect = self._guard(self._on_connect)
        self.client.on_disconnect = self._guard(self._on_disconnect)
        self.client.on_message = self._guard(self._on_message)
        self.client.on_publish = self._guard(self._on_publish)
        self.client.on_subscribe = self._guard(self._on_subscribe)
        #: Called with a message for every error on the link's threads (the daemon's health).
        self.on_error: Callable[[str], None] | None = None
        self.sender = (
            VerdictSender(self.client, spool, config.qos, on_error=self._report)
            if spool is not None and config.qos > 0
            else None
        )

    @property
    def stats(self) -> dict[str, int]:
        """The link's counters. ``published`` and ``acked`` count the same messages: every one
        handed to paho on this client, the link's own (status, replies, heatmaps) and the verdict
        sender's, which publishes on the same client (paho's ``on_publish`` counts ``acked`` for
        all of them; counting only the link's own showed "published 13, acked 252")."""
        out = dict(self._counts)
        if self.sender is not None:
            out["published"] += self.sender.stats["published"]
        return out

    def topic(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def _report(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error(message)

    def _guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` with a last-resort handler: logged and reported, never raised into paho."""
        return guard_callback(callback, "MQTT", self._report)

    @property
    def network_thread(self) -> threading.Thread | None:
        """paho's network thread (for liveness checks); None before :meth:`start`."""
        return getattr(self.client, "_thread", None)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> bool:
        """Connect in the background (reconnecting forever); True if connected within ``wait_s``."""
        if self.sender is not None:
            self.sender.start()
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self.client.loop_start()
        return self.connected.wait(wait_s)

    def stop(self, drain_s: float = 2.0) -> None:
        """Let spooled verdicts reach the broker (up to ``drain_s``), publish the retained ``offline``
        status ourselves (a clean exit sends no Will) and disconnect. What is not acknowledged stays
        in the spool for the next start."""
        if self.sender is not None:
            end = time.monotonic() + drain_s
            while self.connected.is_set() and not self.sender.idle() and time.monotonic() < end:
                time.sleep(0.02)
            self.sender.stop()
        if self.connected.is_set():
            info = self.client.publish(self.topic("status"), self._offline_payload(), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def _offline_payload(self) -> bytes:
        from anomalygpt_edge.runtime.delivery.messages import STATUS_SCHEMA

        return json.dumps({"schema": STATUS_SCHEMA, "state": "offline", "device": self.device}).encode()

    # -- paho callbacks (network thread) ---------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connect to %s:%s refused: %s", self.config.host, self.config.port, reason)
            return
        self._counts["connects"] += 1
        if self.sender is not None:
            self.sender.on_connect()  # drops paho's own resend queue: the spool is the only resend source
        log.info("MQTT connected to %s:%s (%s)", self.config.host, self.config.port, "v5" if self.v5 else "v3.1.1")
        client.subscribe(self.topic("cmd", "+"), qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        # Online only once the broker confirmed the command subscription: a PLC that sees the
        # retained "online" status may send a trigger at once, and it must not be lost.
        self.publish_status()
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if self.sender is not None:
            self.sender.on_disconnect()  # unacknowledged verdicts stay in the spool, resent on reconnect
        if reason.is_failure:
            log.warning("MQTT connection lost: %s; reconnecting", reason)
        else:
            log.info("MQTT disconnected")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # paho holds its message lock here: take no lock that is held around a publish elsewhere.
        self._counts["acked"] += 1
        if self.sender is not None:
            self.sender.on_publish(mid, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        name = msg.topic.rsplit("/", 1)[-1]
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        users = getattr(props, "UserProperty", None) if props is not None else None
        cmd = Command(name, bytes(msg.payload), response or None, corr, time.time(), time.monotonic(), users)
        self._counts["commands"] += 1
        try:
            self.on_command(cmd)
        except Exception:  # a bad command must never take the network thread down
            log.exception("command %s failed", name)

    # -- publishing ------------------------------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, properties: Properties | None = None
    ) -> int:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        with self._lock:
            self._counts["published"] += 1
        return info.mid

    def publish_json(self, topic: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> int:
        return self.publish(topic, json.dumps(body, separators=(",", ":")).encode(), qos, retain)

    def publish_status(self) -> None:
        self.publish_json(self.topic("status"), self.status(), qos=1, retain=True)

    def publish_verdict(
        self, verdict_id: str, topic: str, payload: bytes, on_durable: Callable[[bool], None] | None = None
    ) -> None:
        """QoS 1 verdict: queued for the sender thread, which commits it to the spool with the others
        queued meanwhile (one fsync per batch), calls ``on_durable(durable)`` (the PLC's reply) and
        publishes it. Without a spool (or at QoS 0) it is published at once and ``on_durable(False)``
        follows. Never blocks on the disk."""
        if self.sender is None:
            try:
                self.publish(topic, payload, self.config.qos)
            finally:
                if on_durable is not None:
                    on_durable(False)
            return
        self.sender.submit(verdict_id, topic, payload, on_durable)

    def publish_heatmap(self, camera: str, verdict_id: str, jpeg: bytes) -> int:
        """JPEG overlay on ``<camera>/heatmap``; MQTT 5 links it to its verdict with a user property."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "image/jpeg"
            props.UserProperty = [("verdict_id", verdict_id)]
        return self.publish(self.topic(camera, "heatmap"), jpeg, qos=0, properties=props)

    def reply(self, cmd: Command, body: dict[str, Any]) -> None:
        """Answer a command on its response topic (correlation data echoed) or the reply topic."""
        topic = cmd.response_topic if (self.v5 and cmd.response_topic) else self.topic("reply", cmd.name)
        props = None
        if self.v5 and cmd.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = cmd.correlation_data
        self.publish(topic, json.dumps(body, separators=(",", ":")).encode(), qos=1, properties=props)
