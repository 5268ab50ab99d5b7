"""The Sparkplug B Edge Node against a real mosquitto, every message decoded by pysparkplug.

Births, data by alias, seq wrap, the NDEATH Will and bdSeq across a reconnect, rebirth on NCMD, a
DCMD trigger answered in DDATA, and verdict DDATA through the spool (resent after an outage). With a
Primary Host: no BIRTH before its STATE says online, a new session when it goes offline, stale STATE
ignored, spooled verdicts after the BIRTHs. bdSeq kept across restarts in its state file.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from daemon_fixtures import (  # noqa: F401  (fixtures used by name)
    RecordingClient,
    broker_fixture,
    line_fixture,
    write_config,
)
from pysparkplug import DataType, DBirth, DCmd, Message, MessageType, Metric, NBirth, NCmd, NDeath, State, Topic

from anomalygpt_edge.runtime.delivery import sparkplug_metrics as spm
from anomalygpt_edge.runtime.delivery.mqtt_config import MqttConfig
from anomalygpt_edge.runtime.delivery.sparkplug_config import SparkplugConfig
from anomalygpt_edge.runtime.delivery.sparkplug_node import SparkplugNode
from anomalygpt_edge.runtime.delivery.spool import VerdictSpool
from anomalygpt_edge.runtime.tools.local_broker import LocalBroker, start_mosquitto

GROUP, NODE = "Plant1", "line-spb"


class Host(RecordingClient[Message]):
    """A Sparkplug host stand-in: a separate paho client that decodes everything with pysparkplug."""

    def __init__(self, broker: LocalBroker):
        # Written on paho's thread only (record), before the message it decodes is kept.
        self.births: dict[tuple[str | None, str | None], Any] = {}
        self.state_topics: set[str] = set()  # retained STATE published, cleared on close
        super().__init__(broker, [f"spBv1.0/{GROUP}/#"], protocol=mqtt.MQTTv311)

    def record(self, msg: mqtt.MQTTMessage) -> Message | None:
        topic = Topic.from_str(msg.topic)
        key = (topic.edge_node_id, topic.device_id)
        if topic.message_type in (MessageType.NCMD, MessageType.DCMD):
            return None
        decoded = Message.from_mqtt_message(msg, birth=self.births.get(key))
        if isinstance(decoded.payload, NBirth | DBirth):
            self.births[key] = decoded.payload
        return decoded

    def topic_of(self, kept: Message) -> str:
        return str(kept.topic)

    def command(self, kind: MessageType, metrics: tuple[Metric, ...], device: str | None = None) -> None:
        payload = (NCmd if kind == MessageType.NCMD else DCmd)(timestamp=spm.now_ms(), metrics=metrics)
        topic = Topic(group_id=GROUP, message_type=kind, edge_node_id=NODE, device_id=device)
        self.client.publish(str(topic), payload.encode(), qos=1).wait_for_publish(5)

    def state(self, host_id: str, online: bool, timestamp: int) -> None:
        """The Primary Host Application's STATE as Sparkplug 3.0 has it: JSON, QoS 1, retained."""
        topic = str(Topic(message_type=MessageType.STATE, sparkplug_host_id=host_id))
        self.state_topics.add(topic)
        payload = State(timestamp=timestamp, online=online).encode()
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        for topic in self.state_topics:  # no retained STATE left for the next test's node
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        super().close()


def of(kind: MessageType, device: str | None = None) -> Callable[[Message], bool]:
    return lambda m: m.topic.message_type == kind and (device is None or m.topic.device_id == device)


def values(message: Message) -> dict[str | None, Any]:
    return {m.name: m.value for m in message.payload.metrics}


FACTS = (
    {"Spool/Depth": 0, "Properties/Backend": "onnxruntime-cpu", "Properties/Version": "test"},
    {"cam1": {"Camera/State": "streaming", "Recipe": "bracket"}, "cam2": {"Camera/State": "streaming"}},
)


