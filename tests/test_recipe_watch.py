"""The recipe watch (runtime/line/recipe_watch.py) on a running daemon (real mosquitto, real engines):
a recipe committed by a separate process (the CLI's ``recipe rollback``) reaches the cameras on it
within a bounded wait, the status lists the reload and the verdicts carry the new threshold and bank
version; a touch of ``recipe.json`` reloads nothing; a damaged commit leaves the camera answering
ERROR with the reason; the daemon's own MQTT rollback reloads once, not twice (and an MQTT enrollment
with switch: false reloads the camera on that recipe itself, at once); a failing check is
reported to the health and the watch goes on; ``storage.recipe_watch_s: 0`` turns it off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    delivering,
    line_fixture,
    two_bracket_versions,
    write_config,
)
from faults import wait_until
from pytest import approx  # verdicts carry the threshold rounded to 5 significant digits

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.runtime.line.config import load_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.line.recipe_slots import commit_stat
from anomalygpt_edge.runtime.line.recipe_watch import OTHER_WRITER, SETTLE_S
from anomalygpt_edge.runtime.recipes.store import RecipeStore

WATCH_S = 0.2  # the watch's interval in these tests: a foreign commit is live within WATCH_S + SETTLE_S


def _daemon(tmp_path: Path, broker: Any, line: dict, device: str, watch_s: float, **extra: Any) -> Daemon:
    cameras = {"cam1": {"type": "video_file", "source": str(line["video"]), "fps": 10}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 5000}]
    path = write_config(
        tmp_path / f"{device}.yaml", broker, cameras, recipes, tmp_path / "store", line["bundle"], device
    )
    cfg = json.loads(path.read_text())
    cfg["storage"]["recipe_watch_s"] = watch_s
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return delivering(Daemon(load_config(path)).start())


def _cli_rollback(store: Path) -> str:
    """``anomalygpt-edge recipe rollback`` in a process of its own, as a technician runs it beside the daemon."""
    done = subprocess.run(
        [sys.executable, "-m", "anomalygpt_edge", "recipe", "rollback", "--store", str(store), "--recipe", "bracket"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _reloads(daemon: Daemon) -> list[dict[str, Any]]:
    return [c for c in daemon.slots.changes if c["action"] == "reload"]


def test_a_cli_rollback_in_another_process_reaches_the_running_daemon_a_touch_does_not_and_damage_is_an_error(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    store, old, new = two_bracket_versions(tmp_path, line)
    recipe_json = store.folder("bracket") / "recipe.json"
    sub = Subscriber(broker, ["anomalygpt/rw1/#", "tech/rw1"])
    daemon = _daemon(tmp_path, broker, line, "rw1", WATCH_S)
    try:
        before = sub.ask("rw1", "trigger", {"camera": "cam1", "part_id": "p1"})
        inspector = daemon.slots.current("cam1")[0]

        # A touch: a new modification time, the same content. The watch notes the new stat, no reload.
        stat = recipe_json.stat()
        os.utime(recipe_json, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        touched = commit_stat(recipe_json)
        assert wait_until(lambda: daemon.slots.stamps["cam1"].stat == touched, timeout=10), "the touch was not seen"
        assert daemon.slots.current("cam1")[0] is inspector and not _reloads(daemon)

        printed = _cli_rollback(store.root)
        status = sub.wait_for(
            lambda m: (
                m.topic == "anomalygpt/rw1/status"
                and any(c["action"] == "reload" for c in m.json().get("recipe_changes") or [])
            ),
            timeout=20,
        )[0].json()
        after = sub.ask("rw1", "trigger", {"camera": "cam1", "part_id": "p2"})
        reloads_after_rollback = _reloads(daemon)

        # A damaged commit (an atomic replace, as a writer's): the camera answers ERROR with the reason.
        atomic_write_bytes(recipe_json, b'{"format": 2, "name": "bracket"')
        assert wait_until(lambda: daemon.slots.current("cam1")[0] is None, timeout=10), "the damage was not seen"
        damaged = sub.ask("rw1", "trigger", {"camera": "cam1", "part_id": "p3"})
        damaged_status = daemon.status()
        reloads = _reloads(daemon)
    finally:
        daemon.stop()
        sub.close()
    assert before["threshold"] == approx(new.threshold.value, rel=1e-4) and before["bank_version"] == new.bank_version
    assert printed.startswith(f"recipe bracket: v{old.bank_version} live again"), printed
    change = next(c for c in status["recipe_changes"] if c["action"] == "reload")
    assert (change["recipe"], change["from"], change["to"], change["by"], change["cameras"]) == (
        "bracket",
        new.bank_version,
        old.bank_version,
        OTHER_WRITER,
        ["cam1"],
    ), change
    assert change["threshold"] == old.threshold.value and "problem" not in change
    assert len(reloads_after_rollback) == 1, "one commit, one reload"
    assert after["verdict"] in ("OK", "NG"), after
    assert after["threshold"] == approx(old.threshold.value, rel=1e-4) and after["bank_version"] == old.bank_version
    assert damaged["verdict"] == "ERROR" and "unreadable recipe" in damaged["reason"], damaged
    assert "recipe.json" in damaged["reason"], "the reason names the file"
    assert len(reloads) == 2 and reloads[-1]["to"] is None and "unreadable recipe" in reloads[-1]["problem"]
    camera = damaged_status["cameras"]["cam1"]
    assert camera["live"] is False and "unreadable recipe" in camera["problem"], camera


def test_the_daemons_own_mqtt_rollback_reloads_once_and_a_failing_check_is_reported_not_fatal(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    store, old, new = two_bracket_versions(tmp_path, line)
    sub = Subscriber(broker, ["anomalygpt/rw2/#", "tech/rw2"])
    daemon = _daemon(tmp_path, broker, line, "rw2", WATCH_S, commands={"allowed_client_ids": ["station-tech"]})
    watch = daemon.recipe_watch
    assert watch is not None
    loads: list[str] = []
    load_recipe = daemon.slots.load_recipe

    def counted(camera: str, name: str) -> Any:
        loads.append(camera)
        return load_recipe(camera, name)

    daemon.slots.load_recipe = counted  # type: ignore[method-assign]  # reload_users looks it up per call
    try:
        rolled = sub.ask("rw2", "recipe", {"action": "rollback", "recipe": "bracket", "client_id": "station-tech"})
        inspector = daemon.slots.current("cam1")[0]
        # Long enough for a second reload to have happened: several looks past the settle time.
        looks = watch.looks
        settled = time.monotonic() + 2 * SETTLE_S
        assert wait_until(lambda: watch.looks >= looks + 3 and time.monotonic() > settled, timeout=10)
        after = sub.ask("rw2", "trigger", {"camera": "cam1", "part_id": "p1"})

        # A check that fails (a fault injected into the slots the watch reads) is reported and survived.
        stamps_of = daemon.slots.stamps_of

        def broken(recipe: str) -> Any:
            raise RuntimeError("injected fault")

        daemon.slots.stamps_of = broken  # type: ignore[method-assign]
        assert wait_until(
            lambda: "recipe watch" in str((daemon.status().get("last_error") or {}).get("message")), timeout=10
        )
        failing = daemon.status()["last_error"]["message"]
        daemon.slots.stamps_of = stamps_of  # type: ignore[method-assign]
        looks = watch.looks
        assert wait_until(lambda: watch.looks > looks + 1, timeout=10), "the watch stopped after a failing check"
        alive = [t.name for t in threading.enumerate() if t.name == "recipe-watch" and t.is_alive()]
    finally:
        daemon.stop()
        sub.close()
    assert rolled["ok"] and rolled["bank_version"] == old.bank_version and rolled["previous"] == new.bank_version
    assert loads == ["cam1"], "the rollback's own reload only: the watch did not reload it again"
    assert daemon.slots.current("cam1")[0] is inspector
    assert [c["action"] for c in daemon.slots.changes] == ["rollback"]
    assert after["threshold"] == approx(old.threshold.value, rel=1e-4) and after["bank_version"] == old.bank_version
    assert "recipe bracket: check failed: RuntimeError('injected fault')" in failing, failing
    assert alive == ["recipe-watch"]


def test_recipe_watch_s_0_turns_the_watch_off(tmp_path: Path, broker: Any, line: dict) -> None:
    store, old, new = two_bracket_versions(tmp_path, line)
    sub = Subscriber(broker, ["anomalygpt/rw3/#", "tech/rw3"])
    daemon = _daemon(tmp_path, broker, line, "rw3", 0)
    try:
        threads = [t.name for t in threading.enumerate()]
        _cli_rollback(store.root)
        # The scenario is an absence: with the watch on, this is several times WATCH_S + SETTLE_S.
        time.sleep(4 * (WATCH_S + SETTLE_S))
        after = sub.ask("rw3", "trigger", {"camera": "cam1", "part_id": "p1"})
    finally:
        daemon.stop()
        sub.close()
    assert daemon.recipe_watch is None and "recipe-watch" not in threads
    assert store.load("bracket").bank_version == old.bank_version, "the CLI did roll back"
    assert after["threshold"] == approx(new.threshold.value, rel=1e-4) and after["bank_version"] == new.bank_version
    assert not daemon.slots.changes


def _golden_line(tmp_path: Path, broker: Any, line: dict, device: str) -> tuple[RecipeStore, Daemon]:
    """A copy of the module's store and a daemon whose cam1 shows golden parts and runs ``bracket``."""
    shutil.copytree(line["store"], tmp_path / "store")
    cameras = {"cam1": {"type": "video_file", "source": str(line["golden"]), "fps": 20, "loop": True}}
    recipes = [{"camera": "cam1", "recipe": "bracket", "trigger": "mqtt", "deadline_ms": 5000}]
    path = write_config(
        tmp_path / f"{device}.yaml", broker, cameras, recipes, tmp_path / "store", line["bundle"], device
    )
    cfg = json.loads(path.read_text())
    cfg["storage"]["recipe_watch_s"] = WATCH_S
    cfg["commands"] = {"allow_anonymous_control": True}
    path.write_text(json.dumps(cfg))
    return RecipeStore(tmp_path / "store"), delivering(Daemon(load_config(path)).start())


