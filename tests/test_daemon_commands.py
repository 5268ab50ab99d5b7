"""MQTT commands against a real mosquitto: an enrollment driven entirely over MQTT from the line
camera, recipe list/show/switch, and every kind of malformed command answered with an error while
the daemon keeps inspecting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.recipes.store import RecipeStore
from anomalygpt_edge.runtime.tools import synthetic


def _anonymous_control(path: Path) -> Path:
    """These tests drive enrollment and recipe switches without a token: say so in the config
    (the default refuses them; see test_limits_commands.py)."""
    cfg = json.loads(path.read_text())
    cfg["commands"] = {"allow_anonymous_control": True}
    path.write_text(json.dumps(cfg))
    return path


def _request(sub: Subscriber, device: str, command: str, body: Any, corr: bytes, timeout: float = 20) -> dict:
    payload = body if isinstance(body, bytes | str) else json.dumps(body)
    sub.publish(f"anomalygpt/{device}/cmd/{command}", payload, response_topic=f"tech/{device}", correlation=corr)
    msg = sub.wait_for(
        lambda m: m.topic == f"tech/{device}" and bytes(m.properties.CorrelationData) == corr, timeout=timeout
    )[0]
    return msg.json()


def test_a_technician_enrolls_a_new_recipe_from_the_line_camera_entirely_over_mqtt(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    store = tmp_path / "store"  # empty: the recipe does not exist yet
    cameras = {"cam1": {"type": "video_file", "source": str(line["golden"]), "fps": 20, "loop": True}}
    recipes = [{"camera": "cam1", "recipe": "bracket-b", "trigger": "free_run", "fps": 5, "deadline_ms": 2000}]
    cfg = _anonymous_control(
        write_config(tmp_path / "e.yaml", broker, cameras, recipes, store, line["bundle"], device="enr")
    )
    sub = Subscriber(broker, ["anomalygpt/enr/#", "tech/enr"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        status = sub.wait_for(
            lambda m: m.topic.endswith("/status") and m.json()["cameras"]["cam1"]["status"] == "online"
        )
        assert status[0].json()["cameras"]["cam1"]["live"] is False  # nothing to inspect with yet
        start = _request(
            sub,
            "enr",
            "enroll",
            {"action": "start", "camera": "cam1", "recipe": "bracket-b", "roi": list(synthetic.PART_ROI)},
            b"e0",
        )
        assert start["ok"] and start["recipe"] == "bracket-b" and start["existing_samples"] == 0
        seqs = []
        for i in range(10):
            added = _request(sub, "enr", "enroll", {"action": "add", "camera": "cam1"}, f"a{i}".encode())
            assert added["ok"] and added["count"] == i + 1, added
            seqs.append(added["frame_seq"])
        assert seqs == sorted(set(seqs)), "each add takes a new frame"
        done = _request(sub, "enr", "enroll", {"action": "finish", "camera": "cam1"}, b"f0", timeout=60)
        # On failure, say why the recipe did not go live (a frame caught mid-transition is flagged).
        assert done["ok"] and done["live"] and done["k"] == 10 and done["switched"], (done, done.get("quality"))
        verdicts = sub.wait_for(topic_is("/cam1/verdict"), count=3, timeout=20)
    finally:
        daemon.stop()
        sub.close()
    recipe = RecipeStore(store).load("bracket-b")
    assert recipe.live and recipe.roi == synthetic.PART_ROI and len(recipe.samples) == 10
    bodies = [v.json() for v in verdicts]
    assert all(b["recipe"] == "bracket-b" and b["bank_version"] == recipe.bank_version for b in bodies)
    # The camera shows the golden parts it was enrolled from: they pass.
    assert sum(b["verdict"] == "OK" for b in bodies) >= 2, [b["verdict"] for b in bodies]


def test_enrollment_can_be_cancelled_and_needs_a_start(tmp_path: Path, broker: Any, line: dict) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["golden"]), "fps": 20}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt"}]
    cfg = _anonymous_control(
        write_config(tmp_path / "c.yaml", broker, cameras, recipes, tmp_path / "store", line["bundle"], device="cnl")
    )
    sub = Subscriber(broker, ["anomalygpt/cnl/#", "tech/cnl"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        no_session = _request(sub, "cnl", "enroll", {"action": "add", "camera": "cam1"}, b"n")
        _request(sub, "cnl", "enroll", {"action": "start", "camera": "cam1", "recipe": "temp"}, b"s")
        twice = _request(sub, "cnl", "enroll", {"action": "start", "camera": "cam1", "recipe": "temp"}, b"s2")
        _request(sub, "cnl", "enroll", {"action": "add", "camera": "cam1"}, b"a")
        cancel = _request(sub, "cnl", "enroll", {"action": "cancel", "camera": "cam1"}, b"c")
    finally:
        daemon.stop()
        sub.close()
    assert not no_session["ok"] and "start" in no_session["error"]
    assert not twice["ok"] and "open" in twice["error"]
    assert cancel["ok"] and cancel["discarded"] == 1
    assert RecipeStore(tmp_path / "store").load("temp").samples == ()


def test_recipe_commands_list_show_and_switch_a_cameras_recipe(tmp_path: Path, broker: Any, line: dict) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt"}]
    cfg = _anonymous_control(
        write_config(tmp_path / "r.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="rcp")
    )
    sub = Subscriber(broker, ["anomalygpt/rcp/#", "tech/rcp"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        listed = _request(sub, "rcp", "recipe", {"action": "list"}, b"l")
        shown = _request(sub, "rcp", "recipe", {"action": "show", "recipe": "bracket"}, b"s")
        switched = _request(sub, "rcp", "recipe", {"action": "switch", "camera": "cam1", "recipe": "bracket"}, b"w")
    finally:
        daemon.stop()
        sub.close()
    assert listed["ok"] and listed["cameras"] == {"cam1": "bracket"}
    assert {"name": "bracket", "live": True}.items() <= listed["recipes"][0].items()
    assert shown["ok"] and shown["recipe"]["name"] == "bracket" and shown["recipe"]["threshold"]["value"] > 0
    assert switched["ok"] and switched["previous"] == "bracket"


MALFORMED = [
    ("trigger", b"{not json", "malformed JSON"),
    ("trigger", b"[1, 2]", "must be a JSON object"),
    ("trigger", b'{"camera": 5}', "field 'camera' must be str"),
    ("trigger", b'{"camera": "cam1", "part_id": [1]}', "field 'part_id' must be str or int"),
    ("trigger", b'{"camera": "nope"}', "unknown camera 'nope'"),
    ("trigger", b'{"part_id": "x"}', "missing field 'camera'"),
    ("recipe", b'{"action": "switch", "camera": "cam1", "recipe": "ghost"}', "unknown recipe 'ghost'"),
    ("recipe", b'{"action": "switch", "camera": "cam1", "recipe": "../etc"}', "invalid"),
    ("recipe", b'{"action": "explode"}', "action must be one of"),
    ("enroll", b'{"action": "start", "camera": "cam1", "recipe": true}', "field 'recipe' must be str"),
    ("ask", b'{"camera": "cam1"}', "no LLM"),
    ("reboot", b"{}", "unknown command 'reboot'"),
    ("trigger", b'{"camera": "cam1", "pad": "' + b"x" * 5000 + b'"}', "payload too large"),
]


@pytest.mark.parametrize("batch", [MALFORMED])
def test_every_malformed_command_gets_an_error_reply_and_the_daemon_keeps_inspecting(
    tmp_path: Path, broker: Any, line: dict, batch: list
) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 2000}]
    cfg = _anonymous_control(
        write_config(
            tmp_path / "m.yaml",
            broker,
            cameras,
            recipes,
            line["store"],
            line["bundle"],
            device="bad",
            max_payload_bytes=4096,
        )
    )
    sub = Subscriber(broker, ["anomalygpt/bad/#", "tech/bad"])
    daemon = Daemon(load_config(cfg)).start()
    try:
        sub.wait_for(lambda m: m.topic.endswith("/status") and m.json()["cameras"]["cam1"]["status"] == "online")
        replies = [_request(sub, "bad", cmd, payload, f"m{i}".encode()) for i, (cmd, payload, _) in enumerate(batch)]
        # Without a response topic the error goes to <prefix>/<device>/reply/<command>.
        sub.publish("anomalygpt/bad/cmd/trigger", b"{oops", correlation=b"plain")
        plain = sub.wait_for(topic_is("/reply/trigger"))[0]
        # Still running: a good trigger afterwards gets its verdict.
        good = _request(sub, "bad", "trigger", {"camera": "cam1", "part_id": "after"}, b"good")
    finally:
        daemon.stop()
        sub.close()
    for (cmd, _, expected), body in zip(batch, replies):
        assert body["ok"] is False, (cmd, body)
        assert expected in body["error"], (cmd, body["error"])
        assert body["command"] == cmd
    assert plain.json()["ok"] is False and bytes(plain.properties.CorrelationData) == b"plain"
    assert good["verdict"] in ("OK", "NG") and good["part_id"] == "after"
    assert daemon.commands.errors == len(batch) + 1


# -- cmd/ask bookkeeping and command bodies, without a broker ---------------------------------------


class _RecordingLink:
    """The two link members an explanation uses: ``reply`` (an ask's answer) and ``publish_json``."""

    def __init__(self) -> None:
        self.replies: list[tuple[Any, dict]] = []
        self.published: list[tuple[str, dict]] = []

    def topic(self, *parts: str) -> str:
        return "/".join(("anomalygpt", "dev", *parts))

    def reply(self, cmd: Any, body: dict) -> None:
        self.replies.append((cmd, body))

    def publish_json(self, topic: str, body: dict, qos: int = 1, retain: bool = False) -> int:
        self.published.append((topic, body))
        return 0


def _ask_command(correlation: bytes) -> Any:
    from anomalygpt_edge.runtime.delivery.mqtt_link import Command

    return Command("ask", b"{}", "hmi/dev", correlation, 0.0, 0.0)


def _publisher(link: _RecordingLink) -> Any:
    from anomalygpt_edge.runtime.line.verdict_publisher import VerdictPublisher

    return VerdictPublisher(None, link, None, None, {})  # type: ignore[arg-type] - explanations use only the link


def test_an_explanation_reusing_a_dropped_asks_object_identity_never_answers_that_stale_ask() -> None:
    from anomalygpt_edge.runtime.explain.explainer import Explanation
    from anomalygpt_edge.runtime.inspection.verdict import Verdict
    from anomalygpt_edge.runtime.line.asks import AskBook

    book, link = AskBook(), _RecordingLink()
    verdict = Verdict.error("bracket", "test")
    stale = book.open(_ask_command(b"q-old"), "cam1", "v1", verdict, "Where?")
    # The worker dropped that request; CPython hands its memory (its id) to the next request. Model
    # that exactly: the same object, now a verdict's own explanation for camera cam1.
    stale.key, stale.question, stale.verdict_id = "cam1", "Is there any anomaly in the image?", "v2"
    fresh = book.open(_ask_command(b"q-new"), "cam1", "v3", verdict, "How large?")
    explanation = Explanation(text="a scratch, top left", source="template")
    publisher = _publisher(link)
    publisher.publish_explanation(stale, explanation, book.take(stale))
    publisher.publish_explanation(fresh, explanation, book.take(fresh))
    assert [t for t, _ in link.published] == ["anomalygpt/dev/cam1/explanation"], "the verdict's own explanation"
    assert [bytes(c.correlation_data) for c, _ in link.replies] == [b"q-new"], "only the ask that asked is answered"
    assert link.replies[0][1]["verdict_id"] == "v3" and len(book) == 1, "the dropped ask is still open, to expire"


def test_an_ask_answer_names_its_camera_whatever_its_correlation_data_contains() -> None:
    from anomalygpt_edge.runtime.explain.explainer import Explanation
    from anomalygpt_edge.runtime.inspection.verdict import Verdict
    from anomalygpt_edge.runtime.line.asks import AskBook

    book, link = AskBook(), _RecordingLink()
    request = book.open(_ask_command(b"plc:7:cam2"), "cam1", "v1", Verdict.error("bracket", "test"), "Where?")
    _publisher(link).publish_explanation(request, Explanation(text="ok", source="template"), book.take(request))
    body = link.replies[0][1]
    assert body["camera"] == "cam1" and body["correlation_id"] == "plc:7:cam2" and body["command"] == "ask"


def test_an_ask_the_explanation_worker_dropped_is_answered_with_an_error_once_it_expires() -> None:
    from anomalygpt_edge.runtime.inspection.verdict import Verdict
    from anomalygpt_edge.runtime.line.asks import ASK_GRACE_S, AskBook

    book = AskBook()
    book.open(_ask_command(b"q1"), "cam1", "v1", Verdict.error("bracket", "test"), "Where?")
    assert book.expire(max_age_s=10.0) == [], "young asks stay open"
    expired = book.expire(max_age_s=-ASK_GRACE_S - 1.0)
    assert [bytes(a.command.correlation_data) for a in expired] == [b"q1"] and len(book) == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"action": "start", "camera": "cam1", "recipe": "r", "roi": [0, 0, 4, 4]}, "field 'roi'"),
        ({"action": "start", "camera": "cam1", "recipe": "r", "roi": [-1, 0, 40, 40]}, "field 'roi'"),
        ({"action": "start", "camera": "cam1", "recipe": "r", "roi": [0, 0, 40, True]}, "field 'roi'"),
        ({"action": "start", "camera": "cam1", "recipe": "r", "target_frr": 0.5}, "field 'target_frr'"),
        ({"action": "start", "camera": "cam1", "recipe": "r", "target_frr": True}, "field 'target_frr'"),
        ({"action": "start", "camera": "cam1", "recipe": "CON"}, "reserved device name"),
        ({"action": "finish", "camera": "cam1", "switch": "yes"}, "field 'switch' must be bool"),
        ({"action": "remove", "camera": "cam1"}, "missing field 'name'"),
        ({"action": "add", "camera": None}, "missing field 'camera'"),
    ],
)
def test_an_enroll_body_out_of_bounds_is_refused_naming_the_field(body: dict, expected: str) -> None:
    from anomalygpt_edge.runtime.line.command_bodies import CommandError, enroll_body

    with pytest.raises(CommandError) as refused:
        enroll_body(body)
    assert expected in str(refused.value), str(refused.value)


def test_an_enroll_start_within_bounds_carries_the_shared_value_types() -> None:
    from anomalygpt_edge.runtime.line.command_bodies import EnrollStart, enroll_body

    body = enroll_body({"action": "start", "camera": "cam1", "recipe": "bracket-b", "roi": [0, 0, 64, 48], "x": 1})
    assert isinstance(body, EnrollStart) and body.roi == (0, 0, 64, 48) and body.target_frr is None