def make_node(
    broker: LocalBroker,
    triggers: list | None = None,
    spool: VerdictSpool | None = None,
    *,
    primary_host: str | None = None,
    state_path: Path | None = None,
) -> SparkplugNode:
    cfg = SparkplugConfig(group=GROUP, node=NODE, primary_host=primary_host)
    mqtt_cfg = MqttConfig(host=broker.host, port=broker.port, keepalive=5)
    on_trigger = (lambda cam, part: triggers.append((cam, part))) if triggers is not None else (lambda c, p: None)
    return SparkplugNode(
        cfg, mqtt_cfg, "dev", ["cam1", "cam2"], lambda: FACTS, on_trigger, spool, state_path=state_path
    )


@pytest.fixture(name="host")
def host_fixture(broker: LocalBroker) -> Iterator[Host]:
    h = Host(broker)
    yield h
    h.close()


def verdict_msg(n: int, verdict: str = "OK") -> dict[str, Any]:
    return {
        "id": f"v{n}",
        "verdict": verdict,
        "score": 0.25 + n / 1000,
        "threshold": 0.5,
        "part_id": f"P{n}",
        "recipe": "bracket",
        "captured_at_epoch": time.time(),
    }


def test_births_carry_every_metric_with_datatype_and_alias_and_bdseq(broker: LocalBroker, host: Host) -> None:
    node = make_node(broker)
    assert node.start(10)
    try:
        nbirth = host.wait_for(of(MessageType.NBIRTH))[0]
        dbirths = host.wait_for(of(MessageType.DBIRTH), count=2)
    finally:
        node.stop()
    assert str(nbirth.topic) == f"spBv1.0/{GROUP}/NBIRTH/{NODE}" and not nbirth.retain and nbirth.qos == 0
    assert nbirth.payload.seq == 0
    nv = values(nbirth)
    assert nv["bdSeq"] == 0 and nv[spm.REBIRTH] is False
    assert nv["Properties/Backend"] == "onnxruntime-cpu" and nv["Properties/Version"] == "test"
    assert [d.payload.seq for d in dbirths] == [1, 2]
    cam1 = dbirths[0].payload.metrics
    assert {m.name for m in cam1} == set(spm.DEVICE_METRICS)
    assert all(m.alias is not None and m.datatype != DataType.UNKNOWN for m in cam1)
    assert values(dbirths[0])["Recipe"] == "bracket" and values(dbirths[0])["Camera/State"] == "streaming"
    aliases = [m.alias for d in dbirths for m in d.payload.metrics]
    assert len(aliases) == len(set(aliases))  # unique across the node
    death = host.wait_for(of(MessageType.NDEATH))[0]  # the clean stop says it too, same bdSeq
    assert isinstance(death.payload, NDeath) and death.payload.bd_seq_metric.value == 0


def test_verdict_ddata_uses_aliases_only_and_decodes_against_the_birth(broker: LocalBroker, host: Host) -> None:
    node = make_node(broker)
    assert node.start(10)
    try:
        host.wait_for(of(MessageType.DBIRTH), count=2)
        node.publish_verdict("cam1", "v1", verdict_msg(1, "NG"))
        data = host.wait_for(of(MessageType.DDATA, "cam1"))[0]
    finally:
        node.stop()
    got = values(data)
    assert got[spm.VERDICT] == "NG" and got[spm.PART_ID] == "P1" and got["Inspection/Verdict ID"] == "v1"
    assert got["Counts/NG"] == 1 and got["Counts/OK"] == 0 and got["Inspection/Threshold"] == 0.5
    assert all(m.alias is not None for m in data.payload.metrics)


def test_ddata_on_the_wire_has_no_names_and_no_datatypes() -> None:
    from pysparkplug._protobuf import Payload as PBPayload  # the generated message, to look at the wire

    raw = spm.device_data(0, {spm.VERDICT: "OK", "Inspection/Score": 0.1}, 7, spm.now_ms()).encode()
    pb = PBPayload.FromString(raw)
    assert pb.seq == 7 and all(not m.HasField("name") and not m.HasField("datatype") for m in pb.metrics)


