"""The station over the running line daemon: its cameras, engines, recipes, verdicts and LLM.

This is the station's one runtime: on a line the daemon talks MQTT to the PLC; a standalone
station (``web --config`` without an ``mqtt:`` section, or ``--standalone``) runs the same daemon
with a :class:`~anomalygpt_edge.runtime.delivery.null_link.NullLink` that publishes nowhere.

The page sees exactly what the PLC gets: every verdict the daemon publishes is recorded here
(with its image and heatmap overlay) from the daemon's after-verdict step, and LLM explanations
the daemon publishes are attached to their verdicts. Enrollment uses the daemon's own enroller for
the camera's bundle, and finishing it switches the camera's recipe in the daemon, as the MQTT
``cmd/recipe switch`` does.

:class:`DaemonStation` registers itself in the daemon's ``verdict_listeners`` and
``explanation_listeners``; the daemon calls them after its own work and shields itself from
their errors, and the station only enqueues there (JPEG encoding runs on its own thread).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.store import RecipeError
from anomalygpt_edge.runtime.web.learn_station import LearnMixin
from anomalygpt_edge.runtime.web.records import KEEP_OK_IMAGE_EVERY, make_record
from anomalygpt_edge.runtime.web.station_base import StationBase, bundle_status
from anomalygpt_edge.runtime.web.station_protocol import Frame, HistoryQuery, NotFoundError, StationError

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.daemon import Daemon

log = logging.getLogger(__name__)
#: Verdicts waiting for JPEG encoding; beyond this the page skips some (the PLC path never waits).
LOG_QUEUE = 32
#: History beyond memory: archive windows scanned backwards (first window, how far, how many at most).
ARCHIVE_WINDOW_S = 120.0
ARCHIVE_LOOKBACK_S = 7 * 86400.0
ARCHIVE_MAX_WINDOWS = 64
#: Archive records the page has listed, kept so their detail and images can be opened.
ARCHIVE_CACHE = 5000


class DaemonStation(LearnMixin, StationBase):
    """A :class:`~anomalygpt_edge.runtime.web.station.Station` over a started :class:`Daemon`
    (proposals, versions and rollback: :class:`~anomalygpt_edge.runtime.web.learn_station.LearnMixin`)."""

    def __init__(self, daemon: Daemon):
        super().__init__(daemon.store, self._daemon_explainer if daemon.config.llm.enabled else None)
        self.daemon = daemon
        self.dropped = 0
        self._queue: queue.Queue[tuple | None] = queue.Queue(LOG_QUEUE)
        self._archived: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._archived_lock = threading.Lock()
        self._spare_enroller: Enroller | None = None  # for a daemon without cameras (uploads only)
        self._spare_lock = threading.Lock()
        self._thread = threading.Thread(target=self._log_loop, name="station-log", daemon=True)
        self._thread.start()
        self._install_hooks()

    def _daemon_explainer(self) -> Any:
        """The daemon's own explainer: one model in memory, shared with its explanation worker."""
        if self.daemon.explainer is None:
            raise StationError("the daemon's LLM did not load")
        return self.daemon.explainer

    # -- hooks into the daemon ---------------------------------------------------------------------
    def _install_hooks(self) -> None:
        self.daemon.verdict_listeners.append(self._on_verdict)
        self.daemon.explanation_listeners.append(self._on_explanation)

    def _on_verdict(self, job: Any, vid: str, verdict: Verdict, msg: dict, image: np.ndarray | None) -> None:
        # Encoding JPEGs happens on the station's thread: the inspection worker only enqueues.
        try:
            captured = msg.get("captured_at_epoch") or job.captured_at or time.time()
            self._queue.put_nowait((job.camera, vid, verdict, dict(msg), image, captured))
        except queue.Full:
            self.dropped += 1

    def _on_explanation(self, request: Any, explanation: Any) -> None:
        if request.verdict_id and not request.key.startswith("ask"):  # MQTT questions are not history
            self.log.explain(request.verdict_id, explanation.text)

    def _log_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            camera, vid, verdict, msg, image, captured_at = item
            try:
                record = make_record(camera, verdict, msg.get("frame_seq"), captured_at, vid, msg)
                seq = record["frame_seq"] or 0
                keep = verdict.verdict != "OK" or seq % KEEP_OK_IMAGE_EVERY == 0
                self.log.add(record, image, verdict, keep)
            except Exception:  # noqa: BLE001 - the page may miss a verdict; the line must not notice
                log.exception("station: recording verdict %s failed", vid)

    def stop(self) -> None:
        """Stop the station's recorder thread (the daemon is stopped by its owner)."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    # -- cameras -------------------------------------------------------------------------------
    def camera_names(self) -> list[str]:
        return list(self.daemon.config.cameras)

    def _camera(self, name: str) -> Any:
        self._check_camera(name)
        cam = self.daemon.cameras.get(name)
        if cam is None:
            raise StationError(f"camera '{name}' is a watched folder: it has no live image")
        return cam

    def latest_frame(self, camera: str) -> Frame:
        cam = self._camera(camera)
        frame = cam.latest()
        if frame is None:
            why = f"{cam.status}: {cam.reason}" if cam.reason else cam.status
            raise StationError(f"camera '{camera}' has no frame ({why})")
        return frame

    def next_frame(self, camera: str, newer_than_seq: int) -> Frame:
        cam = self._camera(camera)
        frame = cam.wait_frame(newer_than_seq=newer_than_seq, timeout=2.0)
        if frame is None:
            raise StationError(f"camera '{camera}' delivered no new frame ({cam.status})")
        return frame

    def camera_recipe(self, camera: str) -> str | None:
        return self.daemon.recipe_names.get(camera)

    def enroller_for(self, camera: str | None) -> Enroller:
        d = self.daemon
        if camera is not None:
            return d.enrollers[d.bundle_key(camera)]
        default = d.config.engines.bundle.resolve()
        found = d.enrollers.get(default) or next(iter(d.enrollers.values()), None)
        return found if found is not None else self._own_enroller()

    def _own_enroller(self) -> Enroller:
        """An enroller on the config's bundle, for a daemon that opened none (it has no cameras)."""
        with self._spare_lock:
            if self._spare_enroller is None:
                from anomalygpt_edge.engines.bundle import EngineBundle

                engines = self.daemon.config.engines
                bundle = EngineBundle.open(
                    engines.bundle, backend=engines.bundle_options(), precision=engines.precision
                )
                self._spare_enroller = Enroller(self.store, bundle)
            return self._spare_enroller

    def cameras(self) -> list[dict[str, Any]]:
        d = self.daemon
        status = d.status()["cameras"]
        out = []
        for name in self.camera_names():
            s = status.get(name, {})
            cam = d.cameras.get(name)
            frame = cam.latest() if cam is not None else None
            inspector = d.inspectors.get(name)
            roi = inspector.recipe.roi if inspector is not None else None
            out.append(
                {
                    "name": name,
                    "kind": s.get("type"),
                    "status": s.get("status"),
                    "recipe": s.get("recipe"),
                    "live": s.get("live"),
                    "roi": list(roi) if roi else None,
                    "frame_size": list(frame.image.shape[1::-1]) if frame is not None else None,
                    "frame_seq": frame.seq if frame is not None else None,
                    "trigger": s.get("trigger"),
                    "inspection_error": s.get("problem"),
                    "reason": s.get("reason"),  # why a camera is not online
                    "skipped": s.get("skipped"),  # image-folder files that could not be read
                    "last_error": s.get("last_error"),
                    # The drift watch of the camera's recipe (plain-words ``message`` when it left its band).
                    "drift": s.get("drift"),
                    **self.log.rates(name),
                    # The daemon's own rolling figures (what its heartbeat publishes) win over ours.
                    **_daemon_rates(s),
                }
            )
        return out

    def enroll_start(
        self, recipe: str, camera: str | None, roi: tuple[int, int, int, int] | None, **settings: Any
    ) -> dict[str, Any]:
        """As :meth:`StationBase.enroll_start`, but a camera whose ROI the config fixes keeps that ROI."""
        binding = self.daemon.binding(camera) if camera is not None else None
        if binding is not None and binding.roi is not None:
            # The daemon inspects this camera with the config's ROI whatever the recipe says; a
            # different drawn ROI would enroll parts the line never looks at in that way.
            if roi is not None and tuple(roi) != tuple(binding.roi):
                raise StationError(
                    f"camera {camera}'s ROI is fixed by the daemon config at {list(binding.roi)}: "
                    "change it there, or enroll without drawing one"
                )
            roi = tuple(binding.roi)
        return super().enroll_start(recipe, camera, roi, **settings)

    def _step(self, recipe: str, result: Any) -> dict[str, Any]:
        """A step of an enrollment on the page is a draft until Finish: the cameras on ``recipe`` keep
        what they run, and the recipe watch is told the new ``recipe.json`` is the station's (it would
        take it for another process's and put a half-built recipe, say one with a defective part not
        yet removed, on the line)."""
        self.daemon.slots.keep_running(recipe)
        return super()._step(recipe, result)

    def enroll_finish(self, recipe: str, camera: str | None, accept_flagged: bool = False) -> dict[str, Any]:
        """As :meth:`StationBase.enroll_finish` (the enrolling camera goes live on it); then every other
        camera already on ``recipe`` runs the finished recipe too, as it would after a restart."""
        out = super().enroll_finish(recipe, camera, accept_flagged)
        self.daemon.slots.reload_users(recipe, except_camera=camera if out.get("live") else None)
        return out

    def assign(self, camera: str, recipe: str | None) -> dict[str, Any]:
        """Switch the daemon's recipe for ``camera``; one that cannot inspect is refused, the camera answers ERROR."""
        self._check_camera(camera)
        if recipe is None:
            raise StationError("the line daemon keeps a recipe on every bound camera: pick another recipe instead")
        try:
            previous = self.daemon.switch_recipe(camera, recipe)
        except RecipeError as exc:
            raise StationError(str(exc)) from None
        return {"camera": camera, "recipe": recipe, "previous": previous}

    # -- history: recent verdicts in memory, older ones from the daemon's archive ----------------------
    def _archive(self) -> Any:
        writer = self.daemon.archive
        return writer.archive if writer is not None else None

    def _after_label(self, verdict_id: str, at: float) -> None:
        self.daemon.proposals.on_label(verdict_id, at)  # the drift watch's labelled rates, auto-apply's count

    def labels_archive(self, flush: bool = False) -> Any:
        """The archive that holds verdict labels (None: none); ``flush`` writes queued verdicts first."""
        if flush and self.daemon.archive is not None:
            self.daemon.archive.flush(2.0)
        return self._archive()

    def history(self, query: HistoryQuery) -> list[dict[str, Any]]:
        """Newest first: the in-memory log, then the archive (which survives restarts) further back."""
        rows = self.log.query(query)
        archive = self._archive()
        if archive is None or len(rows) >= query.limit:
            return rows
        seen = {r["id"] for r in rows}
        # The archive answers oldest-first within a time window: walk windows backwards from the
        # oldest row we have (or `until`), doubling an empty window, until enough rows are found.
        end = min([r["ts"] for r in rows] + ([query.until] if query.until is not None else [time.time() + 1]))
        floor = query.since if query.since is not None else end - ARCHIVE_LOOKBACK_S
        span, scanned = ARCHIVE_WINDOW_S, 0
        verdicts = ("NG", "ERROR") if query.ng_only else (None,)
        while len(rows) < query.limit and end > floor and scanned < ARCHIVE_MAX_WINDOWS:
            start = max(floor, end - span)
            found: list[dict[str, Any]] = []
            for v in verdicts:
                found += archive.query(start, end, camera=query.camera, recipe=query.recipe, verdict=v)
            found = [self._from_archive(r) for r in found if r.get("id") not in seen]
            found.sort(key=lambda r: r["ts"], reverse=True)
            rows += found[: query.limit - len(rows)]
            seen.update(r["id"] for r in found)
            span = ARCHIVE_WINDOW_S if found else span * 2
            end, scanned = start, scanned + 1
        return rows

    def _from_archive(self, row: dict[str, Any]) -> dict[str, Any]:
        record = {**row, "ts": row.get("captured_at_epoch") or 0.0, "explanation": None}
        record["has_image"] = bool(row.get("image"))
        with self._archived_lock:
            self._archived[record["id"]] = record
            while len(self._archived) > ARCHIVE_CACHE:
                self._archived.popitem(last=False)
        return record

    def history_item(self, verdict_id: str) -> dict[str, Any]:
        try:
            return self.log.item(verdict_id)
        except NotFoundError:
            with self._archived_lock:
                record = self._archived.get(verdict_id)
            if record is None:
                raise
            return record

    def history_image(self, verdict_id: str, kind: str) -> bytes:
        try:
            return self.log.image(verdict_id, kind)
        except NotFoundError:
            with self._archived_lock:
                record = self._archived.get(verdict_id)
            archive = self._archive()
            rel = record.get(kind) if record is not None else None
            if not rel or archive is None:
                raise
            path = (archive.images_dir / rel).resolve()
            if archive.images_dir.resolve() not in path.parents:  # the archive's own paths only
                raise NotFoundError(f"no {kind} for verdict '{verdict_id}'") from None
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise NotFoundError(f"the {kind} of verdict '{verdict_id}' was evicted from the archive") from None

    # -- system ----------------------------------------------------------------------------------
    def system(self) -> dict[str, Any]:
        d = self.daemon
        first = next(iter(d.bundles.values()), None)
        engines = {}
        for key, pipeline in d.pipelines.items():
            engines[f"{key.name} encoder"] = pipeline.encoder.describe()
            engines[f"{key.name} matcher"] = pipeline.matcher.describe()
        link = d.link
        spool = d.spool.stats() if d.spool is not None else None
        archive = d.archive.archive.stats.to_json() if d.archive is not None else None
        return {
            **self._versions(),
            "device": d.config.device_id,
            "bundle": bundle_status(first) if first is not None else None,
            "bundles": [bundle_status(b) for b in d.bundles.values()],
            "backend": d.config.engines.backend.type,
            "engines": engines,
            "cameras": self.cameras(),
            "warnings": d.status().get("warnings") or [],  # the drift watch's plain words, per camera
            "spool_depth": spool["depth"] if spool else None,
            "spool": spool,
            "broker": _broker_status(d.config, link),
            "archive": archive,
            "llm": {**self._llm_status(), "loaded": d.explainer is not None},
            "station_dropped": self.dropped,
        }


