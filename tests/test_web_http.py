"""The station's HTTP API: every mutating route guarded (login, CSRF, origin, role), audited, and
an enrollment driven over HTTP against a real station with a video-file camera."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import cv2
import pytest
from station_http import Client
from station_run import hashed_users, serve, serve_video_station
from station_scene import BLOCK, PART_ROI, is_defective, read_video, write_video

from anomalygpt_edge.runtime.web.server import ROUTES, StationServer, WebConfig
from anomalygpt_edge.runtime.web.station import HistoryQuery, NotFoundError

PASSWORDS = {"olga": "operator-pw", "theo": "technician-pw", "ada": "admin-pw-123"}
ROLES = {"olga": "operator", "theo": "technician", "ada": "admin"}
VID = "ab" * 16
SEG = "([A-Za-z0-9][A-Za-z0-9_.@-]{0,63})"  # a recipe or camera name in a route's path

# A valid body for each mutating route, so a rejection is due to the guard, never to the body.
BODIES: dict[str, dict[str, Any]] = {
    "/api/logout": {},
    "/api/enroll/start": {"recipe": "part-a", "camera": "cam1", "roi": [0, 0, 64, 64]},
    "/api/enroll/capture": {"recipe": "part-a", "camera": "cam1"},
    "/api/enroll/upload": {"recipe": "part-a", "files": [{"name": "a.png", "data": "aGk="}]},
    "/api/enroll/remove": {"recipe": "part-a", "sample": "a.png"},
    "/api/enroll/finish": {"recipe": "part-a", "camera": "cam1"},
    "/api/enroll/defect/upload": {
        "recipe": "part-a",
        "files": [{"name": "d.png", "data": "aGk=", "mask": "aGk=", "defect_type": "scratch"}],
    },
    "/api/enroll/defect/capture": {"recipe": "part-a", "camera": "cam1", "defect_type": "scratch"},
    "/api/enroll/defect/mark": {"recipe": "part-a", "sample": "a.png", "mask": "aGk="},
    "/api/enroll/defect/remove": {"recipe": "part-a", "defect": "d.png"},
    "/api/recipes/assign": {"camera": "cam1", "recipe": "part-a"},
    "/api/recipes/delete": {"recipe": "part-a"},
    "/api/ask": {"verdict_id": VID, "question": "why?"},
    "/api/users": {"action": "set", "name": "newbie", "role": "operator", "password": "newbie-pw"},
    "/api/verdicts/([0-9a-f-]{8,64})/label": {"label": "good"},
    f"/api/recipes/{SEG}/proposal": {},
    f"/api/recipes/{SEG}/proposal/apply": {"reason": "line changed", "base_bank_version": 3},
    f"/api/recipes/{SEG}/proposal/discard": {},
    f"/api/recipes/{SEG}/rollback": {"version": 2},
}
MUTATING = [r for r in ROUTES if r.method == "POST" and r.role is not None]


def url(pattern: str) -> str:
    """A route's path with its verdict id (the label route) or recipe name (the learn routes) filled in."""
    return pattern.replace("([0-9a-f-]{8,64})", VID).replace(SEG, "part-a")


ROLE_RANK = ["viewer", "operator", "technician", "admin"]  # auth.ROLES


class FakeStation:
    """Records every call: a rejected request must never reach the station."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        def call(*args: Any, **kw: Any) -> Any:
            self.calls.append((name, args))
            if name == "ask":
                args[3]("It is ")
                args[3]("fine.")
                return {"text": "It is fine.", "source": "llm"}
            if name == "history_item":
                return {"id": args[0]}
            if name in ("cameras", "recipes", "history"):
                return []
            if name == "recipe" and args[0] == "missing":
                raise NotFoundError("no recipe 'missing'")
            return {"recipe": "part-a", "live": True, "k": 3}

        return call


@pytest.fixture(scope="module")
def users_json(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The three users, hashed once per module (scrypt is slow on purpose)."""
    return hashed_users(tmp_path_factory.mktemp("users"), PASSWORDS, ROLES)


