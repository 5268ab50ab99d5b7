"""Proposals on the line (issue 14, part 3) against the real daemon, real engines and a real mosquitto:
false rejects labelled good over MQTT become a proposal (``cmd/recipe propose``) whose goldens and
threshold the camera's next verdicts use once it is applied; a rollback brings the old version back;
a stale proposal, a sender without the role and malformed bodies are refused and change nothing;
auto-apply (``learn:``) applies within its bounds and is announced, and out of them stays pending
with the reason in the status."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    write_config,
)
from pytest import approx  # verdicts carry the threshold rounded to 5 significant digits

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeStore
from anomalygpt_edge.runtime.tools import synthetic
from anomalygpt_edge.runtime.web.daemon_station import DaemonStation

TECH = "station-tech"


def _ask(sub: Subscriber, device: str, command: str, body: dict | bytes, timeout: float = 240) -> dict:
    corr = uuid.uuid4().bytes
    payload = body if isinstance(body, bytes) else json.dumps(body)
    sub.publish(f"anomalygpt/{device}/cmd/{command}", payload, response_topic=f"tech/{device}", correlation=corr)
    got = sub.wait_for(
        lambda m: m.topic == f"tech/{device}" and bytes(m.properties.CorrelationData or b"") == corr, timeout=timeout
    )
    return got[0].json()


def _strict_store(line: dict, root: Path, value: float | None = None) -> tuple[RecipeStore, Recipe]:
    """A copy of the module's store whose live ``bracket`` rejects good parts (threshold ``value``,
    default half the lowest golden score): the line's false rejects the labels will correct."""
    shutil.copytree(line["store"], root / "store")
    store = RecipeStore(root / "store")
    old = store.load("bracket")
    assert old.threshold is not None
    low = value if value is not None else 0.5 * min(s.score for s in old.samples if s.score is not None)
    strict = store.commit(replace(old, threshold=replace(old.threshold, value=low)), change={"by": "test"})
    return store, strict


def _config(tmp_path: Path, broker: Any, line: dict, device: str, learn: dict | None = None) -> Path:
    video = tmp_path / "new-goods.avi"
    synthetic.write_golden_video(video, 12, seed=5)  # good parts the recipe was not enrolled with
    cameras = {"cam1": {"type": "video_file", "source": str(video), "fps": 20, "loop": True}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 30000}]
    store = tmp_path / "store"
    path = write_config(tmp_path / f"{device}.yaml", broker, cameras, recipes, store, line["bundle"], device)
    cfg = json.loads(path.read_text())
    cfg["commands"] = {"allowed_client_ids": [TECH]}
    cfg["storage"]["archive_ok_sample_rate"] = 1.0  # every image kept: each labelled part can be re-scored
    if learn is not None:
        cfg["learn"] = {"bracket": learn}
    path.write_text(json.dumps(cfg))
    return path


def _label_goods(sub: Subscriber, device: str, daemon: Daemon, n: int) -> list[dict]:
    """``n`` triggered good parts (once the camera delivers frames), each labelled good over MQTT."""
    online = lambda m: m.topic.endswith("/status") and m.json()["cameras"]["cam1"]["status"] == "online"  # noqa: E731
    sub.wait_for(online, timeout=60)
    verdicts = [_ask(sub, device, "trigger", {"camera": "cam1", "part_id": f"P{i}"}, timeout=60) for i in range(n)]
    assert all(v["verdict"] in ("OK", "NG") for v in verdicts), [(v["verdict"], v.get("reason")) for v in verdicts]
    assert daemon.archive is not None
    daemon.archive.flush()
    return [
        _ask(sub, device, "label", {"id": v["id"], "label": "good", "client_id": TECH}, timeout=30) for v in verdicts
    ]