def _settled(watch: Any) -> bool:
    """Wait until the watch has looked several times past the settle time (a reload would have happened)."""
    looks, settled = watch.looks, time.monotonic() + 2 * SETTLE_S
    return wait_until(lambda: watch.looks >= looks + 3 and time.monotonic() > settled, timeout=10)


def test_an_mqtt_enrollment_with_switch_false_reaches_the_camera_on_that_recipe_at_once_not_by_the_watch(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    sub = Subscriber(broker, ["anomalygpt/rw4/#", "tech/rw4"])
    store, daemon = _golden_line(tmp_path, broker, line, "rw4")
    before = store.load("bracket").bank_version
    watch = daemon.recipe_watch
    assert watch is not None
    try:
        assert sub.ask("rw4", "enroll", {"action": "start", "camera": "cam1", "recipe": "bracket"})["ok"]
        for _ in range(2):
            assert sub.ask("rw4", "enroll", {"action": "add", "camera": "cam1"})["ok"]
        done = sub.ask(
            "rw4",
            "enroll",
            {"action": "finish", "camera": "cam1", "switch": False, "accept_flagged": True},
            timeout=60,
        )
        running = daemon.slots.current("cam1")[0]
        assert _settled(watch)
        verdict = sub.ask("rw4", "trigger", {"camera": "cam1", "part_id": "p1"})
    finally:
        daemon.stop()
        sub.close()
    committed = store.load("bracket")
    assert done["ok"] and done["live"] and "switched" not in done, done
    assert committed.bank_version > before
    assert running is not None and running.recipe.bank_version == committed.bank_version, (
        "the camera already on the recipe runs the enrolled version as soon as the reply is out"
    )
    assert not _reloads(daemon), "the desk reloaded it itself: no reload attributed to another process"
    assert verdict["bank_version"] == committed.bank_version, verdict


def test_a_station_enrollment_step_is_a_draft_the_line_gets_at_finish_and_the_watch_does_not_reload(
    tmp_path: Path, broker: Any, line: dict
) -> None:
    from anomalygpt_edge.runtime.web.daemon_station import DaemonStation

    store, daemon = _golden_line(tmp_path, broker, line, "rw5")
    before = store.load("bracket").bank_version
    watch = daemon.recipe_watch
    assert watch is not None
    try:
        station = DaemonStation(daemon)
        running = daemon.slots.current("cam1")[0]
        # A golden frame of the line's camera with one pixel changed: a new file (the ones the
        # recipe was enrolled from are skipped by their hash), the same good part.
        image = station.next_frame("cam1", -1).image.copy()
        image[0, 0] ^= 1
        step = station.enroll_upload("bracket", [("fresh.png", cv2.imencode(".png", image)[1].tobytes())])
        drafted = store.load("bracket").bank_version
        assert _settled(watch)
        during = daemon.slots.current("cam1")[0]
        done = station.enroll_finish("bracket", None)
        after = daemon.slots.current("cam1")[0]
        assert _settled(watch)
    finally:
        daemon.stop()
    committed = store.load("bracket")
    assert drafted > before and step["k"] == len(committed.samples), (before, step)
    assert during is running, "a step on the page is a draft: the camera keeps what it runs"
    assert done["live"] and after is not None and after.recipe.bank_version == committed.bank_version, (
        "at Finish the camera on the recipe runs the finished recipe"
    )
    assert not _reloads(daemon), "no reload attributed to another process, during the draft or after"
