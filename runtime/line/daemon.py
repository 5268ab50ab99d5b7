"""The line daemon: camera frames in, verdicts out over MQTT, within each recipe's deadline.

Threads (few and named, so ``py-spy dump`` reads like the design):

* ``camera-<name>``: one per camera, keeps only the newest frame (see :class:`Camera`);
* ``inspect-<n>``: one per engine bundle; cameras sharing a bundle share its engines and its
  worker, which takes triggered parts first, then free-run frames (see :class:`WorkQueue`);
* ``deadline-watchdog``: answers a triggered part with an ERROR verdict the moment its deadline
  passes while it still waits for a frame, a queue slot or the engine;
* ``watch-<camera>``: one per folder-watch recipe, turning new files into parts;
* ``commands``: slow MQTT commands (enrollment, recipe switches, questions), off paho's thread;
* paho's network thread; ``explanation-worker`` when an LLM is enabled.

Every loop of ours (inspection, folder watch, camera grabbing, commands, explanations) is started
through :meth:`Daemon._spawn`; the deadline watchdog guards itself; the verdict sender, the
archive writer and paho's thread are watched (a dead one is a problem and stops the pings).

Fail safe: every triggered part gets exactly one answer (:meth:`Job.claim`); an engine error, a
deadline overrun or a camera lost during a trigger is an explicit ERROR verdict with its reason.

Faults (issue 12): answering never touches the disk on the answering thread (the verdict sender
group-commits to the spool and replies as soon as the batch is durable, or at once from memory
when the spool cannot commit); the deadline watchdog answers a little *before* the deadline, so
the answer arrives in time; every long-lived thread runs under a last-resort handler that records
the error, restarts the loop and marks the status ``degraded`` (a loop that keeps dying is marked
dead, which stops the systemd watchdog pings); full disks, stores moved aside and dead threads
are reasons in the status's ``problems`` with ``state: degraded``.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import anomalygpt_edge
from anomalygpt_edge.engines.base import create_engine, resolve_backend
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError, crop_roi, list_images, read_image
from anomalygpt_edge.runtime.cameras.base import Camera, Frame, create_source
from anomalygpt_edge.runtime.delivery.messages import (
    EXPLANATION_SCHEMA,
    STATUS_SCHEMA,
    finish_and_encode,
    iso,
    uuid7,
    verdict_message,
)
from anomalygpt_edge.runtime.delivery.mqtt_link import Command, MqttLink
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.config import DaemonConfig, RecipeBinding
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.recipes.enrollment import Enroller
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore

log = logging.getLogger(__name__)
FOLDER_POLL_S = 0.05
#: A folder-watch file still 0 bytes after this long (or the binding's settle_ms) is answered ERROR.
EMPTY_FILE_SETTLE_S = 1.0
#: The deadline watchdog answers this share of the deadline early (at most ANSWER_MARGIN_MAX_S),
#: leaving time to publish, so the ERROR reaches the PLC before the deadline rather than after it.
ANSWER_MARGIN = 0.15
ANSWER_MARGIN_MAX_S = 0.15
#: A supervised loop that crashes this often within CRASH_WINDOW_S is given up on (marked dead).
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
#: How long a store moved aside at start-up keeps the status degraded.
EVENT_DEGRADED_S = 300.0
#: How long a loop that crashed and was restarted keeps the status degraded: long enough for a
#: few heartbeats to carry it, short enough that a restarted loop that stays up clears by itself.
CRASH_REPORT_S = 30.0


class DeadlineWatchdog:
    """Answers triggered jobs whose deadline passed before the worker could."""

    def __init__(self, on_expired: Any, on_error: Callable[[str], None] | None = None):
        self._on_expired = on_expired
        self._on_error = on_error
        self._heap: list[tuple[float, int, Job]] = []
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self.failures = 0
        self.thread = threading.Thread(target=self._guarded, name="deadline-watchdog", daemon=True)
        self.thread.start()

    @staticmethod
    def answer_by(job: Job) -> float:
        """When the watchdog answers ``job``: its deadline less a publishing margin."""
        budget = max(0.0, job.deadline_mono - job.created_mono)
        return job.deadline_mono - min(ANSWER_MARGIN_MAX_S, ANSWER_MARGIN * budget)

    def track(self, job: Job) -> None:
        with self._cond:
            heapq.heappush(self._heap, (self.answer_by(job), next(self._ids), job))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self.thread.join(2.0)

    def _guarded(self) -> None:
        # Last resort: the watchdog is what answers parts nobody else could; it must not die.
        while True:
            try:
                self._run()
                return
            except Exception as exc:
                self._fail(f"deadline watchdog failed: {exc!r}")
                time.sleep(0.05)

    def _fail(self, message: str) -> None:
        self.failures += 1
        log.exception(message)
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(message)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    while self._heap and self._heap[0][2].answered:
                        heapq.heappop(self._heap)  # answered in time: forget it
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stop:
                    return
                _, _, job = heapq.heappop(self._heap)
            try:
                self._on_expired(job)
            except Exception as exc:
                self._fail(f"deadline answer for camera {job.camera} failed: {exc!r}")


class Daemon:
    """Everything ``anomalygpt-edge run`` runs; :meth:`start` / :meth:`stop` for tests and the demo."""

    def __init__(self, config: DaemonConfig, *, link: Any = None):
        self.config = config
        # An injected link (the standalone station's null link) replaces the MQTT link from the config.
        self._injected_link = link
        self.store = RecipeStore(config.storage.store)
        self.started_at = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counts: dict[str, collections.Counter[str]] = {c: collections.Counter() for c in config.cameras}
        self.bundles: dict[Path, EngineBundle] = {}
        self.pipelines: dict[Path, VisionPipeline] = {}
        self.enrollers: dict[Path, Enroller] = {}
        self.queues: dict[Path, WorkQueue] = {}
        self.cameras: dict[str, Camera] = {}
        self.inspectors: dict[str, Inspector | None] = {}
        self.recipe_names: dict[str, str] = {}
        self.recipe_problems: dict[str, str | None] = {}
        self.last: dict[str, tuple[str, Verdict]] = {}  # camera -> (verdict id, verdict), for `ask`
        self._awaiting: dict[str, list[Job]] = collections.defaultdict(list)  # triggers waiting for a frame
        self._await_lock = threading.Lock()
        self._last_free: dict[str, float] = {}
        self._state_lock = threading.Lock()
        self.link: MqttLink | None = None
        self.spool = None
        self.archive = None
        self.disk = None  # DiskBudget of storage.data (runtime/delivery/archive.py)
        self.archive_problem: str | None = None  # the archive could not be opened at all
        # Supervised loops: name -> crash times (recent), and the last crash's reason.
        self._crashes: dict[str, list[float]] = collections.defaultdict(list)
        self._crash_reason: dict[str, str] = {}
        self._previous_excepthook: Any = None
        self.explainer = None
        self.explanations = None
        # Observers of published verdicts and explanations (the technician station); called on the
        # inspection worker / explanation worker, so they must only enqueue, never block.
        self.verdict_listeners: list[Callable[[Job, str, Verdict, dict, np.ndarray | None], None]] = []
        self.explanation_listeners: list[Callable[[Any, Any], None]] = []
        self.watchdog: DeadlineWatchdog | None = None
        from anomalygpt_edge.runtime.line.status import DaemonHealth

        # Heartbeat, systemd READY/WATCHDOG/STATUS and optional metrics (runtime/line/status.py).
        self.health = DaemonHealth(
            config.device_id, heartbeat_s=config.health.heartbeat_s, metrics_bind=config.health.metrics_bind
        )
        from anomalygpt_edge.runtime.line.commands import CommandCenter

        self.commands = CommandCenter(self)

    # -- set-up ----------------------------------------------------------------------------------
    def bundle_key(self, camera: str) -> Path:
        binding = self.binding(camera)
        path = self.config.bundle_for(binding) if binding else self.config.engines.bundle
        return Path(path).resolve()

    def binding(self, camera: str) -> RecipeBinding | None:
        return self.config.binding(camera)

    def _open_engines(self) -> None:
        for camera in self.config.cameras:
            key = self.bundle_key(camera)
            if key not in self.bundles:
                # One bundle, one pipeline, one worker: cameras sharing a bundle share its engines.
                bundle = EngineBundle.open(key, backend=self.config.engines.backend)
                self.bundles[key] = bundle
                self.pipelines[key] = self._pipeline(bundle)
                self.enrollers[key] = Enroller(self.store, bundle, self.pipelines[key])
                self.queues[key] = WorkQueue()
        for b in self.config.recipes:
            # A recipe that is missing or not live yet does not stop the daemon: that camera answers
            # triggers with ERROR (reason in the status) until a technician enrolls it over MQTT.
            with contextlib.suppress(RecipeError):
                self.load_recipe(b.camera, b.recipe)

    def _pipeline(self, bundle: EngineBundle) -> VisionPipeline:
        """The bundle's pipeline; on the CPU backend with ``engines.threads`` ONNX Runtime threads."""
        pipeline = VisionPipeline(bundle)
        threads = self.config.engines.threads
        if threads and resolve_backend(self.config.engines.backend) == "onnxruntime":
            for attr, graph in (("encoder", "encoder"), ("matcher", "bank_matcher")):
                entry = bundle.graph(graph)
                engine = create_engine(
                    bundle.path / entry.file, entry.inputs, entry.outputs, "onnxruntime", threads=threads
                )
                setattr(pipeline, attr, engine)
        return pipeline

    def load_recipe(self, camera: str, name: str) -> Inspector:
        """Make ``name`` the camera's recipe; a recipe that cannot go live leaves the camera answering ERROR."""
        key = self.bundle_key(camera)
        binding = self.binding(camera)
        with self._state_lock:
            self.recipe_names[camera] = name
        try:
            recipe = self.store.load(name)
            if binding is not None and binding.roi is not None:
                recipe = replace(recipe, roi=binding.roi)
            inspector = Inspector(self.bundles[key], recipe, self.store, self.pipelines[key])
        except (RecipeError, ValueError, OSError) as exc:
            with self._state_lock:
                self.inspectors[camera] = None
                self.recipe_problems[camera] = str(exc)
            log.warning("camera %s: recipe %s cannot inspect: %s", camera, name, exc)
            raise RecipeError(str(exc)) from exc
        with self._state_lock:
            self.inspectors[camera] = inspector
            self.recipe_problems[camera] = None
        log.info("camera %s: recipe %s live (threshold %.4g)", camera, name, inspector.threshold)
        return inspector

    def switch_recipe(self, camera: str, name: str) -> str | None:
        """Make ``name`` the camera's recipe and announce it; return the previous recipe's name.

        A recipe that cannot inspect (not live, or a bank, head or ``recipe.json`` that fails its
        checks) is refused (:class:`RecipeError`, "cannot inspect: ...", naming the file) and the
        camera stays on it, answering every part ERROR with that reason, the status ``degraded``:
        the PLC switches because the parts changed, so judging the new parts by the previous
        recipe could pass them as OK (issue 12, rows 2 and 11). An unknown name changes nothing.
        Shared by ``cmd/recipe`` and the technician station so both switch the same way.
        """
        if not self.store.exists(name):
            raise RecipeError(f"unknown recipe '{name}'; recipes: {', '.join(self.store.names()) or 'none'}")
        previous = self.recipe_names.get(camera)
        try:
            self.load_recipe(camera, name)
        except RecipeError as exc:
            raise RecipeError(f"recipe '{name}' cannot inspect: {exc}") from None
        finally:
            # Refused or not, the camera's recipe changed: the retained status says which, and why.
            if self.link is not None and self.link.connected.is_set():
                self.link.publish_status()
        return previous

    def _open_storage(self) -> None:
        """Spool and archive under one disk budget; a damaged store is moved aside, never fatal."""
        from anomalygpt_edge.runtime.delivery.archive import DiskBudget

        st = self.config.storage
        mb = 1024**2
        floor, reserve = st.disk_free_floor_mb * mb, st.spool_reserve_mb * mb
        self.disk = DiskBudget(st.data, st.disk_budget_mb * mb, floor, reserve if st.spool else 0)
        if st.spool:
            from anomalygpt_edge.runtime.delivery.spool import VerdictSpool

            self.spool = VerdictSpool(
                st.data / "spool.db",
                max_rows=st.spool_max_rows,
                max_age_s=st.spool_max_age_s,
                reserve_bytes=reserve,
                free_floor_bytes=floor,
            )
            self.disk.track(self.spool.path)
            for event in self.spool.events:
                self.health.error(event["message"])
        if st.archive:
            from anomalygpt_edge.runtime.delivery.archive import Archive, ArchiveError, ArchiveWriter

            try:
                archive = Archive(
                    st.data / "archive",
                    quota_bytes=st.archive_quota_mb * mb,
                    ok_sample_rate=st.archive_ok_sample_rate,
                    disk=self.disk,
                )
            except ArchiveError as exc:
                # The archive is the local record, not the PLC's answer: run without it, and say so.
                self.archive_problem = f"archive not available, verdicts are not archived: {exc}"
                log.error("%s", self.archive_problem)
                self.health.error(self.archive_problem)
                return
            for event in archive.events:
                self.health.error(event["message"])
            self.archive = ArchiveWriter(archive, on_error=self._note_error)

    def _open_llm(self) -> None:
        cfg = self.config.llm
        if not cfg.enabled:
            return
        from anomalygpt_edge.engines.llm import create_llm
        from anomalygpt_edge.runtime.explain.explainer import Explainer, ExplanationWorker, default_model_path

        self.explainer = Explainer(create_llm(cfg.model or default_model_path(), n_ctx=2048, n_threads=cfg.threads))
        self.explanations = ExplanationWorker(
            lambda req: self.explainer.explain(req.verdict, req.question),
            self._on_explanation,
            max_queue=cfg.max_queue,
            spawn=self._spawner,
        )

    def start(self, mqtt_wait_s: float = 10.0) -> Daemon:
        """Open engines, recipes, storage, MQTT and cameras; returns once the threads run."""
        self._open_engines()
        self._open_storage()
        self._open_llm()
        self._install_excepthook()
        self.watchdog = DeadlineWatchdog(self._on_deadline, on_error=self._note_error)
        if self._injected_link is not None:
            self.link = self._injected_link
        else:
            self.link = MqttLink(
                self.config.mqtt, self.config.device_id, self.commands.receive, self.status, self.spool
            )
        self.link.on_error = self._note_error
        if not self.link.start(mqtt_wait_s) and self._injected_link is None:
            log.warning("MQTT broker %s:%s not reachable yet; retrying", self.config.mqtt.host, self.config.mqtt.port)
        for n, (_key, queue) in enumerate(self.queues.items()):
            self._spawn(f"inspect-{n}", self._work, queue)
        self.commands.start(self._spawner)
        for name, cam_cfg in self.config.cameras.items():
            binding = self.binding(name)
            if binding is not None and binding.trigger == "folder_watch":
                self._spawn(f"watch-{name}", self._watch_folder, binding)
                continue
            cam = Camera(create_source(cam_cfg), on_frame=self._on_frame, on_status=self._on_camera_status)
            self.cameras[name] = cam
            cam.start(self._spawner)  # a grabbing loop that dies of a bug is recorded and restarted
        if self.spool is not None:
            self.health.add_source("spool", self.spool.stats)
        if self.archive is not None:
            archive = self.archive.archive
            self.health.add_source("archive", lambda: archive.stats.to_json())
            self.health.watch_thread("archive-writer", lambda: self.archive.thread if self.archive else None)
        if self.disk is not None:
            self.health.add_source("disk", self.disk.stats)
        self.health.add_source("queues", self._queue_depths)
        # For Prometheus (anomalygpt_edge_condition_degraded) and /healthz: the status's state as numbers.
        self.health.add_source("condition", self._condition)
        # Threads that do not tick: a dead one stops the systemd watchdog pings just the same.
        self.health.watch_thread("deadline-watchdog", lambda: self.watchdog.thread if self.watchdog else None)
        self.health.watch_thread("mqtt-network", lambda: self.link.network_thread if self.link else None)
        if self.link.sender is not None:
            self.health.watch_thread("verdict-sender", lambda: self.link.sender.thread if self.link else None)
        self.health.start(self.status, self._publish_heartbeat)
        self.health.ready()
        return self

    def _condition(self) -> dict[str, int]:
        problems = self.problems()
        return {"degraded": int(bool(problems)), "problems": len(problems)}

    def _queue_depths(self) -> dict[str, int]:
        """Work waiting per inspection worker (triggered / free-run) and in the archive writer."""
        out = {
            f"inspect-{n}.{kind}": depth
            for n, q in enumerate(self.queues.values())
            for kind, depth in q.depth().items()
        }
        if self.archive is not None:
            out["archive"] = self.archive.depth()
        return out

    def _publish_heartbeat(self, body: dict[str, Any]) -> None:
        if self.link is not None and self.link.connected.is_set():
            self.link.publish_json(self.link.topic("status"), body, qos=1, retain=True)

    def _spawn(self, name: str, target: Any, *args: Any) -> threading.Thread:
        """Start ``target(*args)`` on a thread ``name`` under the last-resort handler; the thread."""
        t = threading.Thread(target=self._supervised, args=(name, target, *args), name=name, daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _spawner(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """:meth:`_spawn` in the shape components take (cameras, commands, explanation worker)."""
        return self._spawn(name, target)

    def _supervised(self, name: str, target: Any, *args: Any) -> None:
        """Run a long-lived loop under a last-resort handler: an exception it did not expect is
        recorded (log, ``last_error``, ``degraded``) and the loop restarted; one that keeps dying
        (MAX_CRASHES within CRASH_WINDOW_S) is given up on and marked dead, so the systemd
        watchdog stops being fed and systemd restarts the whole service."""
        while not self._stop.is_set():
            try:
                target(*args)
                return
            except Exception as exc:
                now = time.monotonic()
                crashes = [t for t in self._crashes[name] if now - t < CRASH_WINDOW_S] + [now]
                # last_error first: whoever sees the crash in the status also sees its reason.
                self.health.error(f"thread {name} died: {exc!r} ({len(crashes)} in {CRASH_WINDOW_S:g} s)")
                self._crash_reason[name] = f"{exc!r}"
                self._crashes[name] = crashes
                log.exception("thread %s died; %s", name, "giving up" if len(crashes) >= MAX_CRASHES else "restarting")
                if len(crashes) >= MAX_CRASHES:
                    self.health.mark_dead(name, f"{exc!r}")
                    return
                self._stop.wait(0.2)

    def _install_excepthook(self) -> None:
        """Threads not started through :meth:`_spawn` (paho's, the verdict sender, the archive writer):
        a death is recorded and marks the thread dead, not silent."""
        previous = threading.excepthook
        self._previous_excepthook = previous

        def hook(args: threading.ExceptHookArgs) -> None:
            name = getattr(args.thread, "name", "?")
            if args.exc_type is not SystemExit and not self._stop.is_set():
                self.health.error(f"thread {name} died: {args.exc_value!r}")
                self.health.mark_dead(name, repr(args.exc_value))
            previous(args)

        threading.excepthook = hook

    def _note_error(self, message: str) -> None:
        """An error from a component thread (sender, link, archive, watchdog): into ``last_error``."""
        self.health.error(message)

    def stop(self) -> None:
        """Stop cameras first (no new work), then workers, then say ``offline`` and disconnect."""
        self._stop.set()
        self.health.stop()
        for cam in self.cameras.values():
            cam.stop()
        for q in self.queues.values():
            q.wake()
        # The commands and explanation loops end on their own stop signal, not on ``_stop``:
        # stop them before joining the supervised threads, or each join would wait its timeout.
        self.commands.stop()
        if self.explanations is not None:
            self.explanations.stop()
        for t in self._threads:
            t.join(3.0)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.link is not None:
            self.link.stop()
        if self.archive is not None:
            self.archive.close()
        if self.spool is not None:
            self.spool.close()
        if self._previous_excepthook is not None:
            threading.excepthook = self._previous_excepthook
            self._previous_excepthook = None

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- frames and triggers ---------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        """Called on the camera's thread for every new frame: hand it to waiting triggers, schedule free-run."""
        cam = frame.camera
        self.counts[cam]["frames"] += 1
        with self._await_lock:
            waiting = self._awaiting.get(cam)
            ready = [j for j in waiting or () if frame.captured_mono >= j.created_mono + self._settle(cam)]
            if ready:
                self._awaiting[cam] = [j for j in waiting if j not in ready]
        for job in ready:
            job.frame, job.captured_at = frame, frame.captured_at
            self._enqueue_triggered(job)
        binding = self.binding(cam)
        if binding is None or binding.trigger != "free_run" or self.inspectors.get(cam) is None:
            return
        period = 1.0 / binding.fps
        # A quarter period of slack: a camera running at exactly the configured rate jitters around it.
        if frame.captured_mono - self._last_free.get(cam, -1e9) < 0.75 * period:
            return
        self._last_free[cam] = frame.captured_mono
        job = Job(
            cam,
            "free_run",
            deadline_mono=frame.captured_mono + binding.deadline_ms / 1e3,
            created_mono=frame.captured_mono,
            frame=frame,
            captured_at=frame.captured_at,
        )
        self.queues[self.bundle_key(cam)].put_free(job)

    def _settle(self, camera: str) -> float:
        b = self.binding(camera)
        return b.settle_ms / 1e3 if b else 0.0

    def _deadline_ms(self, camera: str) -> float:
        b = self.binding(camera)
        return b.deadline_ms if b else 500.0

    def trigger(self, camera: str, part_id: str | None, command: Command | None, correlation: str | None) -> Job:
        """A PLC trigger: the first frame captured after it is the part; answered by its deadline, whatever happens."""
        now = command.received_mono if command else time.monotonic()
        job = Job(
            camera,
            "trigger",
            deadline_mono=now + self._deadline_ms(camera) / 1e3,
            created_mono=now,
            part_id=part_id,
            command=command,
            correlation=correlation,
        )
        self.counts[camera]["triggers"] += 1
        assert self.watchdog is not None
        self.watchdog.track(job)
        cam = self.cameras.get(camera)
        if cam is None or not cam.online:
            status = f"{cam.status}: {cam.reason}" if cam is not None and cam.reason else getattr(cam, "status", "none")
            self.answer_error(job, f"camera {camera} is not delivering frames ({status})")
            return job
        with self._await_lock:
            self._awaiting[camera].append(job)
        return job

    def _enqueue_triggered(self, job: Job) -> None:
        if not self.queues[self.bundle_key(job.camera)].put_triggered(job):
            self.answer_error(job, "inspection queue full: too many triggered parts waiting")

    def _on_camera_status(self, camera: str, status: str, reason: str | None) -> None:
        if status != "online":
            with self._await_lock:
                lost, self._awaiting[camera] = self._awaiting.get(camera, []), []
            for job in lost:
                self.answer_error(job, f"camera {camera} lost during the trigger ({status}: {reason})")
        self.counts[camera][f"status_{status}"] += 1
        self.health.camera_state(camera, status, reason)
        if self.link is not None and self.link.connected.is_set():
            self.link.publish_status()

    def _on_deadline(self, job: Job) -> None:
        with self._await_lock:
            if job in self._awaiting.get(job.camera, []):
                self._awaiting[job.camera].remove(job)
                stage = "waiting for a frame"
            else:
                stage = "queued for inspection" if job.frame is not None or job.image is not None else "waiting"
        self.answer_error(job, f"deadline exceeded: no verdict within {self._deadline_ms(job.camera):g} ms ({stage})")

    def _watch_folder(self, binding: RecipeBinding) -> None:
        """Folder watch: each new image file is a part (never dropped), its name the part id."""
        folder = Path(self.config.cameras[binding.camera].source)
        seen = set(list_images(folder, allow_empty=True)) if folder.is_dir() else set()
        sizes: dict[Path, int] = {}
        empty_since: dict[Path, float] = {}
        # A writer that leaves a file empty this long is not "still writing": the part is answered.
        settle = binding.settle_ms / 1e3 if binding.settle_ms > 0 else EMPTY_FILE_SETTLE_S
        loop = threading.current_thread().name
        while not self._stop.wait(FOLDER_POLL_S):
            self.health.tick(loop)
            try:
                paths = list_images(folder, allow_empty=True) if folder.is_dir() else []
            except OSError:  # the folder went away mid-listing: next poll
                continue
            for path in paths:
                if path in seen:
                    continue
                try:
                    size = path.stat().st_size
                except OSError:  # removed or renamed before we looked
                    sizes.pop(path, None)
                    empty_since.pop(path, None)
                    continue
                if size == 0:
                    first = empty_since.setdefault(path, time.monotonic())
                    if time.monotonic() - first < settle:
                        continue
                    seen.add(path)
                    empty_since.pop(path, None)
                    job = self._folder_job(binding, path)
                    self.answer_error(job, f"empty file: {path.name} stayed 0 bytes for {settle:g} s")
                    continue
                empty_since.pop(path, None)
                if sizes.get(path) != size:  # still being written: wait one more poll
                    sizes[path] = size
                    continue
                seen.add(path)
                sizes.pop(path, None)
                job = self._folder_job(binding, path)
                try:
                    job.image = read_image(path)
                except ImageError as exc:
                    self.answer_error(job, str(exc))
                    continue
                self._enqueue_triggered(job)

    def _folder_job(self, binding: RecipeBinding, path: Path) -> Job:
        """A folder-watch part, tracked by the deadline watchdog from now."""
        now = time.monotonic()
        job = Job(
            binding.camera,
            "folder_watch",
            deadline_mono=now + binding.deadline_ms / 1e3,
            created_mono=now,
            captured_at=time.time(),
            part_id=path.stem,
        )
        self.counts[binding.camera]["frames"] += 1
        assert self.watchdog is not None
        self.watchdog.track(job)
        return job

    # -- inspection ------------------------------------------------------------------------------
    def _work(self, queue: WorkQueue) -> None:
        loop = threading.current_thread().name
        while not self._stop.is_set():
            # Fed every iteration (get() wakes at least every 0.2 s): a hung engine stops the
            # systemd watchdog pings, and systemd restarts the daemon.
            self.health.tick(loop)
            job = queue.get(0.2)
            if job is None or job.answered:
                continue
            start = time.monotonic()
            if not job.triggered and start > job.deadline_mono:
                self.counts[job.camera]["stale"] += 1  # a newer frame will come; this one is too old to matter
                continue
            with self._state_lock:
                inspector = self.inspectors.get(job.camera)
                problem = self.recipe_problems.get(job.camera)
            if inspector is None:
                self.answer_error(job, f"recipe {self.recipe_names.get(job.camera)} cannot inspect: {problem}")
                continue
            image = job.pixels()
            assert image is not None
            try:
                verdict = inspector.inspect(image, f"{job.camera} frame")
            except Exception as exc:  # engine or image failure: an explicit ERROR, never silence
                log.exception("camera %s: inspection failed", job.camera)
                verdict = Verdict.error(inspector.recipe.name, f"inspection failed: {exc}")
            done = time.monotonic()
            if done > job.deadline_mono and verdict.verdict != "ERROR":
                late = (done - job.created_mono) * 1e3
                verdict = Verdict.error(
                    inspector.recipe.name,
                    f"deadline exceeded: {verdict.verdict} after {late:.0f} ms > {self._deadline_ms(job.camera):g} ms",
                    latency_ms=verdict.latency_ms,
                    bank_version=verdict.bank_version,
                    bundle_sha256=verdict.bundle_sha256,
                )
            verdict.latency_ms = {"queue_wait": (start - (job.queued_mono or start)) * 1e3, **verdict.latency_ms}
            if job.kind == "trigger" and job.frame is not None:
                verdict.latency_ms["frame_wait"] = (job.frame.captured_mono - job.created_mono) * 1e3
            self.answer(job, verdict, image)
        self.health.forget_loop(loop)

    def answer_error(self, job: Job, reason: str) -> None:
        recipe = self.recipe_names.get(job.camera, "")
        inspector = self.inspectors.get(job.camera)
        verdict = Verdict.error(
            recipe,
            reason,
            bank_version=inspector.recipe.bank_version if inspector else None,
            bundle_sha256=self.bundles[self.bundle_key(job.camera)].sha256 if self.bundles else None,
        )
        self.answer(job, verdict, job.pixels())

    def answer(self, job: Job, verdict: Verdict, image: np.ndarray | None) -> bool:
        """Publish the one answer for ``job``; False if it was answered already (the late result is dropped).

        Never blocks on the disk: the verdict is queued for the sender's next group commit and the
        PLC's reply goes out as soon as that batch is durable (or at once if the spool cannot
        commit). If building the answer fails, the PLC still gets an explicit ERROR.
        """
        if not job.claim():
            self.counts[job.camera]["late_discarded"] += 1
            return False
        try:
            self._publish_answer(job, verdict, image)
        except Exception as exc:  # last resort: the part was claimed, so it must still be answered
            log.exception("camera %s: answering failed", job.camera)
            self.health.error(f"camera {job.camera}: answering failed: {exc!r}", camera=job.camera)
            self._emergency_reply(job, f"internal error while answering: {exc!r}")
        return True

    def _emergency_reply(self, job: Job, reason: str) -> None:
        """A minimal ERROR reply straight to the PLC (no spool, no archive) when the normal path failed."""
        if job.command is None or self.link is None:
            return
        from anomalygpt_edge.runtime.delivery.messages import VERDICT_SCHEMA

        body = {
            "schema": VERDICT_SCHEMA,
            "command": "trigger",
            "ok": False,
            "verdict": "ERROR",
            "reason": reason,
            "camera": job.camera,
            "part_id": job.part_id,
            "correlation_id": job.correlation,
            "score": None,
            "threshold": None,
        }
        with contextlib.suppress(Exception):
            self.link.reply(job.command, body)

    def _publish_answer(self, job: Job, verdict: Verdict, image: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        c = self.counts[job.camera]
        c["verdicts"] += 1
        c[verdict.verdict] += 1
        vid = uuid7()
        frame = job.frame
        msg = verdict_message(
            verdict,
            verdict_id=vid,
            device=self.config.device_id,
            camera=job.camera,
            part_id=job.part_id,
            frame_seq=frame.seq if frame else None,
            captured_at=job.captured_at or (frame.captured_at if frame else time.time()),
            trigger=job.kind,
            correlation=job.correlation,
        )
        link = self.link
        assert link is not None
        payload = finish_and_encode(msg, t0)
        self.health.frame(job.camera, msg["latency_ms"].get("total"), verdict.verdict)
        reply = None
        if job.command is not None:
            command, body = job.command, {**msg, "command": "trigger", "ok": verdict.verdict != "ERROR"}

            def reply(durable: bool) -> None:  # on the sender thread, once the verdict is durable
                link.reply(command, body)

        link.publish_verdict(vid, link.topic(job.camera, "verdict"), payload, on_durable=reply)
        self.last[job.camera] = (vid, verdict)
        try:
            roi_image = None
            if image is not None and verdict.verdict != "ERROR":
                try:
                    roi_image = (
                        crop_roi(image, self.inspectors[job.camera].recipe.roi)
                        if self.inspectors.get(job.camera)
                        else image
                    )
                except ImageError:
                    roi_image = image
            self._after_verdict(job, vid, verdict, msg, roi_image if roi_image is not None else image)
        except Exception as exc:  # heatmap/archive/listeners: the answer is already on its way
            log.exception("camera %s: after-verdict work failed", job.camera)
            self.health.error(f"camera {job.camera}: after-verdict work failed: {exc!r}", camera=job.camera)

    def _after_verdict(self, job: Job, vid: str, verdict: Verdict, msg: dict, image: np.ndarray | None) -> None:
        """What follows a published verdict, off the PLC's critical path: heatmap, explanation, archive."""
        binding = self.binding(job.camera)
        heat = None
        if verdict.verdict == "NG" and image is not None and (binding is None or binding.heatmap or self.archive):
            from anomalygpt_edge.runtime.inspection.heatmap import overlay

            heat = overlay(image, verdict)
            if binding is not None and binding.heatmap and self.link is not None:
                ok, jpg = cv2.imencode(".jpg", heat, [cv2.IMWRITE_JPEG_QUALITY, 85])
                if ok:
                    self.link.publish_heatmap(job.camera, vid, jpg.tobytes())
        if self.explanations is not None and (verdict.verdict == "NG" or self.config.llm.explain == "all"):
            from anomalygpt_edge.runtime.explain.explainer import ExplainRequest

            self.explanations.submit(ExplainRequest(verdict, key=job.camera, verdict_id=vid))
        if self.archive is not None:
            # The archive decides which images it keeps (NG/ERROR always, OK at its sample rate).
            self.archive.submit(msg, image, heat)
        for listener in self.verdict_listeners:
            try:
                listener(job, vid, verdict, msg, image)
            except Exception:  # an observer's bug must never reach the verdict path
                log.exception("verdict listener %r failed", listener)

    def _on_explanation(self, request: Any, explanation: Any) -> None:
        for listener in self.explanation_listeners:
            try:
                listener(request, explanation)
            except Exception:
                log.exception("explanation listener %r failed", listener)
        if self.link is None:
            return
        target = self.commands.ask_targets.pop(id(request), None)
        body = {
            "schema": EXPLANATION_SCHEMA,
            "verdict_id": request.verdict_id,
            "camera": request.key.split(":")[-1],
            "recipe": request.verdict.recipe,
            "verdict": request.verdict.verdict,
            "question": request.question,
            **explanation.to_json(),
        }
        if target is not None:
            self.link.reply(target, {"command": "ask", "ok": True, "correlation_id": target.correlation_text, **body})
        else:
            self.link.publish_json(self.link.topic(body["camera"], "explanation"), body, qos=1)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The retained status document (published on connect and whenever a camera or recipe changes)."""
        cams = {}
        for name, cfg in self.config.cameras.items():
            b = self.binding(name)
            cam = self.cameras.get(name)
            cams[name] = {
                **(cam.info() if cam else {"type": cfg.type, "status": self._uncamera_status(name)}),
                "recipe": self.recipe_names.get(name),
                "live": self.inspectors.get(name) is not None,
                "problem": self.recipe_problems.get(name),
                "trigger": b.trigger if b else None,
                "fps": b.fps if b else None,
                "deadline_ms": b.deadline_ms if b else None,
            }
        problems = self.problems()
        base = {
            "schema": STATUS_SCHEMA,
            "state": "degraded" if problems else "online",
            "problems": problems,
            "device": self.config.device_id,
            "version": anomalygpt_edge.__version__,
            "started_at": iso(self.started_at),
            "cameras": cams,
            "recipes": self.store.names(),
            "bundles": [
                {"path": str(k), "sha256": b.sha256, "engine_backend": self.pipelines[k].encoder.describe()}
                for k, b in self.bundles.items()
            ],
            "bundle_sha256": next(iter(self.bundles.values())).sha256 if self.bundles else None,
            "engine_backend": next(iter(self.pipelines.values())).encoder.describe() if self.pipelines else None,
            "llm": self.config.llm.enabled,
            "spool": self._spool_status(),
        }
        return self.health.status(base)

    def _spool_status(self) -> dict[str, Any] | None:
        if self.spool is None:
            return None
        out = self.spool.stats()
        sender = self.link.sender if self.link is not None else None
        if sender is not None and (memory := sender.memory_depth()):
            out["in_memory"] = memory  # verdicts the spool could not take, published from memory
        if sender is not None and sender.stats["dropped_memory"]:
            out["dropped_memory"] = sender.stats["dropped_memory"]
        return out

    def problems(self) -> list[str]:
        """Why the daemon is ``degraded`` (empty when all is well): disk, spool, archive, threads."""
        out: list[str] = []
        sender = self.link.sender if self.link is not None else None
        if sender is not None and sender.problem:
            out.append(sender.problem)
        if self.disk is not None:
            level, used, free = self.disk.measure()
            if level != "ok":
                what = "archive stopped writing images" if level == "low" else "archive stopped writing"
                out.append(
                    f"disk {level}: {free / 1024**2:.1f} MiB free (floor {self.disk.floor_bytes / 1024**2:.1f} MiB),"
                    f" {used / 1024**2:.1f} MiB used by the daemon; {what}"
                )
        if self.spool is not None:
            if not self.spool.reserve.held:
                out.append("spool reserve released: the disk filled up")
            now = time.time()
            for event in self.spool.events:
                if now - _event_time(event) < EVENT_DEGRADED_S:
                    out.append(event["message"])
        if self.archive_problem:
            out.append(self.archive_problem)
        if self.archive is not None:
            archive = self.archive.archive
            if waiting := archive.deferred_rows():
                out.append(f"archive: {waiting} rows waiting for disk space")
            now = time.time()
            for event in archive.events:
                if now - _event_time(event) < EVENT_DEGRADED_S:
                    out.append(event["message"])
        for name, reason in self.health.dead_threads().items():
            out.append(f"thread {name} is dead: {reason}")
        now_mono = time.monotonic()
        for name, crashes in list(self._crashes.items()):
            if crashes and now_mono - crashes[-1] < CRASH_REPORT_S and name not in self.health.dead_threads():
                out.append(f"thread {name} crashed and was restarted: {self._crash_reason.get(name)}")
        # A bound camera whose recipe cannot inspect answers every part ERROR: the line is not
        # fully served, whatever the reason (not enrolled yet, or files refused by their checks).
        with self._state_lock:
            refused = [(c, self.recipe_names.get(c), p) for c, p in self.recipe_problems.items() if p]
        for camera, recipe, problem in refused:
            out.append(f"camera {camera}: recipe {recipe} cannot inspect: {problem}")
        return out

    def _uncamera_status(self, camera: str) -> str:
        """Status of a camera without a grabbing thread: a watched folder, or one not started yet."""
        b = self.binding(camera)
        if b is not None and b.trigger == "folder_watch":
            return "watching" if Path(self.config.cameras[camera].source).is_dir() else "folder missing"
        return "starting" if not self._stop.is_set() else "stopped"

    def stats(self) -> dict[str, Any]:
        """Counters per camera and queue, and the MQTT link's."""
        return {
            "cameras": {k: dict(v) for k, v in self.counts.items()},
            "queues": {str(k): {**q.depth(), **q.counts} for k, q in self.queues.items()},
            "mqtt": dict(self.link.stats) if self.link else None,
        }


def _event_time(event: dict[str, Any]) -> float:
    """Epoch seconds of a store event (``at``: ``20261201T213000Z`` or ISO); 0 when unreadable."""
    import datetime as dt

    text = str(event.get("at", ""))
    for fmt in ("%Y%m%dT%H%M%SZ",):
        with contextlib.suppress(ValueError):
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.timezone.utc).timestamp()
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text).timestamp()
    return 0.0
