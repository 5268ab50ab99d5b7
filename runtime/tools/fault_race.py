"""Row 4 of the fault bench: one recipe enrolled from the station and over MQTT at the same time."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.tools.fault_recipes import recipe_config
from anomalygpt_edge.runtime.tools.fault_rig import Plc, Rig, start_daemon, wait_online, wait_until

RECIPE = "race"


def _png(image: Any) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


@dataclass
class _Race:
    """The rounds' shared parts (PLC, station, store) and the figures they add up."""

    plc: Plc
    station: Any
    store: Any
    frames: int
    problems: list[str] = field(default_factory=list)
    acknowledged: int = 0
    lost: int = 0
    replies: int = 0
    expected_replies: int = 0
    rebuilt: int = 0
    ks: list[dict[str, int]] = field(default_factory=list)

    def ask(self, body: dict[str, Any], corr: str, timeout: float) -> dict[str, Any]:
        """One MQTT enroll command and its reply (``{}`` when none came), counted."""
        self.plc.command("enroll", body, corr)
        self.expected_replies += 1
        reply = self.plc.reply(corr, timeout) or {}
        self.replies += reply != {}
        return reply

    def round(self, r: int, batch: list) -> None:
        """An MQTT session of ``frames`` frames and a station upload of ``batch`` finish at once."""
        start = self.ask({"action": "start", "camera": "cam1", "recipe": RECIPE}, f"r{r}-start", 20)
        if not start.get("ok"):
            self.problems.append(f"round {r}: MQTT start refused: {self.plc.answers.get(f'r{r}-start')}")
            return
        for i in range(self.frames):
            self.acknowledged += bool(self.ask({"action": "add", "camera": "cam1"}, f"r{r}-add{i}", 20).get("ok"))
        k0 = len(self.store.load(RECIPE).samples)
        station_out, mqtt = self._finish_both(r, batch)
        if "error" in station_out or not mqtt.get("ok"):
            self.problems.append(f"round {r}: station {station_out.get('error')}, MQTT {mqtt.get('error')}")
            return
        self._check_commit(r, k0, mqtt, station_out)
        try:
            self.station.enroll_finish(RECIPE, None, accept_flagged=True)  # the station's rebuild
            self.rebuilt += 1
        except Exception as exc:  # noqa: BLE001 - a recipe that cannot be edited is what this finds
            self.problems.append(f"round {r}: rebuild failed: {exc!r}")

    def _finish_both(self, r: int, batch: list) -> tuple[dict[str, Any], dict[str, Any]]:
        """The station's upload and the MQTT finish released by one barrier; both replies."""
        station_out: dict[str, Any] = {}
        go = threading.Barrier(2)

        def upload() -> None:
            go.wait(10)
            try:
                station_out.update(self.station.enroll_upload(RECIPE, [(n, _png(im)) for n, im in batch]))
            except Exception as exc:  # reported as a problem of this round
                station_out["error"] = repr(exc)

        thread = threading.Thread(target=upload, name="station-upload")
        thread.start()
        go.wait(10)
        finish = {"action": "finish", "camera": "cam1", "accept_flagged": True, "switch": False}
        self.plc.command("enroll", finish, f"r{r}-finish")
        self.expected_replies += 1
        thread.join(60)
        mqtt = self.plc.reply(f"r{r}-finish", 60) or {}
        self.replies += mqtt != {}
        return station_out, mqtt

    def _check_commit(self, r: int, k0: int, mqtt: dict[str, Any], station_out: dict[str, Any]) -> None:
        """The committed recipe holds every acknowledged frame and file; each reply's k is its writer's."""
        committed = self.store.load(RECIPE)
        names = {s.name for s in committed.samples}
        acked = list(mqtt.get("added", [])) + list(station_out.get("added", []))
        self.lost += sum(n not in names for n in acked)
        # Frames an add acknowledged that the finish neither enrolled nor skipped as duplicates.
        self.lost += max(0, self.frames - len(mqtt.get("added", [])) - len(mqtt.get("skipped", [])))
        missing = [
            f"{s.name}.{ext}"
            for s in committed.samples
            for ext in ("png", "npz")
            if not self.store.sample_path(RECIPE, s.sha256, ext).is_file()
        ]
        if missing:
            self.problems.append(f"round {r}: recipe.json names missing files {missing[:4]}")
        a_m, a_s = len(mqtt.get("added", [])), len(station_out.get("added", []))
        k_m, k_s, final = int(mqtt.get("k", -1)), int(station_out.get("k", -1)), len(committed.samples)
        self.ks.append({"before": k0, "mqtt": k_m, "station": k_s, "final": final})
        # Serialised: the first writer's k is k0 + its own frames, the second's is the final recipe.
        if final != k0 + a_m + a_s or max(k_m, k_s) != final or min(k_m, k_s) not in (k0 + a_m, k0 + a_s):
            self.problems.append(f"round {r}: replies k mqtt={k_m} station={k_s}, before {k0}, final {final}")


def racing_enroll(rig: Rig, work: Path, rounds: int = 3, frames: int = 3, uploads: int = 3) -> dict[str, Any]:
    """Row 4: each round, an MQTT session (``frames`` camera frames) and a station upload
    (``uploads`` images) finish the same recipe at the same moment, through the real daemon and
    the real :class:`DaemonStation`; then the committed recipe is checked and rebuilt."""
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.tools import synthetic
    from anomalygpt_edge.runtime.web.daemon_station import DaemonStation

    device = "frace"
    store_dir = work / "race-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = RecipeStore(store_dir)
    cfg = recipe_config(work / "race.yaml", rig, device, work / "race-state", store_dir, {"cam1": rig.recipe})
    plc = Plc(rig, device)
    daemon = start_daemon(cfg)
    station = DaemonStation(daemon)
    images = synthetic.golden_images(4 + rounds * uploads, seed=99)
    race = _Race(plc, station, store, frames)
    t_start = time.time()
    try:
        if not wait_online(plc):
            raise RuntimeError("the daemon never published its status")
        wait_until(lambda: daemon.cameras["cam1"].online, 10)
        station.enroll_start(RECIPE, "cam1", synthetic.PART_ROI)
        station.enroll_upload(RECIPE, [(n, _png(im)) for n, im in images[:4]])
        for r in range(rounds):
            race.round(r, images[4 + r * uploads : 4 + (r + 1) * uploads])
        leftovers = [str(p.relative_to(store_dir)) for p in store_dir.rglob(".*.tmp")]
        if leftovers:
            race.problems.append(f"temporary files left: {leftovers[:4]}")
    finally:
        station.stop()
        daemon.stop()
        plc.close()
    return {
        "fault": "racing_enroll",
        "sent": race.expected_replies,
        "answered": race.replies,
        "in_time": None,
        "errors": None,
        "lost": race.lost,
        "duplicates": 0,
        "recovery_s": None,
        "rounds": rounds,
        "acknowledged_frames": race.acknowledged,
        "rebuilt": race.rebuilt,
        "k": race.ks,
        "problems": race.problems,
        "seconds": round(time.time() - t_start, 1),
    }
