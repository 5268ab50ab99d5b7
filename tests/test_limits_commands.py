"""MQTT control of a running daemon (real mosquitto): with no command token configured, enroll
and recipe switch are refused unless the config allows anonymous control; an enroll session and
its frames expire when idle; a cancel is answered at once, even behind a full command queue."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    write_config,
)

from anomalygpt_edge.runtime.line.config import ConfigError, load_config, parse_config
from anomalygpt_edge.runtime.line.daemon import Daemon


def _config(tmp_path: Path, broker: Any, line: dict, device: str, commands: dict | None, fps: float = 10) -> Path:
    cameras = {"cam1": {"type": "video_file", "source": str(line["golden"]), "fps": fps}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt"}]
    path = write_config(
        tmp_path / f"{device}.yaml", broker, cameras, recipes, tmp_path / "store", line["bundle"], device
    )
    if commands is not None:
        cfg = json.loads(path.read_text())
        cfg["commands"] = commands
        path.write_text(json.dumps(cfg))
    return path


def _send(sub: Subscriber, device: str, command: str, body: dict) -> bytes:
    corr = uuid.uuid4().bytes
    sub.publish(
        f"anomalygpt/{device}/cmd/{command}", json.dumps(body), response_topic=f"tech/{device}", correlation=corr
    )
    return corr


def _reply(sub: Subscriber, device: str, corr: bytes, timeout: float = 10) -> dict:
    got = sub.wait_for(
        lambda m: m.topic == f"tech/{device}" and bytes(m.properties.CorrelationData or b"") == corr, timeout=timeout
    )
    return got[0].json()


def _ask(sub: Subscriber, device: str, command: str, body: dict, timeout: float = 10) -> dict:
    return _reply(sub, device, _send(sub, device, command, body), timeout)


def test_without_a_token_anonymous_enroll_and_recipe_switch_are_refused(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    cfg = load_config(_config(tmp_path, broker, line, "anon", None))
    assert cfg.commands.allow_anonymous_control is False and cfg.commands.token is None
    sub = Subscriber(broker, ["tech/anon"])
    daemon = Daemon(cfg).start()
    try:
        start = _ask(sub, "anon", "enroll", {"action": "start", "camera": "cam1", "recipe": "CON"})
        switch = _ask(sub, "anon", "recipe", {"action": "switch", "camera": "cam1", "recipe": "bracket"})
        listed = _ask(sub, "anon", "recipe", {"action": "list"})
        counted = daemon.commands.gate.stats.to_json()["rejected"]
    finally:
        daemon.stop()
        sub.close()
    for refused in (start, switch):
        assert refused["ok"] is False and refused["error"].startswith("not authorized"), refused
        assert "allow_anonymous_control" in refused["error"]
    assert listed["ok"] is True, "reading the recipe list changes nothing and stays open"
    assert counted == {"unauthorized": 2}
    assert not (tmp_path / "store" / "CON").exists(), "no recipe folder was created"


def test_an_idle_enroll_session_expires_and_its_frames_are_dropped(tmp_path: Path, broker: Any, line: dict) -> None:
    commands = {"allow_anonymous_control": True, "enroll_session_timeout_s": 1}
    sub = Subscriber(broker, ["tech/exp"])
    daemon = Daemon(load_config(_config(tmp_path, broker, line, "exp", commands))).start()
    try:
        start = _ask(sub, "exp", "enroll", {"action": "start", "camera": "cam1", "recipe": "temp"})
        added = _ask(sub, "exp", "enroll", {"action": "add", "camera": "cam1"})
        deadline = time.monotonic() + 8
        while daemon.commands.sessions and time.monotonic() < deadline:  # expired by the commands thread's tick
            time.sleep(0.1)
        assert not daemon.commands.sessions, "the idle session (and its frame) is gone"
        late = _ask(sub, "exp", "enroll", {"action": "add", "camera": "cam1"})
        expired = daemon.commands.sessions_expired
        again = _ask(sub, "exp", "enroll", {"action": "start", "camera": "cam1", "recipe": "temp"})
    finally:
        daemon.stop()
        sub.close()
    assert start["ok"] and start["expires_after_idle_s"] == 1 and added["ok"] and added["count"] == 1
    assert late["ok"] is False and "expired after 1 s idle" in late["error"], late
    assert expired == 1 and again["ok"], "a new session can be started at once"


def test_a_cancel_is_answered_at_once_even_behind_a_full_command_queue(tmp_path: Path, broker: Any, line: dict) -> None:
    # One frame every 10 s: each 'add' waits 2 s for a new frame, so 20 of them fill the queue.
    commands = {"allow_anonymous_control": True}
    sub = Subscriber(broker, ["tech/cnq"])
    daemon = Daemon(load_config(_config(tmp_path, broker, line, "cnq", commands, fps=0.1))).start()
    try:
        assert _ask(sub, "cnq", "enroll", {"action": "start", "camera": "cam1", "recipe": "temp"})["ok"]
        adds = [_send(sub, "cnq", "enroll", {"action": "add", "camera": "cam1"}) for _ in range(20)]
        busy = _reply(sub, "cnq", adds[-1])  # the queue is full by now
        t0 = time.monotonic()
        cancel = _ask(sub, "cnq", "enroll", {"action": "cancel", "camera": "cam1"}, timeout=5)
        answered_in = time.monotonic() - t0
        add_replies = [_reply(sub, "cnq", c, timeout=15) for c in adds]
        again = _ask(sub, "cnq", "enroll", {"action": "cancel", "camera": "cam1"})
    finally:
        daemon.stop()
        sub.close()
    assert busy["ok"] is False and "busy" in busy["error"]
    assert cancel["ok"] is True and cancel["was_open"] is True and cancel["recipe"] == "temp", cancel
    assert answered_in < 1.5, f"the cancel waited {answered_in:.1f} s behind queued commands"
    errors = [r["error"] for r in add_replies if not r["ok"]]
    after = [e for e in errors if "cancelled" in e or "no enrollment open" in e]
    before = [e for e in errors if "busy" in e or "delivered no new frame" in e]  # queue full, or waited in vain
    assert len(after) >= 5 and len(after) + len(before) == len(errors), errors
    assert sum(r["ok"] for r in add_replies) <= 2, "only adds that ran before the cancel took a frame"
    assert again["ok"] is True and again["was_open"] is False, "cancelling twice is no error"


def test_the_configs_recipe_names_are_the_recipe_stores_names() -> None:
    base = "device: {id: d}\ncameras: {c: {type: video_file, source: a}}\nrecipes: [{camera: c, recipe: %s}]\n"
    assert parse_config(base % "bracket-b.v2").recipes[0].recipe == "bracket-b.v2"
    for name, why in (
        ("'a:b'", "invalid"),
        ("CON", "reserved device name"),
        ("nul.txt", "reserved"),
        ("'.x'", "invalid"),
    ):
        with pytest.raises(ConfigError, match=rf"<config>:3: recipes\[0\]\.recipe: recipe name .* {why}"):
            parse_config(base % name)