@pytest.fixture()
def fake_server(tmp_path: Path, users_json: bytes):
    station = FakeStation()
    server = serve(station, tmp_path, users_json)
    yield server, station
    server.stop()


def logged_in(server: StationServer, user: str) -> Client:
    c = Client(server.url)
    assert c.login(user, PASSWORDS[user]).status == 200
    return c


def test_the_route_table_covers_every_enrollment_recipe_and_user_change():
    paths = {r.pattern for r in MUTATING}
    assert set(BODIES) == paths
    for r in MUTATING:
        if r.pattern.startswith(("/api/enroll/", "/api/recipes/")):
            assert ROLE_RANK.index(r.role) >= ROLE_RANK.index("technician"), r
            assert r.audit, f"{r.pattern} changes recipes and must be audited"


@pytest.mark.parametrize("route", MUTATING, ids=lambda r: r.pattern)
def test_every_mutating_route_rejects_an_unauthenticated_request(fake_server, route):
    server, station = fake_server
    c = Client(server.url)
    r = c.post(url(route.pattern), BODIES[route.pattern])
    assert r.status == 401, r.body
    # A forged cookie is no better than none.
    c.cookie = "agpt_session=forged-token"
    c.csrf = "forged"
    assert c.post(url(route.pattern), BODIES[route.pattern]).status == 401
    assert station.calls == []


@pytest.mark.parametrize("route", MUTATING, ids=lambda r: r.pattern)
def test_every_mutating_route_rejects_a_missing_or_wrong_csrf_token(fake_server, route):
    server, station = fake_server
    c = logged_in(server, "ada")
    assert c.post(url(route.pattern), BODIES[route.pattern], csrf=False).status == 403
    assert c.post(url(route.pattern), BODIES[route.pattern], headers={"X-CSRF-Token": "x" * 43}).status == 403
    other = logged_in(server, "theo")  # another session's token does not fit this session
    assert c.post(url(route.pattern), BODIES[route.pattern], headers={"X-CSRF-Token": other.csrf}).status == 403
    assert station.calls == []


@pytest.mark.parametrize("route", MUTATING, ids=lambda r: r.pattern)
def test_every_mutating_route_rejects_a_role_below_its_own(fake_server, route):
    server, station = fake_server
    lower = [u for u, role in ROLES.items() if ROLE_RANK.index(role) < ROLE_RANK.index(route.role)]
    for user in lower:
        r = logged_in(server, user).post(url(route.pattern), BODIES[route.pattern])
        assert r.status == 403, (user, r.body)
        assert route.role in r.json()["error"]
    assert station.calls == []


@pytest.mark.parametrize("route", MUTATING, ids=lambda r: r.pattern)
def test_every_mutating_route_refuses_a_cross_origin_post(fake_server, route):
    server, station = fake_server
    c = logged_in(server, "ada")
    r = c.post(url(route.pattern), BODIES[route.pattern], headers={"Origin": "http://evil.example"})
    assert r.status == 403
    assert station.calls == []


def test_every_read_route_needs_a_login(fake_server):
    server, _ = fake_server
    c = Client(server.url)
    samples = {
        r"([A-Za-z0-9][A-Za-z0-9_.@-]{0,63})": "cam1",
        "([0-9a-f]{64})": "0" * 64,
        "([0-9a-f-]{8,64})": VID,
        "(image|heatmap)": "image",
    }
    checked = 0
    for route in ROUTES:
        if route.method != "GET" or route.role is None:
            continue
        path = route.pattern
        for pattern, value in samples.items():
            path = path.replace(pattern, value)
        assert c.get(path).status == 401, path
        checked += 1
    assert checked >= 12
    assert c.get("/api/session").json() == {"authenticated": False}