def _broker_status(config: Any, link: Any) -> dict[str, Any]:
    """The broker as the system page shows it; a standalone station's null link says it has none."""
    out: dict[str, Any] = {"connected": link.connected.is_set() if link is not None else False}
    note = getattr(link, "note", None)
    mqtt = getattr(config, "mqtt", None)
    if note is not None:
        out["note"] = note
    elif mqtt is not None:
        out.update(host=mqtt.host, port=mqtt.port, protocol=mqtt.protocol)
    return {**out, **(dict(link.stats) if link is not None else {})}


def _daemon_rates(status: dict[str, Any]) -> dict[str, Any]:
    """Per-camera fps and latency percentiles from the daemon's health figures, when it has them."""
    out: dict[str, Any] = {}
    if status.get("inspected_fps") is not None:
        out["inspect_fps"] = status["inspected_fps"]
    lat = status.get("latency_ms")
    if isinstance(lat, dict):
        out["latency_ms_p50"] = lat.get("p50")
        out["latency_ms_p99"] = lat.get("p99")
    return out


def attach(daemon: Daemon, config: Any) -> tuple[Any, DaemonStation]:
    """Serve the station for a started daemon: returns the running server and the station.

    ``config`` is a :class:`~anomalygpt_edge.runtime.web.server.WebConfig`. Stop with
    ``server.stop(); station.stop()`` before ``daemon.stop()``.
    """
    from anomalygpt_edge.runtime.web.server import StationServer

    station = DaemonStation(daemon)
    try:
        server = StationServer(station, config).start()
    except BaseException:
        station.stop()
        raise
    return server, station
