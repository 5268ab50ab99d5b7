"""Labels on verdicts in a real browser: an operator labels one verdict ``good`` in the history and
one ``defect`` on the live page, each with one click; both end up in the daemon's archive with the
operator as author and ``source: station``, and in the audit log. Requests without a login, without
the CSRF token, for an unknown verdict or with a malformed body are refused and change nothing.

Reuses the browser, the PKI and the daemon fixtures of ``test_web_browser.py`` / ``daemon_fixtures``.
"""

from __future__ import annotations

import csv
import io
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import line_fixture  # noqa: F401 - fixture used by name
from station_http import Client
from test_web_browser import browser, pki, pytestmark  # noqa: F401 - fixtures used by name

from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import WebConfig


@pytest.fixture()
def labelling_station(tmp_path: Path, pki: Path, line: dict) -> Any:  # noqa: F811 - the imported fixture
    """The line daemon inspecting the synthetic line with the live recipe ``bracket`` (free run),
    its archive on, a local broker, and the station over HTTPS with the operator ``otto``."""
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.tools.local_broker import start_local_broker
    from anomalygpt_edge.runtime.web.daemon_station import attach

    broker = start_local_broker()
    config = {
        "device": {"id": "label-test"},
        "cameras": {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10, "loop": True}},
        "recipes": [{"camera": "cam1", "recipe": "bracket", "trigger": "free_run", "fps": 2, "deadline_ms": 3000}],
        "engines": {"bundle": str(line["bundle"]), "backend": "onnxruntime"},
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocols[0], "keepalive": 10},
        "storage": {"store": str(line["store"]), "data": str(tmp_path / "state")},
    }
    (tmp_path / "line.yaml").write_text(json.dumps(config))  # JSON is YAML
    daemon = Daemon(load_config(tmp_path / "line.yaml")).start()
    UserStore(tmp_path / "users.json").set("otto", "operator", "otto-password")
    web = WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0,
                    tls_cert=pki / "server.pem", tls_key=pki / "server.key")  # fmt: skip
    server, st = attach(daemon, web)
    yield server, daemon
    server.stop()
    st.stop()
    daemon.stop()
    broker.stop()


def test_an_operator_labels_verdicts_in_history_and_on_the_live_page(
    labelling_station: Any,
    browser: Any,  # noqa: F811 - the imported fixture
    pki: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    server, daemon = labelling_station
    b = browser
    b.login(server.url, "otto", "otto-password")

    # Live page: the last verdict of cam1 gets "defect" with one click.
    b.wait("a verdict on the live page", lambda: b.js("return !!document.querySelector('#live-label-defect-cam1')"), 60)
    b.click("#live-label-defect-cam1")
    b.wait("the live label", lambda: b.js("return document.querySelector('#live-label-cam1').textContent") == "defect")

    # History: the newest row gets "good".
    b.get(server.url + "/#history")
    b.wait("history rows", lambda: b.js("return !!document.querySelector('#hist-table tbody tr[data-id]')"), 30)
    vid = b.js("return document.querySelector('#hist-table tbody tr[data-id]').dataset.id")
    b.click(f"#hist-label-good-{vid}")
    b.wait(
        "the history label", lambda: b.js(f"return document.querySelector('#hist-label-{vid}').textContent") == "good"
    )

    archive = daemon.archive.archive
    labelled = {v.verdict_id: v for v in archive.labelled()}
    assert labelled[vid].label == "good" and labelled[vid].author == "otto"
    assert any(v.label == "defect" for v in labelled.values()) or len(archive.label_history(vid)) == 2
    rows = [x for v in labelled for x in archive.label_history(v)]
    assert {(x.author, x.source) for x in rows} == {("otto", "station")}
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["action"] for e in audit if e["action"] == "verdict.label"] == ["verdict.label"] * 2
    assert all(e["user"] == "otto" and e["details"]["ok"] for e in audit if e["action"] == "verdict.label")

    # Refusals: each clear, none stores a label.
    before = len(rows)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    anonymous = Client(server.url, ctx)
    assert anonymous.post(f"/api/verdicts/{vid}/label", {"label": "good"}).status == 401
    api = Client(server.url, ctx)
    api.login("otto", "otto-password")
    no_csrf = api.post(f"/api/verdicts/{vid}/label", {"label": "good"}, csrf=False)
    assert no_csrf.status == 403 and "CSRF" in no_csrf.json()["error"]
    unknown = api.post("/api/verdicts/0190abcd-0000-7000/label", {"label": "good"})
    assert unknown.status == 404 and "no verdict '0190abcd-0000-7000'" in unknown.json()["error"]
    malformed = api.post(f"/api/verdicts/{vid}/label", {"label": "maybe"})
    assert malformed.status == 400 and "'label'" in malformed.json()["error"]
    assert sum(len(archive.label_history(v)) for v in labelled) == before
    history = api.get(f"/api/verdicts/{vid}/labels").json()
    assert [(x["label"], x["author"], x["source"]) for x in history][-1] == ("good", "otto", "station")
    assert api.get(f"/api/history/{vid}").json()["label"]["label"] == "good"
    table = {r["id"]: r for r in csv.DictReader(io.StringIO(api.get("/api/history.csv?limit=1000").body.decode()))}
    assert table[vid]["label"] == "good", "the CSV export carries the current label"