def test_a_permitted_change_reaches_the_station_and_is_audited(fake_server, tmp_path):
    server, station = fake_server
    c = logged_in(server, "theo")
    r = c.post("/api/enroll/finish", {"recipe": "part-a", "camera": "cam1"})
    assert r.status == 200 and r.json()["live"] is True
    assert station.calls == [("enroll_finish", ("part-a", "cam1", False))]
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    finish = [e for e in entries if e["action"] == "enroll.finish"]
    assert len(finish) == 1
    assert finish[0]["user"] == "theo" and finish[0]["role"] == "technician" and finish[0]["target"] == "part-a"
    assert finish[0]["details"]["ok"] is True and finish[0]["details"]["camera"] == "cam1"


def test_admin_manages_users_and_the_change_ends_the_users_sessions(fake_server, tmp_path):
    server, _ = fake_server
    theo = logged_in(server, "theo")
    admin = logged_in(server, "ada")
    r = admin.post("/api/users", {"action": "set", "name": "theo", "role": "operator", "password": "new-theo-pw"})
    assert r.status == 200
    assert theo.get("/api/cameras").status == 401, "a role change logs the user out everywhere"
    assert Client(server.url).login("theo", "technician-pw").status == 401
    assert Client(server.url).login("theo", "new-theo-pw").json()["role"] == "operator"
    assert admin.post("/api/users", {"action": "remove", "name": "nobody"}).status == 404
    actions = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["target"], a["details"]["ok"]) for a in actions if a["action"].startswith("user.")] == [
        ("user.set", "theo", True),
        ("user.remove", "nobody", False),
    ]


def test_login_cookie_is_httponly_samesite_strict_and_logout_ends_the_session(fake_server):
    server, _ = fake_server
    c = Client(server.url)
    assert c.login("olga", "wrong-password").status == 401
    r = c.login("olga", PASSWORDS["olga"])
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    token = c.cookie
    assert c.get("/api/session").json()["user"] == "olga"
    second = Client(server.url)
    second.login("olga", PASSWORDS["olga"])
    assert second.cookie != token, "every login gets a fresh session token"
    assert c.post("/api/logout").status == 200
    c.cookie = token  # replaying the old cookie after logout
    assert c.get("/api/cameras").status == 401
    assert second.get("/api/cameras").status == 200


