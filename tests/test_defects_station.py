"""Labelled defective parts through the technician station, over HTTP against a real station (video
camera, real bundle, real Enroller): a technician uploads a defect with a painted mask and marks a
golden sample that was really defective; the recipe holds both and its finish explains the expected
escapes in plain words. An operator, a request without the CSRF token, an empty or oversized mask,
or an image over the pixel limit changes nothing; every change is audited."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from station_http import Client
from station_run import serve_video_station
from station_scene import PART_ROI, part, write_video

from anomalygpt_edge.runtime.web.server import StationServer

PASSWORDS = {"olga": "operator-pw", "theo": "technician-pw"}
#: Where station_scene draws a scratch: from (115..125, 90) to (+50, +65), 3 px wide.
SCRATCH = (112, 86, 66, 72)


def _b64_png(image: np.ndarray, data_url: bool = False) -> str:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    text = base64.b64encode(buf.tobytes()).decode()
    return "data:image/png;base64," + text if data_url else text


def _painted(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A mask as a browser canvas exports it: RGBA, opaque black, the painted region opaque white."""
    mask = np.zeros((*shape, 4), np.uint8)
    mask[:, :, 3] = 255
    x, y, w, h = box
    mask[y : y + h, x : x + w, :3] = 255
    return mask


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height``: enough for the header check, no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def station(default_bundle_dir: Path, tmp_path: Path):
    video = write_video(tmp_path / "good.avi", 20, mixed=False, seed0=300)
    users = [("theo", "technician", PASSWORDS["theo"]), ("olga", "operator", PASSWORDS["olga"])]
    server, st = serve_video_station(tmp_path, default_bundle_dir, video, users, inspect_fps=1)
    yield server, st
    server.stop()
    st.stop()


def _login(server: StationServer, user: str) -> Client:
    c = Client(server.url)
    assert c.login(user, PASSWORDS[user]).status == 200
    return c


