"""Proposals off the ``commands`` thread (issue 14 review): a ``propose`` is computed on the desk's own
``proposals`` thread, so a ``list`` / ``switch`` sent after it is answered first; a second ``propose``
of the recipe being computed is refused at once; ``pending`` shows the pending proposal (read-only,
open without credentials); labels from a camera whose config ROI is another than the recipe's are
left out of a proposal, and said in its notes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
)
from test_proposals_line import TECH, _ask, _config, _label_goods, _strict_store

from anomalygpt_edge.runtime.line.command_gate import CommandGate, CommandPolicy, Rejection
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.line.proposal_parts import gather


def _send(sub: Subscriber, device: str, body: dict) -> bytes:
    corr = uuid.uuid4().bytes
    sub.publish(f"anomalygpt/{device}/cmd/recipe", json.dumps(body), response_topic=f"tech/{device}", correlation=corr)
    return corr


def test_a_proposal_computes_off_the_commands_thread_and_a_second_propose_is_refused_at_once(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    _strict_store(line, tmp_path, value=1e-6)
    path = _config(tmp_path, broker, line, "prt")
    sub = Subscriber(broker, ["anomalygpt/prt/#", "tech/prt"])
    daemon = Daemon(load_config(path)).start()
    try:
        labels = _label_goods(sub, "prt", daemon, 6)
        nothing = _ask(sub, "prt", "recipe", {"action": "pending", "recipe": "bracket", "client_id": TECH})
        propose = {"action": "propose", "recipe": "bracket", "client_id": TECH}
        first = _send(sub, "prt", propose)
        second = _send(sub, "prt", propose)
        listed = _send(sub, "prt", {"action": "list", "client_id": TECH})
        switched = _send(sub, "prt", {"action": "switch", "camera": "cam1", "recipe": "bracket", "client_id": TECH})
        order = [first, second, listed, switched]
        mine = lambda m: m.topic == "tech/prt" and bytes(m.properties.CorrelationData or b"") in order  # noqa: E731
        got = sub.wait_for(mine, count=4, timeout=240)
        pending = _ask(sub, "prt", "recipe", {"action": "pending", "recipe": "bracket", "client_id": TECH})
        computing = daemon.proposals.status()["computing"]
        threads = {t.name for t in daemon.supervisor.threads if t.is_alive()}
    finally:
        daemon.stop()
        sub.close()

    assert all(x["ok"] for x in labels), labels
    assert nothing == nothing | {"ok": False, "error": "no pending proposal for bracket"}, nothing
    replies = {bytes(m.properties.CorrelationData): m.json() for m in got}
    arrival = [bytes(m.properties.CorrelationData) for m in got]
    assert arrival[-1] == first, "list, switch and the refused propose are answered before the proposal"
    assert replies[second]["ok"] is False, replies[second]
    assert replies[second]["error"] == "a proposal for bracket is being computed"
    assert replies[listed]["ok"] and replies[switched]["ok"], (replies[listed], replies[switched])
    proposed = replies[first]
    assert proposed["ok"] and proposed["action"] == "propose" and proposed["recipe"] == "bracket", proposed
    assert pending["ok"] and pending["proposal"] == proposed["proposal"], pending
    assert computing == [], "nothing is computing once the reply came"
    assert "proposals" in threads, threads


def test_labels_from_a_camera_with_another_roi_are_left_out_and_said(tmp_path: Path) -> None:
    image = tmp_path / "crop.png"
    cv2.imwrite(str(image), np.full((8, 8, 3), 128, np.uint8))
    row = lambda vid, camera: SimpleNamespace(  # noqa: E731 - an archive's labelled verdict
        verdict_id=vid, camera=camera, verdict="NG", image_path=image, label="good", defect_type=None, at=1.0
    )
    archive = SimpleNamespace(labelled=lambda recipe: [row("a", "cam1"), row("b", "cam2"), row("c", "cam2")])
    got = gather(archive, "bracket", other_roi=lambda camera: camera == "cam2")
    assert [p.name for p in got.parts] == ["a"] and got.other_roi == 2
    assert any(n.startswith("2 labelled verdicts come from cameras whose config ROI differs") for n in got.notes())


def test_pending_is_read_only_open_without_credentials_as_list_is() -> None:
    gate = CommandGate(CommandPolicy(prefix="anomalygpt", device="line1"))  # no token, no client ids
    topic = "anomalygpt/line1/cmd/recipe"
    shown = gate.check(topic, json.dumps({"action": "pending", "recipe": "bracket"}).encode(), None, None)
    changed = gate.check(topic, json.dumps({"action": "discard", "recipe": "bracket"}).encode(), None, None)
    assert not isinstance(shown, Rejection), shown
    assert isinstance(changed, Rejection) and changed.code == "unauthorized", changed