def test_labelled_false_rejects_are_proposed_applied_over_mqtt_and_rolled_back(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    store, strict = _strict_store(line, tmp_path, value=1e-6)  # every part is a false reject
    path = _config(tmp_path, broker, line, "prp")
    sub = Subscriber(broker, ["anomalygpt/prp/#", "tech/prp"])
    daemon = Daemon(load_config(path)).start()
    r: dict[str, Any] = {}
    try:
        labels = _label_goods(sub, "prp", daemon, 5)
        drift = daemon.drift_states().get("cam1") or {}
        r["intruder"] = _ask(sub, "prp", "recipe", {"action": "propose", "recipe": "bracket", "client_id": "hmi"})
        r["no recipe"] = _ask(sub, "prp", "recipe", {"action": "apply", "client_id": TECH})
        bad_version = {"action": "apply", "recipe": "bracket", "expect_base_version": "2", "client_id": TECH}
        r["bad version"] = _ask(sub, "prp", "recipe", bad_version)
        r["bad name"] = _ask(sub, "prp", "recipe", {"action": "propose", "recipe": "../x", "client_id": TECH})
        r["nothing pending"] = _ask(sub, "prp", "recipe", {"action": "apply", "recipe": "bracket", "client_id": TECH})
        r["not json"] = _ask(sub, "prp", "recipe", b"{oops")
        r["untouched"] = store.load("bracket").bank_version
        proposed = _ask(sub, "prp", "recipe", {"action": "propose", "recipe": "bracket", "client_id": TECH})
        pending = daemon.proposals.pending("bracket")
        r["wrong base"] = _ask(
            sub,
            "prp",
            "recipe",
            {"action": "apply", "recipe": "bracket", "expect_base_version": 12345, "client_id": TECH},
        )
        r["intruder apply"] = _ask(sub, "prp", "recipe", {"action": "apply", "recipe": "bracket", "client_id": "hmi"})
        applied = _ask(sub, "prp", "recipe", {"action": "apply", "recipe": "bracket", "client_id": TECH})
        after = _ask(sub, "prp", "trigger", {"camera": "cam1", "part_id": "A1"}, timeout=60)
        status = sub.wait_for(
            lambda m: (
                m.topic == "anomalygpt/prp/status"
                and any(c.get("action") == "apply" for c in m.json().get("recipe_changes") or [])
            ),
            timeout=30,
        )[0].json()
        rolled = _ask(sub, "prp", "recipe", {"action": "rollback", "recipe": "bracket", "client_id": TECH})
        back = _ask(sub, "prp", "trigger", {"camera": "cam1", "part_id": "B1"}, timeout=60)
        # A proposal computed on the strict version, then the applied one made live again: stale.
        again = _ask(sub, "prp", "recipe", {"action": "propose", "recipe": "bracket", "client_id": TECH})
        forward = _ask(
            sub,
            "prp",
            "recipe",
            {"action": "rollback", "recipe": "bracket", "version": applied["bank_version"], "client_id": TECH},
        )
        r["stale"] = _ask(sub, "prp", "recipe", {"action": "apply", "recipe": "bracket", "client_id": TECH})
        discarded = _ask(sub, "prp", "recipe", {"action": "discard", "recipe": "bracket", "client_id": TECH})
        r["discarded twice"] = _ask(sub, "prp", "recipe", {"action": "discard", "recipe": "bracket", "client_id": TECH})
        # A label from the station's button reaches the drift watch too (the camera's current watch).
        last = _ask(sub, "prp", "trigger", {"camera": "cam1", "part_id": "S1"}, timeout=60)
        assert daemon.archive is not None
        daemon.archive.flush()
        station = DaemonStation(daemon)
        try:
            station.label_verdict(last["id"], "defect", "anna")
        finally:
            station.stop()
        station_drift = daemon.drift_states().get("cam1") or {}
    finally:
        daemon.stop()
        sub.close()

    assert all(x["ok"] for x in labels), labels
    assert drift.get("labelled_frr") == 1.0, drift  # every label reached the drift watch: 5 goods, 5 rejected
    ids = {x["id"] for x in labels}
    expected = {
        "intruder": "not authorized: client id 'hmi' may not send recipe",
        "no recipe": "missing field 'recipe'",
        "bad version": "field 'expect_base_version' must be int",
        "bad name": "recipe",
        "nothing pending": "no pending proposal; propose first",
        "not json": "malformed JSON",
        "wrong base": f"is on bank version {strict.bank_version}, not 12345",
        "intruder apply": "not authorized",
        "stale": f"stale: it was computed on bank version {strict.bank_version}",
        "discarded twice": "no pending proposal to discard",
    }
    for name, message in expected.items():
        assert r[name]["ok"] is False and message in r[name]["error"], (name, r[name])
    assert r["untouched"] == strict.bank_version, "no refused command changed the recipe"

    assert proposed["ok"], proposed
    p = proposed["proposal"]
    assert p["base_bank_version"] == strict.bank_version and p == pending.to_json()
    assert p["add_goldens"] and set(p["add_goldens"]) <= ids, p  # the labelled false rejects, by verdict id
    assert set(p["add_goldens"]) | set(p["refused_goldens"]) == ids
    assert p["before"]["false_rejects"] == 5 and p["after"]["false_rejects"] < 5, p
    assert p["threshold_before"] == approx(1e-6) and p["threshold_after"] > 1e-3, p

    assert applied["ok"] and applied["previous"] == strict.bank_version, applied
    assert applied["bank_version"] > strict.bank_version and applied["cameras"] == ["cam1"]
    assert applied["threshold"] == approx(p["threshold_after"])
    assert after["bank_version"] == applied["bank_version"], after  # the camera reloaded the new version
    assert after["threshold"] == approx(p["threshold_after"], rel=1e-4), after
    change = next(c for c in status["recipe_changes"] if c["action"] == "apply")
    assert (change["from"], change["to"], change["by"]) == (strict.bank_version, applied["bank_version"], TECH)

    assert rolled["ok"] and rolled["bank_version"] == strict.bank_version, rolled
    assert back["bank_version"] == strict.bank_version and back["threshold"] == approx(1e-6, rel=1e-4), back
    assert again["ok"] and forward["ok"], (again, forward)
    assert discarded["ok"], discarded
    assert station_drift.get("labelled_defect") == 1, station_drift
    assert store.load("bracket").bank_version == applied["bank_version"], "the stale apply changed nothing"
    assert not (store.folder("bracket") / "proposal.json").exists(), "a discarded proposal is gone on restart too"


def _auto_run(tmp_path: Path, broker: Any, line: dict, device: str, learn: dict, want: Any) -> tuple[dict, int, int]:
    """Label three false rejects good with ``learn`` on; the first status matching ``want``, the strict
    version and the live one after."""
    store, strict = _strict_store(line, tmp_path)
    path = _config(tmp_path, broker, line, device, learn)
    sub = Subscriber(broker, [f"anomalygpt/{device}/status", f"tech/{device}"])
    daemon = Daemon(load_config(path)).start()
    try:
        labels = _label_goods(sub, device, daemon, 4)
        assert all(x["ok"] for x in labels), labels
        status = sub.wait_for(lambda m: m.topic.endswith("/status") and want(m.json()), timeout=300)[0].json()
        live = store.load("bracket").bank_version
        pending_file = (store.folder("bracket") / "proposal.json").exists()
    finally:
        daemon.stop()
        sub.close()
    status["pending_file"] = pending_file
    return status, strict.bank_version, live


def test_auto_apply_within_its_bounds_applies_and_is_announced(tmp_path: Path, broker: Any, line: dict) -> None:
    learn = {"auto_apply": True, "every_labels": 4, "min_labels": 4, "max_threshold_change": 1000}
    status, strict, live = _auto_run(
        tmp_path,
        broker,
        line,
        "auto1",
        learn,
        lambda s: any(c.get("by") == "auto" for c in s.get("recipe_changes") or []),
    )
    change = next(c for c in status["recipe_changes"] if c.get("by") == "auto")
    assert change["action"] == "apply" and change["from"] == strict and change["to"] == live > strict, change
    assert "auto-apply within bounds" in change["reason"] and "max_threshold_change 1000" in change["reason"]
    notices = [n["message"] for n in status["proposals"]["notices"]]
    assert any("applied automatically" in n for n in notices), notices
    assert status["proposals"]["pending"] == {} and not status["pending_file"], status["proposals"]


def test_auto_apply_out_of_its_bounds_stays_pending_with_the_reason(tmp_path: Path, broker: Any, line: dict) -> None:
    learn = {"auto_apply": True, "every_labels": 4, "min_labels": 4}  # max_threshold_change 0.25 by default
    status, strict, live = _auto_run(
        tmp_path,
        broker,
        line,
        "auto2",
        learn,
        lambda s: bool(((s.get("proposals") or {}).get("pending") or {}).get("bracket", {}).get("held")),
    )
    held = status["proposals"]["pending"]["bracket"]
    assert "max_threshold_change is 25%" in held["held"], held
    assert held["base_bank_version"] == strict and held["by"] == "auto" and not held["stale"], held
    assert live == strict, "nothing was applied"
    assert status["pending_file"], "the held proposal is kept for the technician (and a restart)"
    notices = [n["message"] for n in status["proposals"]["notices"]]
    assert any("not applied automatically" in n and "max_threshold_change" in n for n in notices), notices
    assert not any(c.get("by") == "auto" for c in status.get("recipe_changes") or [])