def test_login_needs_a_json_body_and_malformed_or_oversized_bodies_are_refused(fake_server):
    server, _ = fake_server
    c = Client(server.url)
    form = c.request(
        "POST",
        "/api/login",
        raw=b"username=ada&password=admin-pw-123",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 415, "a cross-site HTML form cannot log anyone in"
    c = logged_in(server, "theo")
    bad = c.request("POST", "/api/enroll/start", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status == 400
    big = c.request("POST", "/api/enroll/start", raw=b"x" * 300_000, headers={"Content-Type": "application/json"})
    assert big.status == 413
    assert c.post("/api/enroll/start", {"recipe": "../etc", "camera": "cam1"}).status == 400
    assert c.post("/api/enroll/start", {"recipe": "ok", "roi": [0, 0, 2, 2]}).status == 400


def test_pages_are_served_with_a_strict_content_security_policy_and_no_path_traversal(fake_server):
    server, _ = fake_server
    c = Client(server.url)
    page = c.get("/")
    assert page.status == 200 and b"/static/app.js" in page.body
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    assert c.get("/static/app.js").headers["Content-Type"].startswith(("application/javascript", "text/javascript"))
    for path in ("/static/../server.py", "/static/%2e%2e/auth.py", "/../../etc/passwd", "/static/nope.js"):
        assert c.get(path).status == 404, path


def test_ask_streams_the_answer_in_chunks(fake_server):
    server, station = fake_server
    c = logged_in(server, "olga")
    r = c.post("/api/ask", {"verdict_id": VID, "question": "why?", "conversation": "c1"})
    assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
    lines = [json.loads(line) for line in r.body.decode().splitlines()]
    assert lines == [{"t": "It is "}, {"t": "fine."}, {"done": {"text": "It is fine.", "source": "llm"}}]
    name, args = station.calls[-1]
    assert name == "ask" and args[1:3] == (VID, "why?")


def test_station_server_binds_to_loopback_by_default(tmp_path):
    cfg = WebConfig(tmp_path / "u.json", tmp_path / "a.jsonl")
    assert cfg.bind == "127.0.0.1"


# --- a real station: video camera, real bundle, enrollment over HTTP --------------------------------


def _png_b64(image) -> str:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


@pytest.mark.slow
def test_enrollment_over_http_then_verdicts_history_csv_and_ask(default_bundle_dir, tmp_path):
    video = write_video(tmp_path / "mixed.avi", 40, mixed=True, seed0=500)
    users = [("theo", "technician", PASSWORDS["theo"]), ("olga", "operator", PASSWORDS["olga"])]
    server, station = serve_video_station(tmp_path, default_bundle_dir, video, users, inspect_fps=5)
    try:
        c = logged_in(server, "theo")
        state = c.post("/api/enroll/start", {"recipe": "plate", "camera": "cam1", "roi": list(PART_ROI)}).json()
        assert state["name"] == "plate" and state["roi"] == list(PART_ROI) and state["k"] == 0
        # Full frames saved from the same camera (same codec), as a technician would upload them;
        # the recipe's ROI is applied. One of them shows a defective part by mistake.
        goods = read_video(write_video(tmp_path / "golden.avi", 10, mixed=False, seed0=2000))
        bad = read_video(write_video(tmp_path / "oops.avi", 10, mixed=True, seed0=2100))[BLOCK]
        assert is_defective(BLOCK, mixed=True)
        files = [{"name": f"good-{i}.png", "data": _png_b64(g)} for i, g in enumerate(goods)]
        files.append({"name": "bad.png", "data": _png_b64(bad)})
        step = c.post("/api/enroll/upload", {"recipe": "plate", "files": files}).json()
        assert step["k"] == 11 and step["quality"]["ok"] is False
        flagged = [f["name"] for f in step["quality"]["flagged"]]
        assert flagged == ["bad.png"], "the quality check must point at the defective golden sample"
        assert not step["state"]["live"]
        sample = next(s for s in step["state"]["samples"] if s["name"] == "bad.png")
        png = c.get(f"/api/recipes/plate/samples/{sample['sha256']}.png")
        assert png.status == 200 and png.headers["Content-Type"] == "image/png"
        step = c.post("/api/enroll/remove", {"recipe": "plate", "sample": "bad.png"}).json()
        assert step["k"] == 10 and step["quality"]["ok"] is True
        done = c.post("/api/enroll/finish", {"recipe": "plate", "camera": "cam1"}).json()
        assert done["live"] is True and done["state"]["cameras"] == ["cam1"]
        assert "false rejects" in done["threshold_explained"] or "rejected" in done["threshold_explained"]

        deadline = time.monotonic() + 40
        rows: list[dict] = []
        truth: list[bool] = []
        while time.monotonic() < deadline:  # a fair sample: >= 12 good and >= 6 defective parts
            rows = c.get("/api/history?camera=cam1&limit=500").json()
            truth = [is_defective((r["frame_seq"] - 1) % 40, mixed=True) for r in rows]
            if truth.count(True) >= 6 and truth.count(False) >= 12:
                break
            time.sleep(0.5)
        assert truth.count(True) >= 6 and truth.count(False) >= 12, rows
        ng = [r for r in rows if r["verdict"] == "NG"]
        escapes = sum(t and r["verdict"] != "NG" for r, t in zip(rows, truth))
        false_rejects = sum((not t) and r["verdict"] == "NG" for r, t in zip(rows, truth))
        assert escapes == 0, "a defective part passed"
        # Few-shot threshold from 10 parts: a false reject now and then, only just above the
        # threshold; every defect far above it.
        assert false_rejects <= 0.3 * truth.count(False), (false_rejects, truth.count(False))
        for r, t in zip(rows, truth):
            assert (r["score"] > 1.6 * r["threshold"]) == t, (r["frame_seq"], t, r["score"], r["threshold"])
        one = ng[0]
        assert one["regions"] and one["sentence"].startswith("Yes") and one["has_image"]
        for kind in ("image", "heatmap"):
            img = c.get(f"/api/history/{one['id']}/{kind}.jpg")
            assert img.status == 200 and img.body[:2] == b"\xff\xd8"
        ng_only = c.get("/api/history?ng=1&limit=500").json()
        assert ng_only and all(r["verdict"] != "OK" for r in ng_only)
        assert c.get("/api/history?camera=other").json() == []
        assert c.get(f"/api/history?since={time.time() + 60}").json() == []
        export = c.get("/api/history.csv?ng=1&limit=20")
        assert export.status == 200 and "attachment" in export.headers["Content-Disposition"]
        table = list(csv.DictReader(io.StringIO(export.body.decode())))
        assert table and {row["verdict"] for row in table} <= {"NG", "ERROR"} and table[0]["sentence"]

        # Ask: no LLM on this station, so the answer is the vision system's own sentence, streamed.
        operator = logged_in(server, "olga")
        answer = operator.post("/api/ask", {"verdict_id": one["id"], "question": "Where is the defect?"})
        lines = [json.loads(line) for line in answer.body.decode().splitlines()]
        assert lines[-1]["done"]["text"] == one["sentence"] and lines[-1]["done"]["source"] == "template"

        system = c.get("/api/system").json()
        assert system["bundle"]["sha256"] == done["state"]["bundle_sha256"]
        assert system["cameras"][0]["recipe"] == "plate" and system["cameras"][0]["inspect_fps"]

        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        changes = [(a["user"], a["action"], a["target"]) for a in audit if a["action"].startswith("enroll.")]
        assert changes == [
            ("theo", "enroll.start", "plate"),
            ("theo", "enroll.upload", "plate"),
            ("theo", "enroll.remove", "plate"),
            ("theo", "enroll.finish", "plate"),
        ]
        assert audit[-1]["details"].get("live") is True or any(a["details"].get("live") for a in audit)
        assert station.history(HistoryQuery(ng_only=True, limit=1))[0]["verdict"] == "NG"
    finally:
        server.stop()
        station.stop()


class FakeExplainer:
    """Records explain / follow_up calls like the real Explainer's conversation state."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._verdict = None

    def explain(self, verdict, question, on_text=None):
        from anomalygpt_edge.runtime.explain.explainer import Explanation

        self.calls.append(f"explain:{question}")
        self._verdict = verdict
        on_text("first answer")
        return Explanation("first answer", "llm")

    def follow_up(self, question, on_text=None, verdict=None):
        from anomalygpt_edge.runtime.explain.explainer import Explanation

        self.calls.append(f"follow_up:{question}")
        on_text("more")
        return Explanation("more", "llm")


def test_ask_continues_a_conversation_only_while_the_model_still_holds_it(tmp_path):
    from anomalygpt_edge.runtime.inspection.verdict import Verdict
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.web.station import StationBase, make_record

    explainer = FakeExplainer()
    st = StationBase(RecipeStore(tmp_path), explainer_factory=lambda: explainer)
    v = Verdict("NG", 0.3, 0.1, "plate")
    a = st.log.add(make_record("cam1", v, 1, time.time(), "a" * 32), None, v, False)
    b = st.log.add(make_record("cam1", v, 2, time.time(), "b" * 32), None, v, False)
    pieces: list[str] = []
    assert st.ask("c1", a["id"], "why?", pieces.append)["turn"] == "first"
    assert st.ask("c1", a["id"], "where?", pieces.append)["turn"] == "follow-up"
    assert st.ask("c2", a["id"], "hi", pieces.append)["turn"] == "first", "another conversation starts afresh"
    assert st.ask("c2", b["id"], "and this one?", pieces.append)["turn"] == "first", "another verdict too"
    explainer._verdict = object()  # the explanation worker used the model in between
    assert st.ask("c2", b["id"], "again?", pieces.append)["turn"] == "first"
    assert explainer.calls == [
        "explain:why?",
        "follow_up:where?",
        "explain:hi",
        "explain:and this one?",
        "explain:again?",
    ]
    assert pieces == ["first answer", "more", "first answer", "first answer", "first answer"]


def test_ask_without_a_model_streams_the_verdicts_own_sentence(tmp_path):
    from anomalygpt_edge.runtime.inspection.verdict import Verdict
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.web.station import StationBase, make_record

    def broken():
        raise FileNotFoundError("no gguf")

    st = StationBase(RecipeStore(tmp_path), explainer_factory=broken)
    v = Verdict("OK", 0.01, 0.1, "plate")
    r = st.log.add(make_record("cam1", v, 1, time.time()), None, v, False)
    pieces: list[str] = []
    out = st.ask("c", r["id"], "", pieces.append)
    assert pieces == [v.sentence] and out["source"] == "template" and "no gguf" in out["note"]


# --- the route table is what runs ------------------------------------------------------------------


AUDITED = [r for r in MUTATING if r.audit]


@pytest.mark.parametrize("route", AUDITED, ids=lambda r: r.pattern)
def test_every_audited_route_writes_the_action_its_route_table_names(fake_server, tmp_path, route):
    server, _ = fake_server
    admin = logged_in(server, "ada")  # admin passes every role check
    body = BODIES[route.pattern]
    assert admin.post(url(route.pattern), body).status == 200
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert last["action"] == route.audit.format_map(body), "the handler writes the route table's audit action"


def test_the_users_route_audits_user_set_and_user_remove_as_its_table_entry_says():
    users = next(r for r in ROUTES if r.pattern == "/api/users" and r.method == "POST")
    assert users.audit.format_map({"action": "set"}) == "user.set"
    assert users.audit.format_map({"action": "remove"}) == "user.remove"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/enroll/start", {"recipe": "part-a", "roi": [0, 0, 64, True]}, "roi"),
        ("/api/enroll/start", {"recipe": "part-a", "roi": [0, 0, 64]}, "roi"),
        ("/api/enroll/start", {"recipe": "part-a", "target_frr": "0.01"}, "target_frr"),
        ("/api/enroll/start", {"recipe": "part-a", "target_frr": 0.5}, "target_frr"),
        ("/api/enroll/start", {"recipe": "CON"}, "recipe"),
        ("/api/enroll/start", {"camera": "cam1"}, "recipe"),
        ("/api/enroll/finish", {"recipe": "part-a", "accept_flagged": "yes"}, "accept_flagged"),
        ("/api/enroll/upload", {"recipe": "part-a", "files": []}, "files"),
        ("/api/enroll/upload", {"recipe": "part-a", "files": [{"name": "a.png", "data": "!!"}]}, "files.0.data"),
        ("/api/enroll/remove", {"recipe": "part-a", "sample": "../a.png"}, "sample"),
        ("/api/ask", {"verdict_id": VID, "question": "x" * 1001}, "question"),
        ("/api/users", {"action": "rename", "name": "x"}, "action"),
    ],
)
def test_a_bad_body_field_is_refused_with_one_line_naming_the_field(fake_server, path, body, field):
    server, station = fake_server
    r = logged_in(server, "ada").post(path, body)
    assert r.status == 400, r.body
    message = r.json()["error"]
    assert f"'{field}'" in message and "\n" not in message, message
    assert station.calls == [], "refused before the station is called"


def test_an_empty_optional_name_means_none_as_the_page_sends_it(fake_server):
    server, station = fake_server
    r = logged_in(server, "theo").post("/api/recipes/assign", {"camera": "cam1", "recipe": ""})
    assert r.status == 200
    assert station.calls == [("assign", ("cam1", None))]


def test_the_server_serves_on_a_named_thread_and_stopping_it_ends_the_thread(tmp_path, users_json):
    import threading

    (tmp_path / "users.json").write_bytes(users_json)
    server = StationServer(FakeStation(), WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0))
    server.start()
    assert Client(server.url).get("/api/session").status == 200
    assert any(t.name == "station-http" for t in threading.enumerate())
    server.stop()
    assert not any(t.name == "station-http" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(OSError):
        Client(server.url).get("/api/session")
