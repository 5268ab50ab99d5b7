"""Bad input, property-based: random text and YAML trees at config loading, random bytes, random
JSON and wrong types at every command topic of a running daemon (real mosquitto). Config loading
only ever raises ConfigError; every command gets a reply and the daemon keeps inspecting."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    write_config,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from anomalygpt_edge.runtime.line.config import ConfigError, DaemonConfig, parse_config
from anomalygpt_edge.runtime.line.daemon import Daemon

# -- config loading -------------------------------------------------------------------------------

SECTIONS = ("device", "cameras", "recipes", "engines", "mqtt", "storage", "llm", "health", "commands", "limits")
KEYS = (
    "id",
    "type",
    "source",
    "fps",
    "loop",
    "width",
    "height",
    "gstreamer",
    "camera",
    "recipe",
    "trigger",
    "deadline_ms",
    "roi",
    "bundle",
    "heatmap",
    "settle_ms",
    "backend",
    "host",
    "port",
    "protocol",
    "prefix",
    "qos",
    "keepalive",
    "client_id",
    "username",
    "password_file",
    "tls",
    "ca",
    "cert",
    "key",
    "check_hostname",
    "max_payload_bytes",
    "store",
    "data",
    "spool",
    "spool_max_rows",
    "spool_max_age_s",
    "archive",
    "archive_quota_mb",
    "archive_ok_sample_rate",
    "enabled",
    "model",
    "threads",
    "explain",
    "max_queue",
    "heartbeat_s",
    "metrics_bind",
    "allowed_client_ids",
    "privileged",
    "token_file",
    "allow_anonymous_control",
    "enroll_session_timeout_s",
    "max_image_pixels",
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["video_file", "free_run", "mqtt", "5", "cam1", "localhost", "onnxruntime", ""]),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=5)
    ),
    max_leaves=25,
)
trees = st.dictionaries(st.sampled_from(SECTIONS), values, max_size=7)


def _load_only_config_errors(text: str) -> None:
    try:
        result = parse_config(text, "fuzz.yaml", Path("/nonexistent-base"))
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), exc  # the message names the file
        return
    assert isinstance(result, DaemonConfig)


@settings(max_examples=300, deadline=None)
@given(tree=trees)
def test_random_config_trees_are_accepted_or_refused_with_a_config_error(tree: dict) -> None:
    _load_only_config_errors(yaml.safe_dump(tree, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
@example("device: {id: !foo bar}\ncameras: {c: {type: video_file, source: a}}\nrecipes: []\n")
@example("device: {id: x}\ncameras: {c: {type: video_file, source: !!int abc}}\nrecipes: []\n")
@example("device: {id: x}\ncameras: {c: {type: video_file, source: a, fps: !!float x}}\nrecipes: []\n")
@example("&a [*a, *a]")
@example("device: {id: x}\ncameras: {c: {type: video_file, source: a}}\nrecipes: [{camera: c, recipe: !!binary '@'}]")
def test_random_config_text_is_accepted_or_refused_with_a_config_error(text: str) -> None:
    _load_only_config_errors(text)


# -- commands at a running daemon -----------------------------------------------------------------

DEVICE = "fuzz"
REPLY_TOPIC = f"tech/{DEVICE}"


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, broker: Any, line: dict) -> Any:
    tmp = tmp_path_factory.mktemp("fuzz")
    store = tmp / "store"
    shutil.copytree(line["store"], store)  # random enroll commands must not touch the shared store
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 3000}]
    cfg = write_config(
        tmp / "fuzz.yaml", broker, cameras, recipes, store, line["bundle"], device=DEVICE, max_payload_bytes=8192
    )
    from anomalygpt_edge.runtime.line.config import load_config

    # Anonymous control on: the random enroll/recipe commands must reach their handlers, not stop
    # at the gate (the refusal itself is tested in test_limits_commands.py).
    data = json.loads(cfg.read_text())
    data["commands"] = {"allow_anonymous_control": True}
    cfg.write_text(json.dumps(data))
    sub = Subscriber(broker, [REPLY_TOPIC, f"anomalygpt/{DEVICE}/cam1/verdict"])
    daemon = Daemon(load_config(cfg)).start()
    yield daemon, sub
    daemon.stop()
    sub.close()


ACTIONS = ["start", "add", "finish", "cancel", "list", "show", "switch"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
typed_fields = st.fixed_dictionaries(
    {},
    optional={
        "camera": st.one_of(st.just("cam1"), st.just("nope"), json_values),
        "action": st.one_of(
            st.sampled_from(["start", "add", "finish", "cancel", "list", "show", "switch"]), json_values
        ),
        "recipe": st.one_of(st.just("bracket"), st.just("../x"), json_values),
        "part_id": json_values,
        "roi": json_values,
        "question": json_values,
        "correlation_id": json_values,
        "target_frr": json_values,
    },
)
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    typed_fields.map(lambda v: json.dumps(v).encode()),
)
command_names = st.sampled_from(["trigger", "enroll", "recipe", "ask", "reboot", "TRIGGER"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=command_names, payload=payloads)
@example("trigger", b"[" * 5000)  # nesting deeper than the JSON parser's recursion limit
@example("recipe", b'{"action": ' + b"7" * 5000 + b"}")  # an int longer than Python converts
@example("trigger", b'{"camera": "cam1", "part_id": 1e999}')
@example("enroll", b"\xff\xfe\x00")
@example("trigger", b"x" * 9000)  # over max_payload_bytes
def test_every_random_command_gets_a_reply_and_the_daemon_keeps_running(
    fuzz_daemon: Any, command: str, payload: bytes
) -> None:
    daemon, sub = fuzz_daemon
    corr = uuid.uuid4().bytes
    sub.publish(f"anomalygpt/{DEVICE}/cmd/{command}", payload, response_topic=REPLY_TOPIC, correlation=corr)
    reply = sub.wait_for(
        lambda m: m.topic == REPLY_TOPIC and bytes(m.properties.CorrelationData or b"") == corr, timeout=10
    )[0].json()
    assert isinstance(reply, dict) and "ok" in reply
    if not reply["ok"]:
        assert isinstance(reply.get("error"), str) and reply["error"]
    assert all(t.is_alive() for t in daemon._threads), "a daemon thread died"


def test_after_the_fuzzing_a_valid_trigger_is_still_inspected(fuzz_daemon: Any) -> None:
    daemon, sub = fuzz_daemon
    corr = b"final-check"
    sub.publish(
        f"anomalygpt/{DEVICE}/cmd/trigger",
        json.dumps({"camera": "cam1", "part_id": "P-final"}),
        response_topic=REPLY_TOPIC,
        correlation=corr,
    )
    verdict = sub.wait_for(lambda m: m.topic.endswith("/cam1/verdict") and b"P-final" in m.payload, timeout=15)
    assert verdict[0].json()["verdict"] in ("OK", "NG")
