"""The command gate: only configured command topics, bounded payloads, JSON objects, and enrollment/
recipe changes only from allowed client ids or with the shared token. Never raises."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomalygpt_edge.runtime.line.command_gate import (
    COMMANDS,
    CommandGate,
    CommandPolicy,
    CommandRequest,
    Rejection,
    policy_from_config,
)

ROOT = "anomalygpt/line1/cmd/"


def gate(**kw: Any) -> CommandGate:
    return CommandGate(CommandPolicy(prefix="anomalygpt", device="line1", **kw))


def test_a_well_formed_trigger_is_accepted_with_its_default_reply_topic() -> None:
    result = gate().check(ROOT + "trigger", b'{"camera": "cam1", "part_id": "P1"}')
    assert isinstance(result, CommandRequest)
    assert result.command == "trigger" and result.body == {"camera": "cam1", "part_id": "P1"}
    assert result.reply_topic == "anomalygpt/line1/reply/trigger"


def test_mqtt5_response_topic_and_correlation_data_are_kept() -> None:
    result = gate().check(ROOT + "trigger", b"{}", response_topic="plc/answers", correlation_data=b"\x01\x02")
    assert isinstance(result, CommandRequest)
    assert result.reply_topic == "plc/answers" and result.correlation_data == b"\x01\x02"


@pytest.mark.parametrize(
    "response_topic", ["plc/#", "plc/+/x", "anomalygpt/line1/cam1/verdict", "anomalygpt/line1/status", "", 5]
)
def test_unsafe_response_topics_fall_back_to_the_reply_topic(response_topic: Any) -> None:
    # The daemon must not be usable to publish forged verdicts/status or to a wildcard topic.
    result = gate().check(ROOT + "trigger", b"{}", response_topic=response_topic)
    assert isinstance(result, CommandRequest) and result.reply_topic == "anomalygpt/line1/reply/trigger"


@pytest.mark.parametrize(
    "topic", ["anomalygpt/line1/cmd/reboot", "anomalygpt/line2/cmd/trigger", "anomalygpt/line1/cmd/", "x", None, b"t"]
)
def test_topics_outside_the_allow_list_are_rejected_and_counted(topic: Any) -> None:
    g = gate()
    result = g.check(topic, b"{}")
    assert isinstance(result, Rejection) and result.code == "topic_not_allowed" and result.reply_topic is None
    assert g.stats.rejected["topic_not_allowed"] == 1


def test_a_command_not_enabled_in_the_policy_is_rejected() -> None:
    result = gate(commands=frozenset({"trigger"})).check(ROOT + "enroll", b"{}")
    assert isinstance(result, Rejection) and result.code == "topic_not_allowed"


def test_an_oversized_payload_is_rejected_before_parsing() -> None:
    g = gate(max_payload_bytes=100)
    result = g.check(ROOT + "trigger", b"{" + b" " * 200 + b"}")
    assert isinstance(result, Rejection) and result.code == "payload_too_large"
    assert result.reply_topic == "anomalygpt/line1/reply/trigger"
    assert json.loads(result.reply_payload()) == {
        "ok": False,
        "command": "trigger",
        "error": "payload_too_large",
        "message": "payload is 202 bytes, the limit is 100",
    }


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b'{"x": NaN}', "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"trigger"', "not_an_object"),
        (b"[" * 5000 + b"]" * 5000, "too_deep"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "too_deep"),
        (12345, "bad_payload"),
    ],
)
def test_malformed_payloads_get_an_error_reply(payload: Any, code: str) -> None:
    g = gate()
    result = g.check(ROOT + "trigger", payload, correlation_data=b"c1")
    assert isinstance(result, Rejection) and result.code == code
    assert result.reply_topic and result.correlation_data == b"c1"
    assert g.stats.to_json()["rejected_total"] == 1


def test_enrollment_is_refused_without_the_token_and_accepted_with_it_from_a_property_or_field() -> None:
    g = gate(token="s3cret-token")
    assert g.check(ROOT + "enroll", b'{"action": "start"}').code == "unauthorized"
    assert g.check(ROOT + "enroll", b'{"token": "wrong"}').code == "unauthorized"
    assert g.check(ROOT + "enroll", b'{"token": 123}').code == "unauthorized"
    by_field = g.check(ROOT + "enroll", b'{"action": "start", "token": "s3cret-token"}')
    assert isinstance(by_field, CommandRequest) and by_field.body == {"action": "start"}  # token stripped
    by_prop = g.check(ROOT + "recipe", b"{}", user_properties=[("token", "s3cret-token")])
    assert isinstance(by_prop, CommandRequest)
    # Triggers are not privileged: the PLC needs no token.
    assert isinstance(g.check(ROOT + "trigger", b"{}"), CommandRequest)
    assert g.stats.rejected["unauthorized"] == 3 and g.stats.accepted["enroll"] == 1


def test_without_credentials_configured_enroll_and_recipe_switch_are_refused_unless_anonymous_is_allowed() -> None:
    g = gate()  # no token, no client ids, anonymous control off: the default
    for body in (b'{"action": "start"}', b'{"action": "cancel"}', b"{}"):
        refused = g.check(ROOT + "enroll", body)
        assert isinstance(refused, Rejection) and refused.code == "unauthorized"
        assert "allow_anonymous_control" in refused.message
    assert g.check(ROOT + "recipe", b'{"action": "switch", "camera": "c", "recipe": "r"}').code == "unauthorized"
    assert g.check(ROOT + "recipe", b'{"action": 5}').code == "unauthorized"
    for read_only in (b'{"action": "list"}', b'{"action": "show", "recipe": "r"}'):
        assert isinstance(g.check(ROOT + "recipe", read_only), CommandRequest)
    assert isinstance(g.check(ROOT + "trigger", b'{"camera": "c"}'), CommandRequest)
    bench = gate(allow_anonymous=True)
    assert isinstance(bench.check(ROOT + "enroll", b'{"action": "start"}'), CommandRequest)
    assert isinstance(bench.check(ROOT + "recipe", b'{"action": "switch"}'), CommandRequest)
    assert policy_from_config({"allow_anonymous_control": True}, "p", "d").allow_anonymous is True
    assert policy_from_config({}, "p", "d").allow_anonymous is False
    with pytest.raises(ValueError):
        policy_from_config({"allow_anonymous_control": "yes"}, "p", "d")


def test_enrollment_is_restricted_to_allowed_client_ids() -> None:
    g = gate(allowed_client_ids=frozenset({"hmi-1"}))
    assert isinstance(g.check(ROOT + "enroll", b"{}", user_properties=[("client_id", "hmi-1")]), CommandRequest)
    assert isinstance(g.check(ROOT + "enroll", b'{"client_id": "hmi-1"}'), CommandRequest)
    assert g.check(ROOT + "enroll", b'{"client_id": "laptop"}').code == "unauthorized"
    assert g.check(ROOT + "enroll", b"{}").code == "unauthorized"


def test_with_both_restrictions_both_are_required() -> None:
    g = gate(allowed_client_ids=frozenset({"hmi-1"}), token="t")
    assert g.check(ROOT + "enroll", b'{"client_id": "hmi-1"}').code == "unauthorized"
    assert g.check(ROOT + "enroll", b'{"token": "t"}').code == "unauthorized"
    assert isinstance(g.check(ROOT + "enroll", b'{"client_id": "hmi-1", "token": "t"}'), CommandRequest)


def test_subscriptions_are_exact_topics_without_wildcards() -> None:
    assert gate().policy.command_topics() == [ROOT + c for c in sorted(COMMANDS)]


def test_policy_from_config_validates_types() -> None:
    p = policy_from_config({"allowed_client_ids": ["a"], "max_payload_bytes": 1000}, "p", "d", token="t")
    assert p.allowed_client_ids == frozenset({"a"}) and p.max_payload_bytes == 1000 and p.token == "t"
    for bad in ({"allowed_client_ids": "a"}, {"privileged": ["reboot"]}, {"max_payload_bytes": "big"}):
        with pytest.raises(ValueError):
            policy_from_config(bad, "p", "d")
    with pytest.raises(ValueError):
        CommandPolicy(prefix="p/#", device="d")
    with pytest.raises(ValueError):
        CommandPolicy(prefix="p", device="d", token="")


# -- property-based: whatever arrives, the gate answers or counts, and never raises ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
anything = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=50),
    st.integers(),
    st.none(),
    st.lists(st.integers(), max_size=3),
)
topics = st.one_of(st.sampled_from([ROOT + c for c in COMMANDS]), st.text(max_size=40), st.none(), st.binary())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    topic=topics,
    payload=anything,
    props=st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3), st.text()),
    response_topic=st.one_of(st.none(), st.text(max_size=30), st.integers()),
    corr=st.one_of(st.none(), st.binary(max_size=8), st.integers()),
)
def test_random_messages_always_get_a_request_or_a_counted_rejection(
    topic: Any, payload: Any, props: Any, response_topic: Any, corr: Any
) -> None:
    g = gate(token="tok", max_payload_bytes=256)
    result = g.check(topic, payload, props, response_topic, corr)
    total = sum(g.stats.accepted.values()) + sum(g.stats.rejected.values())
    assert total == 1
    if isinstance(result, Rejection):
        json.loads(result.reply_payload())  # the error reply is always valid JSON
        if isinstance(topic, str) and topic in [ROOT + c for c in COMMANDS]:
            assert result.reply_topic, "a command on a valid topic always gets a reply"
    else:
        assert isinstance(result.body, dict) and "token" not in result.body
        assert result.command in COMMANDS and result.reply_topic
        assert "+" not in result.reply_topic and "#" not in result.reply_topic