def test_seq_wraps_from_255_to_0(broker: LocalBroker, host: Host) -> None:
    node = make_node(broker)
    assert node.start(10)
    try:
        host.wait_for(of(MessageType.DBIRTH), count=2)
        for n in range(300):
            node.publish_data("cam2", {"Performance/Inspected FPS": float(n)})
        data = host.wait_for(of(MessageType.DDATA, "cam2"), count=300)
    finally:
        node.stop()
    seqs = [d.payload.seq for d in data]
    assert seqs == [(3 + n) % 256 for n in range(300)]  # NBIRTH 0, DBIRTHs 1-2, then 3 … 255, 0, 1 …
    assert 255 in seqs and seqs[seqs.index(255) + 1] == 0


def _cut(node: SparkplugNode) -> None:
    """Kill the node's TCP connection without a DISCONNECT: the broker publishes its Will."""
    sock = node.client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)


def test_ndeath_will_matches_the_birth_and_bdseq_grows_on_reconnect(broker: LocalBroker, host: Host) -> None:
    node = make_node(broker)
    assert node.start(10)
    try:
        first = host.wait_for(of(MessageType.NBIRTH))[0]
        _cut(node)
        will = host.wait_for(of(MessageType.NDEATH))[0]
        births = host.wait_for(of(MessageType.NBIRTH), count=2, timeout=20)
        host.wait_for(of(MessageType.DBIRTH, "cam2"), count=2)
    finally:
        node.stop()
    assert values(first)["bdSeq"] == 0
    assert isinstance(will.payload, NDeath) and will.payload.bd_seq_metric.value == 0
    assert values(births[1])["bdSeq"] == 1 and births[1].payload.seq == 0


def test_ncmd_rebirth_republishes_every_birth(broker: LocalBroker, host: Host) -> None:
    node = make_node(broker)
    assert node.start(10)
    try:
        host.wait_for(of(MessageType.DBIRTH), count=2)
        node.publish_data("cam1", {"Performance/Inspected FPS": 9.5})
        host.wait_for(of(MessageType.DDATA, "cam1"))
        host.command(MessageType.NCMD, (Metric(spm.now_ms(), spm.REBIRTH, DataType.BOOLEAN, value=True),))
        births = host.wait_for(of(MessageType.NBIRTH), count=2)
        dbirths = host.wait_for(of(MessageType.DBIRTH, "cam1"), count=2)
    finally:
        node.stop()
    assert births[1].payload.seq == 0 and values(births[1])["bdSeq"] == 0
    assert values(dbirths[1])["Performance/Inspected FPS"] == 9.5  # the rebirth carries current values
    assert node.stats["rebirths"] == 1


def test_dcmd_trigger_is_answered_in_ddata(broker: LocalBroker, host: Host) -> None:
    triggers: list[tuple[str, str | None]] = []
    node = make_node(broker, triggers)

    def answer(camera: str, part: str | None) -> None:
        triggers.append((camera, part))
        node.publish_verdict(camera, "vt", {**verdict_msg(7), "part_id": part})

    node.on_trigger = answer
    assert node.start(10)
    try:
        host.wait_for(of(MessageType.DBIRTH), count=2)
        host.command(MessageType.DCMD, (Metric(spm.now_ms(), spm.TRIGGER, DataType.STRING, value="PX-1"),), "cam2")
        data = host.wait_for(lambda m: of(MessageType.DDATA, "cam2")(m) and spm.VERDICT in values(m))[0]
    finally:
        node.stop()
    assert triggers == [("cam2", "PX-1")]
    assert values(data)[spm.PART_ID] == "PX-1" and values(data)[spm.VERDICT] == "OK"


