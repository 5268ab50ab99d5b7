"""The drift watch on a real daemon: good parts through a watched folder leave it quiet; the same
parts slightly out of focus (a lens drifting) still pass, score higher, and the retained status
heartbeat (real mosquitto) and ``/metrics`` say so in plain words, while the daemon stays online;
a recipe switch starts the watch over."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    ONE_CAMERA_CONFIG,
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)

from anomalygpt_edge.runtime.line.config import ConfigError, load_config, parse_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.tools import synthetic
from anomalygpt_edge.runtime.tools.local_broker import LocalBroker

DRIFT = "good parts score higher than at enrollment"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _defocused(image: np.ndarray) -> np.ndarray:
    """The part as a slowly defocusing lens sees it: 70 % of a 3x3 Gaussian blur."""
    return cv2.addWeighted(image, 0.3, cv2.GaussianBlur(image, (3, 3), 0), 0.7, 0)


def _drop(inbox: Path, name: str, image: np.ndarray) -> None:
    tmp = inbox / f".{name}.tmp.png"
    cv2.imwrite(str(tmp), image)
    tmp.rename(inbox / f"{name}.png")


def _status_of(sub: Subscriber, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
    return sub.wait_for(lambda m: m.topic.endswith("/status") and pred(m.json()), timeout=timeout)[0].json()


def test_drifting_parts_are_named_in_the_status_heartbeat_and_metrics(
    tmp_path: Path, broker: LocalBroker, line: dict
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    port = _free_port()
    cameras = {"inbox": {"type": "image_folder", "source": str(inbox)}}
    recipes = [{"camera": "inbox", "recipe": "bracket", "trigger": "folder_watch", "deadline_ms": 5000}]
    cfg_path = write_config(tmp_path / "d.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="dw")
    cfg = json.loads(cfg_path.read_text())
    cfg["health"] = {"heartbeat_s": 0.5, "metrics_bind": f"127.0.0.1:{port}"}
    cfg["drift"] = {"window_parts": 16, "min_parts": 8}
    cfg_path.write_text(json.dumps(cfg))
    synthetic.write_golden_video(tmp_path / "more.avi", 16, seed=3)  # good parts the recipe never saw
    parts = synthetic.read_video_frames(tmp_path / "more.avi")
    sub = Subscriber(broker, ["anomalygpt/dw/#"])
    daemon = Daemon(load_config(cfg_path)).start()
    try:
        for i, part in enumerate(parts[:10]):
            _drop(inbox, f"good-{i}", part)
        sub.wait_for(topic_is("/inbox/verdict"), count=10, timeout=60)
        quiet = _status_of(sub, lambda s: (s["cameras"]["inbox"].get("drift") or {}).get("passed_parts", 0) >= 10)
        for i, part in enumerate(parts):
            _drop(inbox, f"blurred-{i}", _defocused(part))
        sub.wait_for(topic_is("/inbox/verdict"), count=26, timeout=90)
        loud = _status_of(sub, lambda s: any(DRIFT in w for w in s.get("warnings", [])))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        states = daemon.drift_states()
        labelled = daemon.drift.on_label("inbox", "good", "OK")  # the label path's hook
        daemon.switch_recipe("inbox", "bracket")  # a reload: a new inspector, the watch starts over
        after_switch = daemon.drift_states()
    finally:
        daemon.stop()
        sub.close()
    assert quiet["warnings"] == [] and quiet["cameras"]["inbox"]["drift"]["message"] is None
    assert quiet["cameras"]["inbox"]["drift"]["drifting"] is False
    drift = loud["cameras"]["inbox"]["drift"]
    assert drift["recipe"] == "bracket" and drift["drifting"] is True
    assert drift["message"].startswith(f"recipe bracket: {DRIFT}")
    assert "expected false rejects now ≈" in drift["message"]
    assert loud["warnings"][0].startswith(f"camera inbox: recipe bracket: {DRIFT}")
    assert loud["state"] == "online"  # the daemon works: drift is a warning, not a problem
    assert 'anomalygpt_edge_drift_flag{camera="inbox",recipe="bracket"} 1.0' in metrics
    assert 'anomalygpt_edge_expected_false_reject_rate{camera="inbox",recipe="bracket"}' in metrics
    assert 'anomalygpt_edge_drift_auc{camera="inbox",recipe="bracket"}' in metrics
    assert states["inbox"]["drifting"] is True
    assert labelled == 1 and daemon.drift.on_label("bracket", "good", "OK") == 0  # the watch started over
    assert after_switch == {}


def test_drift_watch_off_says_nothing(tmp_path: Path, broker: LocalBroker, line: dict) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cameras = {"inbox": {"type": "image_folder", "source": str(inbox)}}
    recipes = [{"camera": "inbox", "recipe": "bracket", "trigger": "folder_watch", "deadline_ms": 5000}]
    cfg_path = write_config(tmp_path / "o.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="do")
    cfg = json.loads(cfg_path.read_text())
    cfg["drift"] = {"enabled": False}
    cfg_path.write_text(json.dumps(cfg))
    sub = Subscriber(broker, ["anomalygpt/do/#"])
    daemon = Daemon(load_config(cfg_path)).start()
    try:
        _drop(inbox, "blurred", _defocused(synthetic.read_video_frames(line["golden"])[0]))
        sub.wait_for(topic_is("/inbox/verdict"), timeout=60)
        status = daemon.status()
    finally:
        daemon.stop()
        sub.close()
    assert status["warnings"] == [] and status["cameras"]["inbox"]["drift"] is None
    assert daemon.drift_states() == {}


DRIFT_CONFIG = ONE_CAMERA_CONFIG + "drift:\n  window_parts: {window}\n  min_parts: {min_parts}\n"


@pytest.mark.parametrize(
    ("window", "min_parts", "expected"),
    [
        ("1", "1", "line.yaml:11: drift.window_parts: must be an integer between 2 and 5000, got 1"),
        ("lots", "5", "line.yaml:11: drift.window_parts: must be an integer between 2 and 5000, got 'lots'"),
        ("100", "300", "line.yaml:12: drift.min_parts: must be at most window_parts (100)"),
        ("100\n  window_hour: 3", "5", "line.yaml:12: drift.window_hour: unknown key"),
    ],
)
def test_a_bad_drift_section_is_named_with_its_line(window: str, min_parts: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(DRIFT_CONFIG.format(window=window, min_parts=min_parts), "line.yaml")
    assert str(err.value).startswith(expected)


def test_the_drift_section_defaults_to_on_with_a_200_part_window() -> None:
    cfg = parse_config(DRIFT_CONFIG.format(window=200, min_parts=30).replace("drift:\n", "drift:\n  window_hours: 8\n"))
    assert cfg.drift.enabled and cfg.drift.window_parts == 200 and cfg.drift.window_hours == 8.0


def test_a_new_version_of_the_live_recipe_keeps_the_labels_a_switch_does_not(
    tmp_path: Path, default_bundle_dir: Path
) -> None:
    """DriftWatches rebuilds a camera's watch when its inspector changes: an applied proposal (a new
    version of the same recipe) keeps the labels window, whose defect share the bands allow for; a
    switch to another recipe starts with none."""
    import parts

    from anomalygpt_edge.engines import EngineBundle
    from anomalygpt_edge.runtime.line.drift_watch import DriftConfig, DriftWatches
    from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.inspector import Inspector
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    base = "device:\n  id: d\ncameras:\n  cam1:\n    type: video_file\n    source: a.avi\n"
    config = parse_config(base + "recipes:\n  - camera: cam1\n    recipe: plate\n", "line.yaml")
    store, bundle = RecipeStore(tmp_path / "store"), EngineBundle.open(default_bundle_dir)
    enroller = Enroller(store, bundle)
    for name in ("plate", "other"):
        enroller.create(name)
        enroller.add(name, [(f"good_{i}.png", parts.good_part(i)) for i in range(10)], accept_flagged=True)
    slots = RecipeSlots(config, store)
    watches = DriftWatches(DriftConfig(), slots)

    def go_live(name: str) -> Inspector:
        inspector = Inspector(bundle, store.load(name), store)
        slots.inspectors["cam1"], slots.recipe_names["cam1"] = inspector, name
        watches.observe("cam1", inspector.inspect(parts.good_part(50)))
        return inspector

    go_live("plate")
    for label, verdict in (("defect", "OK"), ("defect", "NG"), ("good", "OK")):
        assert watches.on_label("cam1", label, verdict) == 1
    enroller.add("plate", [("good_new.png", parts.good_part(60))], accept_flagged=True)  # a new version goes live
    go_live("plate")
    state = watches.states()["cam1"]
    assert (state["recipe"], state["labelled_defect"], state["labelled_good"]) == ("plate", 2, 1)
    assert state["passed_parts"] <= 1  # the parts window started over on the new version
    go_live("other")
    state = watches.states()["cam1"]
    assert (state["recipe"], state["labelled_defect"], state["labelled_good"]) == ("other", 0, 0)


def test_a_failing_drift_watch_never_fails_the_verdict_and_is_reported_to_health(
    tmp_path: Path, default_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import parts

    from anomalygpt_edge.calibration.drift import DriftWatch
    from anomalygpt_edge.engines import EngineBundle
    from anomalygpt_edge.runtime.line.drift_watch import DriftConfig, DriftWatches
    from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.inspector import Inspector
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    base = "device:\n  id: d\ncameras:\n  cam1:\n    type: video_file\n    source: a.avi\n"
    config = parse_config(base + "recipes:\n  - camera: cam1\n    recipe: plate\n", "line.yaml")
    store, bundle = RecipeStore(tmp_path / "store"), EngineBundle.open(default_bundle_dir)
    enroller = Enroller(store, bundle)
    enroller.create("plate")
    enroller.add("plate", [(f"good_{i}.png", parts.good_part(i)) for i in range(5)], accept_flagged=True)
    slots = RecipeSlots(config, store)
    inspector = Inspector(bundle, store.load("plate"), store)
    slots.inspectors["cam1"], slots.recipe_names["cam1"] = inspector, "plate"
    errors: list[tuple[str, str | None]] = []
    watches = DriftWatches(DriftConfig(), slots, lambda message, camera: errors.append((message, camera)))

    def broken(self: DriftWatch, score: float, verdict: str, at: float | None = None) -> None:
        raise RuntimeError("injected drift-watch fault")

    monkeypatch.setattr(DriftWatch, "observe", broken)
    watches.observe("cam1", inspector.inspect(parts.good_part(50)))  # must not raise
    assert errors == [("camera cam1: drift watch failed: RuntimeError('injected drift-watch fault')", "cam1")]
