"""The station's "the line learns" API (issue 14) on the real station with the line daemon behind it:
drifted good parts are rejected, an operator labels them good, a technician proposes, applies (the
camera's recipe gets a new bank version) and rolls back (the old one is live again); a discarded
proposal is gone; a proposal the recipe moved away from is refused with 409; an operator may look
but not change, and every refusal changes nothing; malformed bodies get one line naming the field.
"""

from __future__ import annotations

from typing import Any

import parts
import pytest
from daemon_fixtures import broker_fixture  # noqa: F401 - fixture used by name
from learn_fixtures import (  # noqa: F401 - fixtures used by name
    DRIFTED,
    audit_lines,
    feed_drifted,
    learning_line,
    login,
    plate_store,
    wait_until,
    wait_verdicts,
)
from test_web_http import _png_b64, fake_server, logged_in, users_json  # noqa: F401 - fixtures used by name


def _live_version(daemon: Any) -> int:
    """The bank version the camera inspects with now (the daemon's own inspector)."""
    return int(daemon.inspectors["inbox"].recipe.bank_version)


def test_labelled_false_rejects_are_proposed_applied_and_rolled_back_over_http(
    learning_line: Any,  # noqa: F811 - the imported fixture
) -> None:
    line = learning_line()
    server, daemon, audit = line["server"], line["daemon"], line["audit"]
    theo, olga = login(server.url, "theo"), login(server.url, "olga")
    v0 = _live_version(daemon)
    feed_drifted(line["inbox"])
    rows = wait_verdicts(olga, DRIFTED)
    rejected = [r for r in rows if r["verdict"] == "NG"]
    assert len(rejected) >= DRIFTED - 1, [(r["verdict"], r["score"], r["threshold"]) for r in rows]
    for r in rejected:  # the operator says: these were good parts
        assert olga.post(f"/api/verdicts/{r['id']}/label", {"label": "good"}).status == 200
    counts = olga.get("/api/recipes/plate/labelled").json()
    assert (counts["good"], counts["false_rejects"], counts["defect"]) == (len(rejected), len(rejected), 0)

    # Looking is for everyone, changing for technicians: refused, nothing changes.
    none = olga.get("/api/recipes/plate/proposal")
    assert none.status == 404 and "no pending proposal" in none.json()["error"]
    assert olga.post("/api/recipes/plate/proposal", {}).status == 403
    assert olga.get("/api/recipes/plate/proposal").status == 404, "an operator's propose computed nothing"

    first = theo.post("/api/recipes/plate/proposal", {})
    assert first.status == 200, first.body
    p = first.json()
    assert p["base_bank_version"] == v0 and p["stale"] is False and p["live_bank_version"] == v0
    assert p["before"]["false_rejects"] == len(rejected) and p["before"]["n_good"] == len(rejected)
    assert sorted(p["add_goldens"]) == sorted(r["id"] for r in rejected), p["refused_goldens"]
    assert p["after"]["false_rejects"] < p["before"]["false_rejects"]
    assert p["before"]["false_reject_rate"] <= p["before"]["false_reject_upper_95"] <= 1
    assert any("would be false rejects today" in n for n in p["notes"]), p["notes"]
    assert olga.get("/api/recipes/plate/proposal").json()["add_goldens"] == p["add_goldens"]
    for path in ("/api/recipes/plate/proposal/apply", "/api/recipes/plate/proposal/discard"):
        denied = olga.post(path, {})
        assert denied.status == 403 and "technician" in denied.json()["error"]
    assert _live_version(daemon) == v0 and theo.get("/api/recipes/plate/proposal").status == 200

    # Malformed bodies: one line naming the field; nothing changes.
    bad = theo.post("/api/recipes/plate/proposal/apply", {"base_bank_version": "3"})
    assert bad.status == 400 and "'base_bank_version'" in bad.json()["error"] and "\n" not in bad.json()["error"]
    bad = theo.post("/api/recipes/plate/rollback", {"version": -1})
    assert bad.status == 400 and "'version'" in bad.json()["error"]
    assert theo.post("/api/recipes/nope/proposal", {}).status == 404
    assert _live_version(daemon) == v0

    # Discard: gone.
    assert theo.post("/api/recipes/plate/proposal/discard", {}).json()["discarded"] is True
    assert theo.get("/api/recipes/plate/proposal").status == 404
    assert theo.post("/api/recipes/plate/proposal/discard", {}).status == 404

    # Stale: the recipe moves (a golden part enrolled meanwhile) after the proposal: 409, nothing applied.
    assert theo.post("/api/recipes/plate/proposal", {}).status == 200
    moved = theo.post(
        "/api/enroll/upload",
        {"recipe": "plate", "files": [{"name": "late.png", "data": _png_b64(parts.good_part(77))}]},
    )
    assert moved.status == 200, moved.body
    v1 = daemon.store.load("plate").bank_version
    assert v1 > v0
    stale = theo.post("/api/recipes/plate/proposal/apply", {})
    assert stale.status == 409 and f"bank version {v0}" in stale.json()["error"], stale.body
    assert theo.get("/api/recipes/plate/proposal").json()["stale"] is True
    assert daemon.store.load("plate").bank_version == v1, "a stale apply changes nothing"
    daemon.switch_recipe("inbox", "plate")  # the camera takes the moved recipe (the station's upload does not)
    assert _live_version(daemon) == v1

    # Apply: one commit, a new bank version, the camera inspects with it; the old one is kept.
    fresh = theo.post("/api/recipes/plate/proposal", {}).json()
    assert fresh["base_bank_version"] == v1 and not fresh["stale"]
    other = theo.post("/api/recipes/plate/proposal/apply", {"base_bank_version": v0})  # the page showed an older one
    assert other.status == 409 and "look at it again" in other.json()["error"], other.body
    assert daemon.store.load("plate").bank_version == v1
    applied = theo.post("/api/recipes/plate/proposal/apply", {"reason": "new lighting", "base_bank_version": v1})
    assert applied.status == 200, applied.body
    v2 = applied.json()["bank_version"]
    assert v2 > v1 and applied.json()["base_bank_version"] == v1
    wait_until("the camera on the applied version", lambda: _live_version(daemon) == v2, 30)
    versions = theo.get("/api/recipes/plate/versions").json()
    live = next(v for v in versions if v["live"])
    assert live["bank_version"] == v2 and live["by"] == "theo" and live["reason"] == "new lighting"
    assert live["previous"] == v1 and any(v["bank_version"] == v1 and not v["live"] for v in versions)
    assert theo.get("/api/recipes/plate/proposal").status == 404, "applied: nothing pending"

    # Rollback: an operator may not; the technician's one click makes the previous version live again.
    assert olga.post("/api/recipes/plate/rollback", {}).status == 403
    assert _live_version(daemon) == v2
    back = theo.post("/api/recipes/plate/rollback", {})
    assert back.status == 200, back.body
    assert (back.json()["from"], back.json()["to"]) == (v2, v1)
    wait_until("the camera back on the previous version", lambda: _live_version(daemon) == v1, 30)
    assert [v["bank_version"] for v in theo.get("/api/recipes/plate/versions").json() if v["live"]] == [v1]

    entries = [(e["user"], e["action"], e["target"], e["details"]["ok"]) for e in audit_lines(audit)]
    learn = [e for e in entries if e[1].startswith("recipe.") and e[1] != "recipe.assign"]
    assert learn == [
        ("theo", "recipe.propose", "plate", True),
        ("theo", "recipe.propose", "nope", False),  # unknown recipe: refused, recorded
        ("theo", "recipe.discard", "plate", True),
        ("theo", "recipe.discard", "plate", False),
        ("theo", "recipe.propose", "plate", True),
        ("theo", "recipe.apply", "plate", False),
        ("theo", "recipe.propose", "plate", True),
        ("theo", "recipe.apply", "plate", False),
        ("theo", "recipe.apply", "plate", True),
        ("theo", "recipe.rollback", "plate", True),
    ], learn
    assert "recipe.propose" not in {e[1] for e in entries if e[0] == "olga"}, "a refused request is not run"