def test_spooled_verdicts_survive_an_outage_and_follow_the_new_birth(tmp_path: Path) -> None:
    own = start_mosquitto()  # a broker of this test's own, to stop and start again on the same port
    own_host = Host(own)
    spool = VerdictSpool(tmp_path / "sparkplug" / "spool.db")
    node = make_node(own, spool=spool)
    assert node.start(10)
    try:
        own_host.wait_for(of(MessageType.DBIRTH), count=2)
        node.publish_verdict("cam1", "v0", verdict_msg(0))
        own_host.wait_for(of(MessageType.DDATA, "cam1"))
        own_host.close()
        own.stop()
        deadline = time.monotonic() + 10
        while node.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        for n in range(1, 6):
            node.publish_verdict("cam1", f"v{n}", verdict_msg(n))
        deadline = time.monotonic() + 10
        while spool.depth() < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool.depth() == 5  # held while the broker is away
        own = start_mosquitto(port=own.port)
        own_host = Host(own)
        data = own_host.wait_for(of(MessageType.DDATA, "cam1"), count=5, timeout=30)
        nbirth = own_host.wait_for(of(MessageType.NBIRTH))[0]
    finally:
        node.stop()
        own_host.close()
        own.stop()
        spool.close()
    assert [values(d)["Inspection/Verdict ID"] for d in data] == [f"v{n}" for n in range(1, 6)]
    assert values(nbirth)["bdSeq"] == 1
    seqs = [d.payload.seq for d in data]
    assert seqs == list(range(3, 8))  # after the new NBIRTH (0) and DBIRTHs (1, 2)


def test_the_daemon_answers_a_dcmd_trigger_with_a_real_verdict_in_ddata_beside_the_json_topics(
    tmp_path: Path, broker: LocalBroker, host: Host, line: dict
) -> None:
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon

    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10, "loop": True}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 2000}]
    cfg = write_config(tmp_path / "spb.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="spbd")
    body = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**body, "sparkplug": {"group": GROUP, "node": NODE}}))
    daemon = Daemon(load_config(cfg)).start()
    try:
        dbirth = host.wait_for(of(MessageType.DBIRTH, "cam1"))[0]
        nbirth = host.wait_for(of(MessageType.NBIRTH))[0]
        deadline = time.monotonic() + 30  # a trigger before the camera delivers frames is an ERROR by design
        while not (daemon.cameras.get("cam1") and daemon.cameras["cam1"].online) and time.monotonic() < deadline:
            time.sleep(0.05)
        host.command(MessageType.DCMD, (Metric(spm.now_ms(), spm.TRIGGER, DataType.STRING, value="PD-9"),), "cam1")
        data = host.wait_for(lambda m: of(MessageType.DDATA, "cam1")(m) and spm.VERDICT in values(m), timeout=20)[0]
        spool_rows = daemon.sparkplug.sender.spool
        status = daemon.status()
    finally:
        daemon.stop()
    got = values(data)
    assert got[spm.PART_ID] == "PD-9" and got[spm.VERDICT] in ("OK", "NG")
    assert got["Recipe"] == "bracket" and isinstance(got["Inspection/Score"], float)
    assert values(dbirth)["Recipe"] == "bracket"
    assert values(nbirth)["Properties/Version"] and values(nbirth)["Properties/Backend"]
    assert spool_rows.path == tmp_path / "spbd-state" / "sparkplug" / "spool.db"
    bd_seq_file = tmp_path / "spbd-state" / "sparkplug" / "bdseq.json"  # beside the spool: the next start's bdSeq
    assert json.loads(bd_seq_file.read_text()) == {"bd_seq": values(nbirth)["bdSeq"]}
    assert status["sparkplug"]["connected"] is True and status["sparkplug"]["triggers"] == 1
    assert not any("sparkplug" in p for p in status["problems"])
    assert host.wait_for(of(MessageType.NDEATH))[0].payload.bd_seq_metric.value == values(nbirth)["bdSeq"]


