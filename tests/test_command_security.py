"""Command security on a running daemon (real mosquitto): enrollment and recipe changes need the
shared token (MQTT 5 user property or field) when one is configured, or come from an allowed client
id; the token comes from the environment, never from the YAML; triggers stay open to the PLC."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    write_config,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from anomalygpt_edge.runtime.line.config import ConfigError, load_config, parse_config
from anomalygpt_edge.runtime.line.daemon import Daemon

DEVICE = "sec"
REPLIES = f"tech/{DEVICE}"


def _config(tmp_path: Path, broker: Any, line: dict, commands: dict) -> Path:
    store = tmp_path / "store"
    shutil.copytree(line["store"], store)
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 3000}]
    path = write_config(tmp_path / "sec.yaml", broker, cameras, recipes, store, line["bundle"], device=DEVICE)
    cfg = json.loads(path.read_text())
    cfg["commands"] = commands
    path.write_text(json.dumps(cfg))
    return path


def _ask(sub: Subscriber, command: str, body: dict, corr: bytes, user_properties: list | None = None) -> dict:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = REPLIES
    props.CorrelationData = corr
    if user_properties:
        props.UserProperty = user_properties
    sub.client.publish(f"anomalygpt/{DEVICE}/cmd/{command}", json.dumps(body), qos=1, properties=props)
    got = sub.wait_for(lambda m: m.topic == REPLIES and bytes(m.properties.CorrelationData) == corr, timeout=15)
    return got[0].json()


def test_recipe_changes_need_the_token_from_the_environment(
    tmp_path: Path, broker: Any, line: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMALYGPT_EDGE_COMMANDS_TOKEN", "line-3-secret")
    cfg = load_config(_config(tmp_path, broker, line, {}))
    sub = Subscriber(broker, [REPLIES, f"anomalygpt/{DEVICE}/#"])
    daemon = Daemon(cfg).start()
    try:
        switch = {"action": "switch", "camera": "cam1", "recipe": "bracket"}
        no_token = _ask(sub, "recipe", switch, b"1")
        wrong = _ask(sub, "recipe", {**switch, "token": "guess"}, b"2")
        by_field = _ask(sub, "recipe", {**switch, "token": "line-3-secret"}, b"3")
        by_property = _ask(sub, "recipe", {"action": "list"}, b"4", [("token", "line-3-secret")])
        enroll = _ask(sub, "enroll", {"action": "start", "camera": "cam1", "recipe": "new"}, b"5")
        trigger = _ask(sub, "trigger", {"camera": "cam1", "part_id": "P1"}, b"6")  # the PLC needs no token
        counted = daemon.commands.gate.stats.to_json()
    finally:
        daemon.stop()
        sub.close()
    assert not no_token["ok"] and "not authorized" in no_token["error"]
    assert not wrong["ok"] and "not authorized" in wrong["error"]
    assert by_field["ok"] and by_property["ok"]
    assert not enroll["ok"] and "not authorized" in enroll["error"]
    assert trigger["verdict"] in ("OK", "NG")
    assert counted["rejected"] == {"unauthorized": 3}
    assert "line-3-secret" not in json.dumps([no_token, wrong, by_field, by_property, enroll])


def test_enrollment_only_from_allowed_client_ids(tmp_path: Path, broker: Any, line: dict) -> None:
    cfg = load_config(_config(tmp_path, broker, line, {"allowed_client_ids": ["hmi-line-3"]}))
    sub = Subscriber(broker, [REPLIES])
    daemon = Daemon(cfg).start()
    try:
        body = {"action": "start", "camera": "cam1", "recipe": "fresh"}
        stranger = _ask(sub, "enroll", body, b"a", [("client_id", "laptop")])
        allowed = _ask(sub, "enroll", body, b"b", [("client_id", "hmi-line-3")])
        cancel = _ask(sub, "enroll", {"action": "cancel", "camera": "cam1", "client_id": "hmi-line-3"}, b"c")
    finally:
        daemon.stop()
        sub.close()
    assert not stranger["ok"] and "laptop" in stranger["error"]
    assert allowed["ok"] and cancel["ok"]


def test_a_token_in_clear_in_the_yaml_is_refused_and_the_commands_section_is_checked() -> None:
    base = "device: {id: d}\ncameras: {c: {type: video_file, source: a}}\nrecipes: [{camera: c, recipe: r}]\n"
    with pytest.raises(ConfigError, match="commands.token: secrets are not accepted in clear.*COMMANDS_TOKEN"):
        parse_config(base + "commands: {token: hunter2}\n")
    with pytest.raises(ConfigError, match=r"commands.privileged.*reboot"):
        parse_config(base + "commands: {privileged: [reboot]}\n")
    with pytest.raises(ConfigError, match="commands.allowed_client_ids"):
        parse_config(base + "commands: {allowed_client_ids: hmi}\n")
    cfg = parse_config(base + "commands: {allowed_client_ids: [hmi-1], privileged: [enroll]}\n")
    assert cfg.commands.allowed_client_ids == ("hmi-1",) and cfg.commands.privileged == ("enroll",)


@pytest.mark.parametrize("response_topic", [f"anomalygpt/{DEVICE}/cam1/verdict", "plc/+/answers"])
def test_a_response_topic_that_would_forge_or_cannot_be_published_gets_the_reply_topic(
    tmp_path: Path, broker: Any, line: dict, response_topic: str
) -> None:
    cfg = load_config(_config(tmp_path, broker, line, {}))
    sub = Subscriber(broker, [f"anomalygpt/{DEVICE}/#"])
    daemon = Daemon(cfg).start()
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = b"forge"
        sub.client.publish(f"anomalygpt/{DEVICE}/cmd/recipe", b'{"action": "list"}', qos=1, properties=props)
        reply = sub.wait_for(lambda m: m.topic == f"anomalygpt/{DEVICE}/reply/recipe", timeout=15)[0]
        forged = [m for m in sub.messages if m.topic.endswith("/verdict")]
    finally:
        daemon.stop()
        sub.close()
    assert reply.json()["ok"] and bytes(reply.properties.CorrelationData) == b"forge"
    assert forged == []  # trigger-mode camera: nothing on the verdict topic but what the daemon inspected
