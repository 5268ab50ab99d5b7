"""The daemon as a Sparkplug B 3.0 Edge Node: one Device per camera, on its own paho 2 connection.

* Topics ``spBv1.0/<group>/NBIRTH|NDATA|NDEATH|NCMD/<node>`` and ``.../DBIRTH|DDATA|DDEATH|DCMD/<node>/<camera>``.
* The NDEATH is this connection's MQTT Will, carrying the ``bdSeq`` of the NBIRTH sent on the same
  connection; after a lost connection bdSeq is incremented (0-255) and the Will set anew before
  paho reconnects, and the BIRTHs are rebuilt (NBIRTH seq 0, then every DBIRTH with current values).
* ``seq`` (0-255, wrapping) is stamped on each payload right before it is handed to paho, under one
  lock, so the wire order is the seq order even with the verdict sender publishing on its thread.
* Verdict DDATA goes through a :class:`VerdictSpool` and :class:`VerdictSender` of its own (the
  same code as the JSON verdicts): the spooled row is the metric values as JSON and becomes a DDATA
  (pysparkplug) at publish time with the seq of that moment, so a resend after a reconnect follows
  the new BIRTH and is flagged with ``Inspection/Redelivered``.
* NCMD ``Node Control/Rebirth`` republishes every BIRTH; DCMD ``Trigger`` (a string: the part id)
  triggers the camera and its verdict is answered in DDATA.
* bdSeq is kept across restarts in a small file (``state_path``, see ``sparkplug_session.py``).
* With ``sparkplug.primary_host`` the node subscribes to ``spBv1.0/STATE/<host>`` with its commands,
  before any BIRTH, and births only once that STATE says online; an offline STATE (not older than
  the last one) ends the session: NDEATH, DISCONNECT, a new CONNECT (next bdSeq), waiting again.
  Verdict DDATA stays in the spool while the node waits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pysparkplug import DCmd, MessageType, NCmd, Topic

from anomalygpt_edge.runtime.delivery import sparkplug_metrics as spm
from anomalygpt_edge.runtime.delivery.callbacks import guard_callback
from anomalygpt_edge.runtime.delivery.mqtt_config import MqttConfig
from anomalygpt_edge.runtime.delivery.sender import VerdictSender
from anomalygpt_edge.runtime.delivery.sparkplug_config import SparkplugConfig
from anomalygpt_edge.runtime.delivery.sparkplug_session import BdSeqFile, PrimaryHost
from anomalygpt_edge.runtime.delivery.spool import SpoolError, VerdictSpool

log = logging.getLogger(__name__)
#: What the node reads of the daemon: (node metric values, camera -> slow-changing metric values).
Facts = Callable[[], tuple[dict[str, Any], dict[str, dict[str, Any]]]]
TriggerHandler = Callable[[str, str | None], None]


def _client(config: MqttConfig, client_id: str) -> mqtt.Client:
    """A paho 2 client for the node: MQTT 3.1.1 with a clean session (Sparkplug 3.0 asks for one)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_inflight_messages_set(1000)  # a burst of verdict DDATA must not queue behind PUBACKs
    if config.username:
        client.username_pw_set(config.username, config.password)
    if config.tls is not None:
        t = config.tls
        client.tls_set(
            ca_certs=str(t.ca) if t.ca else None,
            certfile=str(t.cert) if t.cert else None,
            keyfile=str(t.key) if t.key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(not t.check_hostname)
    return client


class _SeqPublisher:
    """What the verdict sender sees as its client: spooled rows become DDATA stamped with the next seq."""

    def __init__(self, node: SparkplugNode):
        self.node = node

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Any:
        row = json.loads(payload)
        values = dict(row["values"])
        if row.get("redelivered"):
            values[spm.REDELIVERED] = True
        return self.node.publish_data(row["camera"], values, qos, metric_ts=row.get("ts"))

    def drop_out_messages(self) -> list[Any]:
        return self.node.client.drop_out_messages()


class SparkplugNode:
    """The Edge Node: BIRTH/DEATH lifecycle, seq and bdSeq, commands, and verdict DDATA."""

    def __init__(
        self,
        config: SparkplugConfig,
        mqtt_config: MqttConfig,
        device: str,
        cameras: Sequence[str],
        facts: Facts,
        on_trigger: TriggerHandler,
        spool: VerdictSpool | None = None,
        *,
        own_spool: bool = False,
        state_path: Path | None = None,
    ):
        self.config, self.mqtt = config, mqtt_config
        self._own_spool = own_spool  # close the spool on stop (the daemon's wiring opened it for the node)
        self.group, self.node = config.group, config.node or device
        self.cameras = list(cameras)
        self.index = {camera: i for i, camera in enumerate(self.cameras)}
        self.facts, self.on_trigger = facts, on_trigger
        self.connected = threading.Event()  # set while born (BIRTHs sent in the current session)
        self._settled = threading.Event()  # born, or the primary host's STATE says wait: start() returns
        self._bd_seq_file = BdSeqFile(state_path)
        self.bd_seq = self._bd_seq_file.first()
        self.host = PrimaryHost(config.primary_host) if config.primary_host else None
        self._in_session = False  # an MQTT session is up (born or, with a primary host, waiting)
        self._stopping = False  # stop() began: no new session, no bdSeq step for its DISCONNECT
        self._rejoining = False  # between a DISCONNECT for an offline host and the new network thread
        self._session_lock = threading.Lock()  # stop() against the rejoin after an offline host
        self.stats = {
            "births": 0,
            "rebirths": 0,
            "data": 0,
            "triggers": 0,
            "commands_refused": 0,
            "host_offline": 0,  # sessions ended because the primary host went offline
            "states_ignored": 0,  # stale or unreadable STATE messages
        }
        self.on_error: Callable[[str], None] | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()  # held around stamping a seq and handing the payload to paho
        self._values: dict[str, dict[str, Any]] = {c: {} for c in self.cameras}  # what the next DBIRTH says
        self._counts: dict[str, dict[str, int]] = {c: {"OK": 0, "NG": 0, "ERROR": 0} for c in self.cameras}
        self._node_values: dict[str, Any] = {}
        self._births: dict[str | None, Any] = {}  # None -> the NBIRTH, camera -> its DBIRTH (decoding commands)
        self.client = _client(mqtt_config, config.client_id or f"anomalygpt-edge-{device}-spb")
        self._set_will()
        self.client.on_connect = self._guard(self._on_connect)
        self.client.on_disconnect = self._guard(self._on_disconnect)
        self.client.on_message = self._guard(self._on_message)
        self.client.on_publish = self._guard(self._on_publish)
        use_spool = spool is not None and config.data_qos > 0 and config.spool
        self.sender = VerdictSender(_SeqPublisher(self), spool, 1, self._report) if use_spool and spool else None

    # -- topics ------------------------------------------------------------------------------------
    def topic(self, kind: MessageType, camera: str | None = None) -> str:
        """``spBv1.0/<group>/<kind>/<node>[/<camera>]``."""
        return str(Topic(group_id=self.group, message_type=kind, edge_node_id=self.node, device_id=camera))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> bool:
        """Connect in the background (reconnecting forever); True once born within ``wait_s``.

        Returns early (False) once the primary host's (retained) STATE says to wait: a SCADA that is
        down must not hold up the daemon's start; the BIRTHs follow when the host comes online.
        """
        self._keep_bd_seq()  # before the CONNECT whose Will carries it
        if self.sender is not None:
            self.sender.start()
        self.client.connect_async(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive)
        self.client.loop_start()
        self._settled.wait(wait_s)
        return self.connected.is_set()

    def stop(self) -> None:
        """A clean end: DDEATH per camera and the NDEATH ourselves (a clean disconnect sends no Will)."""
        with self._session_lock:  # a rejoin under way finishes first; none starts after this
            self._stopping = True
        if self.sender is not None:
            self.sender.stop()
            if self._own_spool:
                self.sender.spool.close()
        if self.connected.is_set():
            infos = []
            with self._seq_lock:
                for camera in self.cameras:
                    death = spm.device_death(self._next_seq(), spm.now_ms())
                    infos.append(self.client.publish(self.topic(MessageType.DDEATH, camera), death.encode(), 0))
                ndeath = spm.node_death(self.bd_seq).encode()
                infos.append(self.client.publish(self.topic(MessageType.NDEATH), ndeath, 1))
            with contextlib.suppress(RuntimeError, ValueError):
                infos[-1].wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def _set_will(self) -> None:
        self.client.will_set(self.topic(MessageType.NDEATH), spm.node_death(self.bd_seq).encode(), qos=1, retain=False)

    def _keep_bd_seq(self) -> None:
        """Write the bdSeq of the next CONNECT to the state file (a failure is reported, never raised)."""
        problem = self._bd_seq_file.save(self.bd_seq)
        if problem:
            self._report(problem)

    def _next_seq(self) -> int:
        """The seq for the next payload (call with ``_seq_lock`` held)."""
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    # -- births ------------------------------------------------------------------------------------
    def _refresh_facts(self) -> None:
        """Current node and camera metrics from the daemon (a broken source must not stop the births)."""
        try:
            node, cameras = self.facts()
        except Exception as exc:
            self._report(f"sparkplug: reading the daemon's figures failed: {exc!r}")
            return
        self._node_values.update(node)
        for camera, values in cameras.items():
            if camera in self._values:
                self._values[camera].update(values)

    def birth(self) -> None:
        """NBIRTH (seq 0) then one DBIRTH per camera, every metric with its current value."""
        self._refresh_facts()
        ts = spm.now_ms()
        with self._seq_lock:
            self._seq = 0
            nbirth = spm.node_birth(self.bd_seq, self._node_values, ts)
            self._births[None] = nbirth
            self._next_seq()
            self.client.publish(self.topic(MessageType.NBIRTH), nbirth.encode(), 0)
            for camera in self.cameras:
                dbirth = spm.device_birth(self.index[camera], self._values[camera], self._next_seq(), ts)
                self._births[camera] = dbirth
                self.client.publish(self.topic(MessageType.DBIRTH, camera), dbirth.encode(), 0)
        self.stats["births"] += 1

    # -- paho callbacks (network thread) -----------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("Sparkplug connect to %s:%s refused: %s", self.mqtt.host, self.mqtt.port, reason)
            return
        # Subscribed before the NBIRTH (spec 3.0): a host may send NCMD/DCMD the moment it sees it,
        # and the Primary Host's STATE (retained) decides whether there is to be an NBIRTH at all.
        topics = [(self.topic(MessageType.NCMD), 1), (self.topic(MessageType.DCMD, "+"), 1)]
        self._in_session = True
        if self.host is None:
            client.subscribe(topics)
            self._go_live()
            return
        self.host.new_session()
        # paho would resend the last session's unacknowledged QoS 1 messages (DDATA, the NDEATH
        # sent for an offline host) right after this CONNACK, before any BIRTH; the spool resends
        # the verdicts once born.
        client.drop_out_messages()
        client.subscribe([*topics, (self.host.topic, 1)])
        log.info("Sparkplug edge node %s/%s waiting for primary host %s", self.group, self.node, self.host.host_id)

    def _go_live(self) -> None:
        """Every BIRTH, then the sender's backlog (verdicts spooled while away) after them in seq order."""
        self.birth()
        if self.sender is not None:
            self.sender.on_connect()
        self.connected.set()
        self._settled.set()
        log.info("Sparkplug edge node %s/%s born (bdSeq %d)", self.group, self.node, self.bd_seq)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self._in_session = False
        if self.sender is not None:
            self.sender.on_disconnect()
        if not self._stopping:
            # The next CONNECT carries the next bdSeq in its Will; its NBIRTH will say the same.
            self.bd_seq = (self.bd_seq + 1) % 256
            self._set_will()
            self._keep_bd_seq()
        if self._rejoining:
            # Ended for an offline primary host: paho's loop returns after a DISCONNECT we asked for,
            # so a thread of its own connects again (this one cannot join itself).
            threading.Thread(target=self._rejoin, name="sparkplug-rejoin", daemon=True).start()
        elif reason.is_failure:
            log.warning("Sparkplug connection lost: %s; reconnecting", reason)

    def _rejoin(self) -> None:
        """A new session after an offline primary host: the old network thread ends, a new one connects."""
        with self._session_lock:
            try:
                if not self._stopping:
                    self.client.loop_stop()
                    self.client.connect_async(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive)
                    self.client.loop_start()
            except Exception as exc:  # off paho's thread: nothing else would say so
                log.exception("Sparkplug: the new session after an offline primary host failed")
                self._report(f"sparkplug: new session after an offline primary host failed: {exc!r}")
            finally:
                self._rejoining = False  # the network thread is watched again (a dead one is then reported)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if self.sender is not None:
            self.sender.on_publish(mid, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.host is not None and msg.topic == self.host.topic:
            self._host_state(bytes(msg.payload))
            return
        topic = Topic.from_str(msg.topic)
        if topic.message_type == MessageType.NCMD:
            self._node_command(bytes(msg.payload))
        elif topic.message_type == MessageType.DCMD and topic.device_id in self.index:
            self._device_command(str(topic.device_id), bytes(msg.payload))

    def _host_state(self, raw: bytes) -> None:
        """The primary host's STATE: online -> BIRTHs (when waiting); offline -> end the session."""
        if self.host is None:
            return
        change = self.host.update(raw)
        if change in ("stale", "invalid"):
            self.stats["states_ignored"] += 1
            log.info("Sparkplug: %s STATE of primary host %s ignored: %r", change, self.host.host_id, raw[:200])
        elif change == "online" and not self.connected.is_set():
            self._go_live()
        elif change == "offline" and self.connected.is_set():
            self._leave_for_host()
        self._settled.set()  # whatever it said, start() need not wait any longer

    def _leave_for_host(self) -> None:
        """Spec 3.0: the primary host went offline: NDEATH, DISCONNECT and a new session (on paho's thread)."""
        log.warning("Sparkplug primary host %s went offline: NDEATH and a new session", self.config.primary_host)
        self.stats["host_offline"] += 1
        self.connected.clear()
        if self.sender is not None:
            self.sender.on_disconnect()  # verdicts stay in the spool until the next BIRTHs
        self._rejoining = True
        with self._seq_lock:  # after any DDATA already handed to paho: the NDEATH is the session's last word
            self.client.publish(self.topic(MessageType.NDEATH), spm.node_death(self.bd_seq).encode(), 1)
        self.client.disconnect()

    def _node_command(self, raw: bytes) -> None:
        """NCMD: ``Node Control/Rebirth`` true republishes every BIRTH (once born: not while waiting for the host)."""
        if not self.connected.is_set():
            return
        for metric in NCmd.decode(raw, birth=self._births.get(None)).metrics:
            if metric.name == spm.REBIRTH and metric.value:
                self.stats["rebirths"] += 1
                self.birth()

    def _device_command(self, camera: str, raw: bytes) -> None:
        """DCMD: ``Trigger`` (the part id as a string, empty for none) triggers the camera."""
        for metric in DCmd.decode(raw, birth=self._births.get(camera)).metrics:
            if metric.name != spm.TRIGGER:
                self.stats["commands_refused"] += 1
                continue
            self.stats["triggers"] += 1
            part = str(metric.value) if metric.value else None
            self.on_trigger(camera, part)

    # -- data --------------------------------------------------------------------------------------
    def publish_data(self, camera: str, values: Mapping[str, Any], qos: int = 0, metric_ts: int | None = None) -> Any:
        """DDATA of ``camera`` now, with the next seq; the values also go into its next DBIRTH."""
        self._values[camera].update({k: v for k, v in values.items() if k != spm.REDELIVERED})
        with self._seq_lock:
            payload = spm.device_data(self.index[camera], values, self._next_seq(), spm.now_ms(), metric_ts)
            info = self.client.publish(self.topic(MessageType.DDATA, camera), payload.encode(), qos)
        self.stats["data"] += 1
        return info

    def publish_verdict(self, camera: str, verdict_id: str, msg: Mapping[str, Any]) -> None:
        """A verdict as DDATA: spooled and sent by the sender (data_qos 1), else published at once (QoS 0)."""
        if camera not in self.index:
            return
        counts = self._counts[camera]
        verdict = str(msg.get("verdict"))
        if verdict in counts:
            counts[verdict] += 1
        values = spm.verdict_values(msg, counts)
        if self.sender is None:
            if self.connected.is_set():
                self.publish_data(camera, values, self.config.data_qos, metric_ts=values[spm.CAPTURED_AT])
            else:
                self._values[camera].update(values)  # the next DBIRTH carries it
            return
        row = {"camera": camera, "ts": values[spm.CAPTURED_AT], "values": values}
        self.sender.submit(verdict_id, self.topic(MessageType.DDATA, camera), json.dumps(row).encode())

    def refresh(self) -> None:
        """NDATA / DDATA (QoS 0) for the node and camera metrics that changed since last said."""
        if not self.connected.is_set():
            return
        old_node = dict(self._node_values)
        old = {c: dict(v) for c, v in self._values.items()}
        self._refresh_facts()
        changed = {k: v for k, v in self._node_values.items() if old_node.get(k) != v}
        if changed:
            with self._seq_lock:
                payload = spm.node_data(changed, self._next_seq(), spm.now_ms())
                self.client.publish(self.topic(MessageType.NDATA), payload.encode(), 0)
        for camera, values in self._values.items():
            diff = {k: v for k, v in values.items() if old[camera].get(k) != v}
            if diff:
                self.publish_data(camera, diff, 0)

    # -- health ------------------------------------------------------------------------------------
    @property
    def network_thread(self) -> threading.Thread | None:
        """paho's network thread of the node's connection (for liveness checks); None before :meth:`start`
        and while a new session replaces the one an offline primary host ended (its thread ends on purpose)."""
        if self._rejoining:
            return None
        return getattr(self.client, "_thread", None)

    def session(self) -> str:
        """The session in words: ``born``, ``waiting for primary host <id>`` or ``connecting``."""
        if self.connected.is_set():
            return "born"
        if self.host is not None and (self._in_session or self._rejoining):
            return f"waiting for primary host {self.host.host_id}"
        return "connecting"

    def status(self) -> dict[str, Any]:
        """For the status document and the heartbeat: connection, session, bdSeq, counters, the DDATA spool."""
        out: dict[str, Any] = {
            "connected": self.connected.is_set(),
            "session": self.session(),
            "group": self.group,
            "node": self.node,
            "primary_host": self.host.host_id if self.host is not None else None,
            "bd_seq": self.bd_seq,
            **self.stats,
        }
        if self.sender is not None:
            with contextlib.suppress(SpoolError):
                out["spool_depth"] = self.sender.spool.depth()
            if self.sender.problem:
                out["problem"] = self.sender.problem
        return out

    # -- errors ------------------------------------------------------------------------------------
    def _report(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error(message)

    def _guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` never raises into paho (that would end its network thread)."""
        return guard_callback(callback, "Sparkplug", self._report)


__all__ = ["SparkplugNode"]