def test_the_example_configs_sparkplug_block_is_valid_and_absent_by_default() -> None:
    from anomalygpt_edge.runtime.line.config import load_config, parse_config

    example = Path(__file__).resolve().parents[1] / "runtime" / "config.example.yaml"
    assert load_config(example).sparkplug is None  # the JSON topics alone unless asked
    lines = example.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("sparkplug:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("#")), len(lines))
    block = ["sparkplug:"] + [line.replace("#", " ", 1) for line in lines[start + 1 : end]]
    text = "\n".join(lines[:start] + block + lines[end:]) + "\n"
    cfg = parse_config(text, "example.yaml", example.parent)
    assert cfg.sparkplug is not None and cfg.sparkplug.group == "AnomalyGPT" and cfg.sparkplug.data_qos == 1
    assert cfg.sparkplug.primary_host is None  # births without waiting for a host unless one is named


# -- Primary Host Application STATE --------------------------------------------------------------


def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def seen(host: Host, kind: MessageType) -> int:
    with host._cond:
        return sum(1 for m in host.messages if of(kind)(m))


def test_no_birth_before_the_primary_hosts_state_says_online(broker: LocalBroker, host: Host) -> None:
    node = make_node(broker, primary_host="scada-wait")
    try:
        assert not node.start(1.0)  # connected, subscribed, not born
        assert until(lambda: node.status()["session"] == "waiting for primary host scada-wait")
        host.state("scada-wait", False, 1_000)  # the host's retained Will: still offline
        time.sleep(0.5)
        assert seen(host, MessageType.NBIRTH) == 0 and seen(host, MessageType.DBIRTH) == 0
        status = node.status()
        assert status["connected"] is False and status["primary_host"] == "scada-wait"
        host.state("scada-wait", True, 2_000)
        nbirth = host.wait_for(of(MessageType.NBIRTH))[0]
        dbirths = host.wait_for(of(MessageType.DBIRTH), count=2)
        assert until(node.connected.is_set) and node.status()["session"] == "born"
    finally:
        node.stop()
    assert values(nbirth)["bdSeq"] == 0 and nbirth.payload.seq == 0
    assert [d.payload.seq for d in dbirths] == [1, 2]


def test_start_returns_at_once_when_the_hosts_retained_state_says_offline(broker: LocalBroker, host: Host) -> None:
    host.state("scada-down", False, 3_000)  # the host's Will, retained: the SCADA is down
    node = make_node(broker, primary_host="scada-down")
    try:
        began = time.monotonic()
        assert not node.start(10)  # the daemon's start is not held up by a SCADA that is down
        assert time.monotonic() - began < 5
        assert node.status()["session"] == "waiting for primary host scada-down"
    finally:
        node.stop()
    assert seen(host, MessageType.NBIRTH) == 0 and seen(host, MessageType.NDEATH) == 0  # never born: no NDEATH


def test_an_offline_host_ends_the_session_and_the_births_follow_its_return(broker: LocalBroker, host: Host) -> None:
    host.state("scada-cycle", True, 5_000)  # already online, retained: the node births on connect
    node = make_node(broker, primary_host="scada-cycle")
    try:
        assert node.start(10)
        first = host.wait_for(of(MessageType.NBIRTH))[0]
        host.state("scada-cycle", False, 6_000)
        death = host.wait_for(of(MessageType.NDEATH))[0]
        # A new session (next bdSeq), waiting again: the retained STATE still says offline.
        assert until(lambda: node.bd_seq == 1 and node.status()["session"].startswith("waiting for primary host"))
        time.sleep(0.5)
        assert seen(host, MessageType.NBIRTH) == 1 and seen(host, MessageType.NDEATH) == 1  # no Will besides
        assert node.network_thread is not None and node.network_thread.is_alive()
        host.state("scada-cycle", True, 7_000)
        again = host.wait_for(of(MessageType.NBIRTH), count=2)[1]
        host.wait_for(of(MessageType.DBIRTH, "cam2"), count=2)
        stats = node.status()
    finally:
        node.stop()
    assert values(first)["bdSeq"] == 0
    assert isinstance(death.payload, NDeath) and death.payload.bd_seq_metric.value == 0
    assert values(again)["bdSeq"] == 1 and again.payload.seq == 0
    assert stats["host_offline"] == 1 and stats["session"] == "born"


def test_a_stale_state_is_ignored(broker: LocalBroker, host: Host) -> None:
    host.state("scada-stale", True, 9_000)
    node = make_node(broker, primary_host="scada-stale")
    try:
        assert node.start(10)
        host.wait_for(of(MessageType.DBIRTH), count=2)
        host.state("scada-stale", False, 8_999)  # older than the online one: a late or replayed Will
        assert until(lambda: node.stats["states_ignored"] == 1)
        time.sleep(0.3)
        assert node.connected.is_set() and seen(host, MessageType.NDEATH) == 0
        host.state("scada-stale", False, 9_000)  # not older: the host did go offline
        death = host.wait_for(of(MessageType.NDEATH))[0]
    finally:
        node.stop()
    assert death.payload.bd_seq_metric.value == 0
    assert seen(host, MessageType.NBIRTH) == 1


def test_spooled_verdict_ddata_is_delivered_after_the_host_comes_online(
    tmp_path: Path, broker: LocalBroker, host: Host
) -> None:
    spool = VerdictSpool(tmp_path / "sparkplug" / "spool.db")
    node = make_node(broker, spool=spool, primary_host="scada-spool")
    try:
        node.start(1.0)
        assert until(lambda: node.status()["session"] == "waiting for primary host scada-spool")
        for n in range(1, 4):
            node.publish_verdict("cam1", f"v{n}", verdict_msg(n))
        assert until(lambda: spool.depth() == 3)
        time.sleep(0.3)
        assert seen(host, MessageType.DDATA) == 0 and spool.depth() == 3  # nothing lost, nothing sent
        host.state("scada-spool", True, 1_000)
        nbirth = host.wait_for(of(MessageType.NBIRTH))[0]
        data = host.wait_for(of(MessageType.DDATA, "cam1"), count=3)
        assert until(lambda: spool.depth() == 0)  # acknowledged by the broker
    finally:
        node.stop()
        spool.close()
    assert values(nbirth)["bdSeq"] == 0
    assert [values(d)["Inspection/Verdict ID"] for d in data] == ["v1", "v2", "v3"]
    assert [d.payload.seq for d in data] == [3, 4, 5]  # after the NBIRTH (0) and DBIRTHs (1, 2)


# -- bdSeq across restarts -------------------------------------------------------------------------


def test_a_restarted_node_carries_the_next_bdseq_in_its_will_and_birth(tmp_path: Path, broker: LocalBroker) -> None:
    state = tmp_path / "sparkplug" / "bdseq.json"
    births: list[Message] = []
    deaths: list[Message] = []
    for run in range(2):  # two processes in a row, the same state file
        watcher = Host(broker)
        node = make_node(broker, state_path=state)
        try:
            assert node.start(10)
            births.append(watcher.wait_for(of(MessageType.NBIRTH))[0])
            if run == 1:
                _cut(node)  # the broker sends the Will of the restarted node's first CONNECT
                deaths.append(watcher.wait_for(of(MessageType.NDEATH))[0])
                births.append(watcher.wait_for(of(MessageType.NBIRTH), count=2, timeout=20)[1])
        finally:
            node.stop()
            watcher.close()
    assert [values(b)["bdSeq"] for b in births] == [0, 1, 2]
    assert deaths[0].payload.bd_seq_metric.value == 1
    assert json.loads(state.read_text()) == {"bd_seq": 2}  # a clean stop does not step it


def test_bdseq_255_in_the_state_file_wraps_to_0(tmp_path: Path, broker: LocalBroker, host: Host) -> None:
    state = tmp_path / "bdseq.json"
    state.write_text(json.dumps({"bd_seq": 255}))
    node = make_node(broker, state_path=state)
    try:
        assert node.start(10)
        nbirth = host.wait_for(of(MessageType.NBIRTH))[0]
    finally:
        node.stop()
    assert values(nbirth)["bdSeq"] == 0 and host.wait_for(of(MessageType.NDEATH))[0].payload.bd_seq_metric.value == 0
    assert json.loads(state.read_text()) == {"bd_seq": 0}


def test_a_corrupt_bdseq_file_starts_at_0_and_says_so_in_one_log_line(
    tmp_path: Path, broker: LocalBroker, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "bdseq.json"
    state.write_bytes(b'{"bd_seq": "seven"')
    with caplog.at_level(logging.INFO, logger="anomalygpt_edge.runtime.delivery.sparkplug_session"):
        node = make_node(broker, state_path=state)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("sparkplug_session")]
    try:
        assert node.start(10)
        nbirth = host.wait_for(of(MessageType.NBIRTH))[0]
    finally:
        node.stop()
    assert len(lines) == 1 and "corrupt" in lines[0] and str(state) in lines[0] and "starts at 0" in lines[0]
    assert values(nbirth)["bdSeq"] == 0
    assert json.loads(state.read_text()) == {"bd_seq": 0}  # written anew, good for the next start
