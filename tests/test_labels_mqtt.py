"""``cmd/label`` against the real daemon and a real mosquitto: a label from an allowed HMI ends up
in the archive with the client id as its author; a relabel keeps the history; an unknown verdict
id, a client that may not label and a malformed body each get ``ok: false`` with a clear error and
change nothing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    write_config,
)

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon

DEVICE = "lbl"


def _send(sub: Subscriber, command: str, body: dict[str, Any] | bytes, timeout: float = 30) -> dict:
    corr = uuid.uuid4().bytes
    payload = body if isinstance(body, bytes) else json.dumps(body)
    sub.publish(f"anomalygpt/{DEVICE}/cmd/{command}", payload, response_topic="hmi/lbl", correlation=corr)
    got = sub.wait_for(
        lambda m: m.topic == "hmi/lbl" and bytes(m.properties.CorrelationData or b"") == corr, timeout=timeout
    )
    return got[0].json()


def test_labels_over_mqtt_are_archived_with_their_author_and_bad_ones_change_nothing(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 20, "loop": True}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 3000}]
    path = write_config(tmp_path / "l.yaml", broker, cameras, recipes, line["store"], line["bundle"], DEVICE)
    cfg = json.loads(path.read_text())
    cfg["commands"] = {"allowed_client_ids": ["hmi-1"]}
    path.write_text(json.dumps(cfg))
    sub = Subscriber(broker, ["hmi/lbl"])
    daemon = Daemon(load_config(path)).start()
    try:
        verdicts = [_send(sub, "trigger", {"camera": "cam1", "part_id": f"L{i}"}, timeout=60) for i in range(2)]
        ids = [v["id"] for v in verdicts]
        daemon.archive.flush()
        archive = daemon.archive.archive
        labelled = _send(
            sub,
            "label",
            {"id": ids[0], "label": "defect", "defect_type": "scratch", "client_id": "hmi-1", "request_id": "r-1"},
        )
        relabelled = _send(sub, "label", {"id": ids[0], "label": "good", "note": "re-checked", "client_id": "hmi-1"})
        refusals = {
            "unknown id": _send(sub, "label", {"id": "0190abcd-0000", "label": "good", "client_id": "hmi-1"}),
            "wrong client": _send(sub, "label", {"id": ids[1], "label": "good", "client_id": "intruder"}),
            "no client": _send(sub, "label", {"id": ids[1], "label": "good"}),
            "bad label": _send(sub, "label", {"id": ids[1], "label": "maybe", "client_id": "hmi-1"}),
            "no id": _send(sub, "label", {"label": "good", "client_id": "hmi-1"}),
            "bad type": _send(
                sub, "label", {"id": ids[1], "label": "defect", "defect_type": "../x", "client_id": "hmi-1"}
            ),
            "not json": _send(sub, "label", b"{oops"),
        }
        history = archive.label_history(ids[0])
        untouched = archive.label_history(ids[1])
    finally:
        daemon.stop()
        sub.close()

    assert labelled["ok"] and labelled["author"] == "hmi-1" and labelled["source"] == "mqtt", labelled
    assert labelled["id"] == ids[0] and labelled["request_id"] == "r-1" and labelled["defect_type"] == "scratch"
    assert isinstance(labelled["image"], bool)
    assert relabelled["ok"] and relabelled["label"] == "good", relabelled
    assert [(x.label, x.author, x.source) for x in history] == [("defect", "hmi-1", "mqtt"), ("good", "hmi-1", "mqtt")]
    expected = {
        "unknown id": "no verdict '0190abcd-0000' in the archive",
        "wrong client": "not authorized: client id 'intruder' may not send label",
        "no client": "not authorized: client id None may not send label",
        "bad label": "label must be one of good, defect, got 'maybe'",
        "no id": "missing field 'id'",
        "bad type": "field 'defect_type'",
        "not json": "malformed JSON",
    }
    for name, message in expected.items():
        got = refusals[name]
        assert got["ok"] is False and message in got["error"], (name, got)
    assert untouched == [], "no refused label reached the archive"