def test_drift_of_the_cameras_recipe_reaches_the_stations_cameras_and_system_in_plain_words(
    learning_line: Any,  # noqa: F811 - the imported fixture
) -> None:
    line = learning_line()
    server, daemon = line["server"], line["daemon"]
    olga = login(server.url, "olga")
    assert olga.get("/api/cameras").json()[0]["drift"] is None, "no part judged yet: nothing to say"
    feed_drifted(line["inbox"])
    rows = wait_verdicts(olga, DRIFTED)
    rejected = [r for r in rows if r["verdict"] == "NG"][:3]
    assert len(rejected) == 3
    for r in rejected:
        assert olga.post(f"/api/verdicts/{r['id']}/label", {"label": "good"}).status == 200
    cam = wait_until(
        "a drift message on the station's camera",
        lambda: (c := olga.get("/api/cameras").json()[0]).get("drift") and c["drift"].get("message") and c,
    )
    drift = cam["drift"]
    assert drift["recipe"] == "plate" and drift["message"].startswith("recipe plate: ")
    assert drift["message"] == daemon.drift_states()["inbox"]["message"]
    assert drift["labelled_good"] == 3 and drift["labelled_frr"] == 1.0
    system = olga.get("/api/system").json()
    assert any(w.startswith("camera inbox: recipe plate: ") for w in system["warnings"]), system["warnings"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/recipes/part-a/proposal/apply", {"base_bank_version": "3"}, "base_bank_version"),
        ("/api/recipes/part-a/proposal/apply", {"base_bank_version": -1}, "base_bank_version"),
        ("/api/recipes/part-a/proposal/apply", {"reason": "x" * 501}, "reason"),
        ("/api/recipes/part-a/proposal/apply", {"reason": 5}, "reason"),
        ("/api/recipes/part-a/rollback", {"version": 1.5}, "version"),
        ("/api/recipes/part-a/rollback", {"version": True}, "version"),
    ],
)
def test_a_bad_learn_body_is_refused_with_one_line_naming_the_field_before_the_station_is_called(
    fake_server: Any,  # noqa: F811 - the imported fixture
    path: str,
    body: dict[str, Any],
    field: str,
) -> None:
    server, station = fake_server
    r = logged_in(server, "theo").post(path, body)
    assert r.status == 400, r.body
    message = r.json()["error"]
    assert f"'{field}'" in message and "\n" not in message, message
    assert station.calls == []


def test_learn_routes_need_a_recipe_name_of_the_stores_own_kind(fake_server: Any) -> None:  # noqa: F811
    server, station = fake_server
    theo = logged_in(server, "theo")
    for path in ("/api/recipes/..%2Fetc/proposal", "/api/recipes/a%20b/rollback", "/api/recipes/-x/proposal/apply"):
        assert theo.post(path, {}).status == 404, path
    assert station.calls == []