def test_a_technician_uploads_a_defect_with_a_painted_mask_and_marks_a_golden_defective(station, tmp_path):
    server, st = station
    theo, olga = _login(server, "theo"), _login(server, "olga")
    assert theo.post("/api/enroll/start", {"recipe": "plate", "camera": "cam1", "roi": list(PART_ROI)}).status == 200
    files = [{"name": f"good-{i}.png", "data": _b64_png(part(400 + i))} for i in range(8)]
    # A defective part uploaded as golden by mistake: the technician will mark it defective.
    files.append({"name": "oops.png", "data": _b64_png(part(77, "scratch"))})
    step = theo.post("/api/enroll/upload", {"recipe": "plate", "files": files}).json()
    assert step["k"] == 9 and step["state"]["defects"] == []

    image = part(501, "scratch")
    upload = {
        "recipe": "plate",
        "files": [
            {
                "name": "scratch-1.png",
                "data": _b64_png(image),
                "mask": _b64_png(_painted(image.shape[:2], SCRATCH), data_url=True),
                "defect_type": "scratch",
            }
        ],
    }
    # Refused before the station is reached: an operator, and a technician without the CSRF token.
    denied = olga.post("/api/enroll/defect/upload", upload)
    assert denied.status == 403 and "technician" in denied.json()["error"]
    assert theo.post("/api/enroll/defect/upload", upload, csrf=False).status == 403
    # Refused by the station, naming the file: an empty mask, a mask of another size, an image
    # whose header claims more pixels than the limit (never decoded).
    empty = dict(upload["files"][0], mask=_b64_png(_painted(image.shape[:2], (0, 0, 0, 0))))
    small = dict(upload["files"][0], mask=_b64_png(np.full((10, 10), 255, np.uint8)))
    huge = {"name": "huge.png", "data": base64.b64encode(_huge_png_header(20000, 20000)).decode()}
    huge_mask = dict(upload["files"][0], mask=base64.b64encode(_huge_png_header(20000, 20000)).decode())
    refused = {
        why: theo.post("/api/enroll/defect/upload", {"recipe": "plate", "files": [f]})
        for why, f in (("empty", empty), ("small", small), ("huge", huge), ("huge mask", huge_mask))
    }
    assert st.recipe("plate")["defects"] == [], "nothing refused was enrolled"
    assert refused["empty"].status == 400 and "mask is empty" in refused["empty"].json()["error"]
    assert refused["small"].status == 400 and "mask is 10x10" in refused["small"].json()["error"]
    assert refused["huge"].status == 400 and "huge.png: image is 20000x20000" in refused["huge"].json()["error"]
    assert "mask: image is 20000x20000" in refused["huge mask"].json()["error"]

    added = theo.post("/api/enroll/defect/upload", upload)
    assert added.status == 200, added.body
    step = added.json()
    assert step["added"] == ["scratch-1.png"] and step["defects"] == 1
    (defect,) = step["state"]["defects"]
    assert defect["name"] == "scratch-1.png" and defect["defect_type"] == "scratch" and defect["has_mask"]
    mask = cv2.imdecode(
        np.frombuffer(theo.get(f"/api/recipes/plate/defects/{defect['sha256']}/mask.png").body, np.uint8), 0
    )
    x, y, w, h = SCRATCH
    px, py = PART_ROI[:2]
    assert mask.shape == PART_ROI[3:1:-1] and mask[y - py + h // 2, x - px + w // 2] == 255 and mask[0, 0] == 0
    assert theo.get(f"/api/recipes/plate/defects/{defect['sha256']}.png").headers["Content-Type"] == "image/png"
    again = theo.post("/api/enroll/defect/upload", upload).json()
    assert again["skipped"] == ["scratch-1.png: already enrolled"] and again["defects"] == 1

    # The golden that was really defective: its region painted on the sample (ROI coordinates).
    oops = next(s for s in step["state"]["samples"] if s["name"] == "oops.png")
    painted = _painted((PART_ROI[3], PART_ROI[2]), (SCRATCH[0] - px, SCRATCH[1] - py, SCRATCH[2], SCRATCH[3]))
    mark = {"recipe": "plate", "sample": "oops.png", "mask": _b64_png(painted, data_url=True), "defect_type": "scratch"}
    assert olga.post("/api/enroll/defect/mark", mark).status == 403
    marked = theo.post("/api/enroll/defect/mark", mark).json()
    assert marked["k"] == 8 and marked["defects"] == 2
    assert {d["name"]: d["has_mask"] for d in marked["state"]["defects"]} == {"scratch-1.png": True, "oops.png": True}
    assert next(d for d in marked["state"]["defects"] if d["name"] == "oops.png")["sha256"] == oops["sha256"]

    done = theo.post("/api/enroll/finish", {"recipe": "plate", "camera": "cam1"}).json()
    assert done["live"] and done["head"]["mode"] == "mask", done["head"]
    assert done["expectation"]["labelled_defects"] == 2
    assert "labelled defects" in done["expectation"]["explained"]
    assert done["state"]["expectation"]["explained"] == done["expectation"]["explained"]

    assert olga.post("/api/enroll/defect/remove", {"recipe": "plate", "defect": "oops.png"}).status == 403
    gone = theo.post("/api/enroll/defect/remove", {"recipe": "plate", "defect": "oops.png"}).json()
    assert [d["name"] for d in gone["state"]["defects"]] == ["scratch-1.png"] and gone["k"] == 8
    missing = theo.post("/api/enroll/defect/remove", {"recipe": "plate", "defect": "oops.png"})
    assert missing.status == 404

    audit = [(a["user"], a["action"], a["details"]["ok"]) for a in _audit(tmp_path / "audit.jsonl")]
    defect_actions = [a for a in audit if a[1].startswith("enroll.defect.")]
    assert defect_actions == [
        *[("theo", "enroll.defect.add", False)] * 4,
        ("theo", "enroll.defect.add", True),
        ("theo", "enroll.defect.add", True),
        ("theo", "enroll.defect.add", True),
        ("theo", "enroll.defect.remove", True),
        ("theo", "enroll.defect.remove", False),
    ]
    assert not any(user == "olga" and action.startswith("enroll.") for user, action, _ in audit)


def test_a_captured_frame_is_enrolled_as_a_defect_without_a_mask(station):
    server, st = station
    theo = _login(server, "theo")
    theo.post("/api/enroll/start", {"recipe": "cap", "camera": "cam1", "roi": list(PART_ROI)})
    for _ in range(3):
        assert theo.post("/api/enroll/capture", {"recipe": "cap", "camera": "cam1"}).status == 200
    step = theo.post("/api/enroll/defect/capture", {"recipe": "cap", "camera": "cam1", "defect_type": "dent"}).json()
    (defect,) = step["state"]["defects"]
    assert defect["name"].startswith("defect-cam1-") and defect["defect_type"] == "dent" and not defect["has_mask"]
    assert step["head"]["mode"] == "mil", "without a mask the head learns multiple-instance style"
    bad_type = theo.post("/api/enroll/defect/capture", {"recipe": "cap", "camera": "cam1", "defect_type": "../x"})
    assert bad_type.status == 400 and len(st.recipe("cap")["defects"]) == 1
