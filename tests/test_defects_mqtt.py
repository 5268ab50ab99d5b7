"""Labelled defective parts over MQTT, against the real daemon and a real mosquitto: one enroll
session adds golden frames, then defective frames from the same camera (one with a rectangle mask),
and finishes with a live recipe that holds the defects and a trained defect head; a malformed mask,
an oversized payload or a request without the command token is refused with a clear error and
changes nothing."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    write_config,
)

from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.recipes.store import RecipeStore
from anomalygpt_edge.runtime.tools import synthetic

TOKEN = "line-3-technician-token"
FRAMES = 6  # files in the camera's folder: golden parts first, then replaced by defective ones
#: Where render_part draws its scratch (x0 = 90 ± 1, scratch from x0 + 30..70, y0 + 10..30, 45 x 55 long).
SCRATCH_BOX = [118, 78, 92, 82]


def _write_atomic(path: Path, image: np.ndarray) -> None:
    tmp = path.with_name("." + path.name)  # hidden: the folder camera never lists it
    assert cv2.imwrite(str(tmp), image)
    os.replace(tmp, path)


def _ask(sub: Subscriber, body: dict[str, Any], token: str | None = TOKEN, raw: bytes | None = None) -> dict:
    corr = uuid.uuid4().bytes
    payload = raw if raw is not None else json.dumps({**body, **({"token": token} if token else {})})
    sub.publish("anomalygpt/dfx/cmd/enroll", payload, response_topic="tech/dfx", correlation=corr)
    got = sub.wait_for(
        lambda m: m.topic == "tech/dfx" and bytes(m.properties.CorrelationData or b"") == corr, timeout=90
    )
    return got[0].json()


def test_an_mqtt_session_enrolls_goldens_then_labelled_defects_and_finishes_with_a_trained_head(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    folder = tmp_path / "camera"
    folder.mkdir()
    goldens = synthetic.read_video_frames(line["golden"])[:FRAMES]
    for i, image in enumerate(goldens):
        _write_atomic(folder / f"f-{i:02d}.png", image)
    (tmp_path / "token").write_text(TOKEN)
    cameras = {"cam1": {"type": "image_folder", "source": str(folder), "fps": 20, "loop": True}}
    recipes = [{"camera": "cam1", "recipe": "plate-d", "trigger": "mqtt", "deadline_ms": 3000}]
    path = write_config(tmp_path / "d.yaml", broker, cameras, recipes, tmp_path / "store", line["bundle"], "dfx")
    cfg = json.loads(path.read_text())
    cfg["commands"] = {"token_file": str(tmp_path / "token")}
    cfg["mqtt"]["max_payload_bytes"] = 8192
    path.write_text(json.dumps(cfg))
    sub = Subscriber(broker, ["tech/dfx"])
    daemon = Daemon(load_config(path)).start()
    try:
        start = _ask(sub, {"action": "start", "camera": "cam1", "recipe": "plate-d", "roi": list(synthetic.PART_ROI)})
        assert start["ok"], start
        for i in range(FRAMES):
            added = _ask(sub, {"action": "add", "camera": "cam1"})
            assert added["ok"] and added["count"] == i + 1, added

        # The same camera now shows defective parts (scratches): every file replaced in place.
        rng = np.random.default_rng(11)
        for i in range(FRAMES):
            _write_atomic(folder / f"f-{i:02d}.png", synthetic.render_part(rng, "scratch"))
        cam = daemon.cameras["cam1"]
        swapped = cam.latest().seq
        assert cam.wait_frame(newer_than_seq=swapped + 1, timeout=10) is not None, "frames after the swap"

        # Refused, each with a clear error, and none of them holds a frame.
        refusals = {
            "short rectangle": _ask(sub, {"action": "add_defect", "camera": "cam1", "mask": [[1, 2, 3]]}),
            "outside the frame": _ask(sub, {"action": "add_defect", "camera": "cam1", "mask": [[300, 200, 50, 50]]}),
            "outside the ROI": _ask(sub, {"action": "add_defect", "camera": "cam1", "mask": [[0, 0, 20, 20]]}),
            "bad type": _ask(sub, {"action": "add_defect", "camera": "cam1", "defect_type": "../x"}),
            "too many": _ask(sub, {"action": "add_defect", "camera": "cam1", "mask": [[0, 0, 1, 1]] * 33}),
            "no token": _ask(sub, {"action": "add_defect", "camera": "cam1"}, token=None),
            "wrong token": _ask(sub, {"action": "add_defect", "camera": "cam1"}, token="guess"),
            "oversized": _ask(
                sub,
                {},
                raw=json.dumps(
                    {"action": "add_defect", "camera": "cam1", "token": TOKEN, "mask": [[1, 1, 1, 1]] * 900}
                ),
            ),
        }
        assert daemon.commands.sessions["cam1"].defects == [], "no refused request added a defect"

        masked = _ask(sub, {"action": "add_defect", "camera": "cam1", "defect_type": "scratch", "mask": [SCRATCH_BOX]})
        plain = _ask(sub, {"action": "add_defect", "camera": "cam1", "defect_type": "scratch"})
        extra = _ask(sub, {"action": "add_defect", "camera": "cam1"})
        dropped = _ask(sub, {"action": "remove", "camera": "cam1", "name": extra["name"]})
        done = _ask(sub, {"action": "finish", "camera": "cam1"})

        # A later session removes an enrolled defect from the recipe by name.
        assert _ask(sub, {"action": "start", "camera": "cam1", "recipe": "plate-d"})["ok"]
        unknown = _ask(sub, {"action": "remove", "camera": "cam1", "name": "no-such-defect"})
        removed = _ask(sub, {"action": "remove", "camera": "cam1", "name": plain["name"]})
        assert _ask(sub, {"action": "add_defect", "camera": "cam1"})["ok"]
        cancelled = _ask(sub, {"action": "cancel", "camera": "cam1"})
    finally:
        daemon.stop()
        sub.close()

    expected = {
        "short rectangle": "rectangle 0 must be [x, y, w, h]",
        "outside the frame": "does not fit inside the 320x240 frame",
        "outside the ROI": "no rectangle overlaps the recipe's ROI",
        "bad type": "field 'defect_type'",
        "too many": "at most 32",
        "no token": "not authorized",
        "wrong token": "not authorized",
        "oversized": "payload too large",
    }
    for why, reply in refusals.items():
        assert reply["ok"] is False and expected[why] in reply["error"], (why, reply)
    assert masked["ok"] and masked["has_mask"] and masked["defects"] == 1 and masked["defect_type"] == "scratch"
    assert plain["ok"] and not plain["has_mask"] and plain["defects"] == 2
    assert dropped["ok"] and dropped["pending"] and dropped["defects"] == 2

    assert done["ok"] and done["live"] and done["switched"], done
    # The folder loops: an add may land on a file already added, which the enroller skips as a duplicate.
    assert done["k"] == len(done["added"]) >= 3 and done["defects"] == 2
    assert sorted(done["defects_added"]) == sorted([masked["name"], plain["name"]])
    assert done["head"]["mode"] == "mixed" and done["head"]["seconds"] >= 0  # one masked, one not
    assert done["expectation"]["labelled_defects"] == 2 and done["expectation"]["explained"]
    assert "labelled defects" in done["expectation"]["explained"]

    assert unknown["ok"] is False and "no single labelled defect 'no-such-defect'" in unknown["error"]
    assert removed["ok"] and removed["removed"] == plain["name"] and removed["defects"] == 1, removed

    assert cancelled["ok"] and cancelled["discarded"] == 1 and cancelled["discarded_defects"] == 1, cancelled

    recipe = RecipeStore(tmp_path / "store").load("plate-d")
    assert recipe.live and len(recipe.samples) == done["k"]
    assert [(d.name, d.defect_type, d.has_mask) for d in recipe.defects] == [(masked["name"], "scratch", True)]
    assert recipe.head_file is not None
