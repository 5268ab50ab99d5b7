"""DaemonStation's history: verdicts the daemon publishes reach it through the daemon's verdict
listeners, and history reaches back into the daemon's archive (which survives restarts), newest first."""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace

import numpy as np

from anomalygpt_edge.runtime.delivery.archive import Archive
from anomalygpt_edge.runtime.inspection.verdict import Region, Verdict
from anomalygpt_edge.runtime.recipes.store import RecipeStore
from anomalygpt_edge.runtime.web.daemon_station import DaemonStation
from anomalygpt_edge.runtime.web.station import HistoryQuery, NotFoundError


def _fake_daemon(tmp_path, archive: Archive | None) -> SimpleNamespace:
    # The daemon's surface the station uses; the real daemon is driven in test_web_browser.py.
    return SimpleNamespace(
        store=RecipeStore(tmp_path / "store"),
        config=SimpleNamespace(llm=SimpleNamespace(enabled=False), cameras={"cam1": None, "cam2": None}),
        verdict_listeners=[],
        explanation_listeners=[],
        explanations=None,
        archive=SimpleNamespace(archive=archive) if archive is not None else None,
    )


def _archive_rows(archive: Archive, now: float) -> list[str]:
    """Two hours of verdicts on two cameras, one every 30 s, every fourth NG (with images)."""
    ids = []
    image = np.full((32, 32, 3), 90, np.uint8)
    for i in range(240):
        ts = now - 7200 + 30 * i
        verdict = "NG" if i % 4 == 0 else "OK"
        vid = f"{i:08x}-0000-7000-8000-000000000000"
        msg = {
            "id": vid,
            "camera": "cam1" if i % 2 == 0 else "cam2",
            "recipe": "plate",
            "verdict": verdict,
            "score": 0.3 if verdict == "NG" else 0.01,
            "threshold": 0.1,
            "regions": [],
            "sentence": "s",
            "frame_seq": i,
            "captured_at_epoch": ts,
            "captured_at": dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(),
        }
        archive.record(msg, image if verdict == "NG" else None, image if verdict == "NG" else None)
        ids.append(vid)
    return ids


def test_history_reaches_back_into_the_archive_newest_first(tmp_path):
    archive = Archive(tmp_path / "archive")
    now = time.time()
    ids = _archive_rows(archive, now)
    st = DaemonStation(_fake_daemon(tmp_path, archive))
    try:
        rows = st.history(HistoryQuery(ng_only=True, camera="cam1", limit=5))
        expected = [vid for i, vid in reversed(list(enumerate(ids))) if i % 4 == 0][:5]
        assert [r["id"] for r in rows] == expected, "the newest NG verdicts of cam1, newest first"
        assert all(r["verdict"] == "NG" and r["camera"] == "cam1" and r["has_image"] for r in rows)
        assert st.history_image(rows[0]["id"], "heatmap")[:2] == b"\xff\xd8"
        assert st.history_item(rows[0]["id"])["frame_seq"] == 236
        # (microsecond ISO times: start the window a millisecond early)
        window = st.history(HistoryQuery(since=now - 7200.001, until=now - 7200 + 95, limit=50))
        assert [r["frame_seq"] for r in window] == [3, 2, 1, 0]
        assert len(st.history(HistoryQuery(limit=1000))) == 240
        try:
            st.history_image(ids[1], "image")  # an OK verdict whose image was not kept
        except NotFoundError:
            pass
        else:
            raise AssertionError("an OK row without an image must be a 404")
    finally:
        st.stop()


def test_published_verdicts_reach_the_station_through_the_daemons_listeners(tmp_path):
    daemon = _fake_daemon(tmp_path, None)
    st = DaemonStation(daemon)
    try:
        v = Verdict("NG", 0.4, 0.1, "plate", [Region((1, 1, 4, 4), 2.0, 0.4, "top left")], "Yes, ...")
        v.anomaly_map = np.zeros((16, 16), np.float32)
        job = SimpleNamespace(camera="cam1", captured_at=time.time())
        msg = {"id": "v1", "frame_seq": 7, "captured_at_epoch": job.captured_at, "latency_ms": {"total": 5.0}}
        assert len(daemon.verdict_listeners) == 1 and len(daemon.explanation_listeners) == 1
        for listener in daemon.verdict_listeners:  # as Daemon._after_verdict calls them
            listener(job, "0123456789abcdef", v, msg, np.zeros((16, 16, 3), np.uint8))
        deadline = time.monotonic() + 5
        while st.last_verdict("cam1") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        last = st.last_verdict("cam1")
        assert last["id"] == "0123456789abcdef" and last["frame_seq"] == 7 and last["verdict"] == "NG"
        assert st.last_overlay("cam1", last["id"])[:2] == b"\xff\xd8"
        assert st.history_image(last["id"], "image")[:2] == b"\xff\xd8"
    finally:
        st.stop()


def test_the_null_link_publishes_nowhere_says_connected_and_lets_replies_succeed():
    from anomalygpt_edge.runtime.delivery.null_link import NullLink

    link = NullLink("bench")
    assert link.start(0.0) is True and link.connected.is_set(), "connected at once: there is no broker to wait for"
    assert link.note == "no MQTT broker: standalone station" and link.sender is None and link.network_thread is None
    durable: list[bool] = []
    link.publish_verdict("v1", link.topic("cam1", "verdict"), b"{}", on_durable=durable.append)
    assert durable == [False], "the PLC-reply callback still runs, as without a spool"
    link.publish_json(link.topic("status"), {"state": "online"}, qos=1, retain=True)
    link.publish_status()
    link.publish_heatmap("cam1", "v1", b"\xff\xd8")
    link.reply(SimpleNamespace(name="trigger"), {"ok": True})
    assert link.topic("cam1", "verdict") == "anomalygpt/bench/cam1/verdict"
    assert link.stats["not_sent"] == 5 and link.stats["published"] == 0, "nothing reached any broker"
    link.stop()
    assert not link.connected.is_set()


def test_the_system_page_says_a_standalone_station_has_no_broker(tmp_path):
    from anomalygpt_edge.runtime.delivery.null_link import NullLink
    from anomalygpt_edge.runtime.web.daemon_station import _broker_status

    link = NullLink()
    link.start()
    status = _broker_status(SimpleNamespace(mqtt=SimpleNamespace(host="h", port=1, protocol="5")), link)
    assert status["connected"] is True and status["note"] == "no MQTT broker: standalone station"
    assert "host" not in status, "no broker address is shown for a station that has none"


def test_the_daemon_station_implements_every_method_of_the_station_protocol():
    import inspect

    from anomalygpt_edge.runtime.web.station import Station

    wanted = {n for n, f in vars(Station).items() if inspect.isfunction(f) and not n.startswith("_")}
    missing = {n for n in wanted if not callable(getattr(DaemonStation, n, None))}
    assert wanted and not missing, missing
    for name in wanted:  # same parameters as the protocol: the web layer calls them by keyword too
        assert list(inspect.signature(getattr(DaemonStation, name)).parameters) == list(
            inspect.signature(getattr(Station, name)).parameters
        ), name


def test_a_record_without_a_daemon_id_gets_the_daemons_kind_of_id():
    import uuid

    from anomalygpt_edge.runtime.web.station import make_record

    v = Verdict("OK", 0.01, 0.1, "plate")
    ids = [make_record("cam1", v, i, time.time())["id"] for i in range(3)]
    assert all(uuid.UUID(i).version == 7 for i in ids), "one verdict-id scheme: the daemon's uuid7"
    assert ids == sorted(ids), "time-ordered, like the daemon's"
