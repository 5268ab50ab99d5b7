"""``cmd/recipe`` ``rollback`` and ``versions`` on a running daemon (real mosquitto, real engines):
a rollback makes the camera inspect with the old version's threshold at once and the status
announces it; a sender without the role is refused and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    delivering,
    line_fixture,
    two_bracket_versions,
    write_config,
)
from pytest import approx  # verdicts carry the threshold rounded to 5 significant digits

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon


def test_an_mqtt_rollback_makes_the_camera_inspect_with_the_old_threshold_and_a_wrong_role_changes_nothing(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    store, old, new = two_bracket_versions(tmp_path, line)
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 5000}]
    path = write_config(tmp_path / "rb.yaml", broker, cameras, recipes, tmp_path / "store", line["bundle"], "rbk")
    cfg = json.loads(path.read_text())
    cfg["commands"] = {"allowed_client_ids": ["station-tech"]}
    path.write_text(json.dumps(cfg))
    sub = Subscriber(broker, ["anomalygpt/rbk/#", "tech/rbk"])
    daemon = delivering(Daemon(load_config(path)).start())
    try:
        before = sub.ask("rbk", "trigger", {"camera": "cam1", "part_id": "p1"})
        listed = sub.ask("rbk", "recipe", {"action": "versions", "recipe": "bracket", "client_id": "station-tech"})
        refused = sub.ask("rbk", "recipe", {"action": "rollback", "recipe": "bracket", "client_id": "hmi-operator"})
        still = sub.ask("rbk", "trigger", {"camera": "cam1", "part_id": "p2"})
        bad = sub.ask(
            "rbk",
            "recipe",
            {"action": "rollback", "recipe": "bracket", "version": 999, "client_id": "station-tech"},
        )
        rolled = sub.ask("rbk", "recipe", {"action": "rollback", "recipe": "bracket", "client_id": "station-tech"})
        status = sub.wait_for(
            lambda m: m.topic == "anomalygpt/rbk/status" and bool(m.json().get("recipe_changes")), timeout=20
        )[0].json()
        after = sub.ask("rbk", "trigger", {"camera": "cam1", "part_id": "p3"})
    finally:
        daemon.stop()
        sub.close()
    assert (
        before["threshold"] == approx(new.threshold.value, rel=1e-4) and before["bank_version"] == new.bank_version
    ), before
    assert listed["ok"] and [v["bank_version"] for v in listed["versions"]][:2] == [new.bank_version, old.bank_version]
    assert listed["versions"][0]["by"] == "anna" and listed["versions"][0]["reason"] == "fewer false rejects"
    assert refused["ok"] is False and refused["error"].startswith("not authorized"), refused
    assert still["threshold"] == approx(new.threshold.value, rel=1e-4), "the refused rollback changed nothing"
    assert bad["ok"] is False and "no kept version 999" in bad["error"], bad
    assert rolled["ok"] and rolled["bank_version"] == old.bank_version and rolled["previous"] == new.bank_version
    assert rolled["cameras"] == ["cam1"] and rolled["threshold"] == old.threshold.value, rolled
    change = status["recipe_changes"][-1]
    assert (change["recipe"], change["from"], change["to"], change["by"]) == (
        "bracket",
        new.bank_version,
        old.bank_version,
        "station-tech",
    )
    assert status["cameras"]["cam1"]["live"] is True
    assert after["threshold"] == approx(old.threshold.value, rel=1e-4) and after["bank_version"] == old.bank_version, (
        after
    )
    assert store.load("bracket").to_json() == old.to_json()
