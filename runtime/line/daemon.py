"""The line daemon: camera frames in, verdicts out over MQTT, within each recipe's deadline.

:class:`Daemon` is the composition root. Its parts each have one job and get what they need
as constructor arguments; the data flows one way:

frame / trigger / file -> :class:`TriggerBoard` (jobs on work queues, deadline watchdog)
-> :class:`InspectionWorker` (preprocess + engines -> verdict, per the camera's
:class:`RecipeSlots` inspector) -> :class:`VerdictPublisher` (link + archive + observers).
:class:`StatusReport` builds the status document, :class:`LineStorage` holds spool and
archive, :class:`Supervisor` runs every loop, :class:`CommandCenter` handles ``cmd/*``.

Threads (few and named, so ``py-spy dump`` reads like the design):

* ``camera-<name>``: one per camera, keeps only the newest frame (see :class:`Camera`);
* ``inspect-<n>-<i>``: ``engines.workers`` per engine bundle; cameras sharing a bundle share its
  engines and its queue, from which each worker takes triggered parts first, then free-run frames
  (see :class:`WorkQueue`), one camera on one worker at a time;
* ``deadline-watchdog``: answers a triggered part with an ERROR verdict the moment its deadline
  passes while it still waits for a frame, a queue slot or the engine;
* ``watch-<camera>``: one per folder-watch recipe, turning new files into parts;
* ``commands``: slow MQTT commands (enrollment, recipe switches, questions), off paho's thread;
* ``recipe-watch``: reloads the cameras on a recipe another process committed (``recipe_watch.py``);
* paho's network thread; ``explanation-worker`` when an LLM is enabled.

Fail safe: every triggered part gets exactly one answer (:meth:`Job.claim`); an engine error, a
deadline overrun or a camera lost during a trigger is an explicit ERROR verdict with its reason.
Faults (issue 12): answering never touches the disk on the answering thread; the watchdog answers
a little before the deadline; every long-lived loop runs under the supervisor's last-resort
handler (restart, ``degraded``; a loop that keeps dying is marked dead and stops the systemd
watchdog pings); full disks, stores moved aside and dead threads are ``problems``.

The link: ``Daemon(config, link=...)`` uses the given link (the standalone station's, which
publishes nowhere) instead of building ``MqttLink`` from ``config.mqtt``. The daemon calls on a
link exactly the members of :class:`~anomalygpt_edge.runtime.line.link.Link`: ``start(wait_s)``,
``stop()``, ``connected`` (an Event), ``topic(*parts)``, ``publish_json(topic, body, qos, retain)``,
``publish_verdict(verdict_id, topic, payload, on_durable)``, ``publish_heatmap(camera, verdict_id,
jpeg)``, ``reply(command, body)``, and reads/sets ``on_error``, ``stats``, ``sender`` (None when there
is no verdict sender) and ``network_thread`` (None when there is none). An injected link receives no
commands (the daemon's ``commands.receive`` is wired only into the MQTT link it builds).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.runtime.cameras.base import Camera, create_source
from anomalygpt_edge.runtime.delivery.mqtt_link import Command, MqttLink
from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.asks import AskBook
from anomalygpt_edge.runtime.line.commands import CommandCenter
from anomalygpt_edge.runtime.line.config import DaemonConfig, MqttConfig, RecipeBinding
from anomalygpt_edge.runtime.line.deadline import DeadlineWatchdog
from anomalygpt_edge.runtime.line.drift_watch import DriftWatches
from anomalygpt_edge.runtime.line.folder_watch import FolderWatcher
from anomalygpt_edge.runtime.line.inspection_worker import InspectionWorker
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.line.line_counts import LineCounts
from anomalygpt_edge.runtime.line.link import Link
from anomalygpt_edge.runtime.line.proposals import ProposalDesk
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots, warmup_batches
from anomalygpt_edge.runtime.line.recipe_watch import RecipeWatch
from anomalygpt_edge.runtime.line.sparkplug_wiring import open_sparkplug, watch_sparkplug
from anomalygpt_edge.runtime.line.status import DaemonHealth
from anomalygpt_edge.runtime.line.status_report import StatusReport
from anomalygpt_edge.runtime.line.storage import LineStorage
from anomalygpt_edge.runtime.line.supervisor import CRASH_REPORT_S, CRASH_WINDOW_S, MAX_CRASHES, Supervisor
from anomalygpt_edge.runtime.line.trigger_board import TriggerBoard
from anomalygpt_edge.runtime.line.verdict_publisher import VerdictPublisher
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeStore

__all__ = ["CRASH_REPORT_S", "CRASH_WINDOW_S", "MAX_CRASHES", "Daemon", "DeadlineWatchdog"]
log = logging.getLogger(__name__)

#: Start-timeout extension asked of systemd before each warm-up run (EXTEND_TIMEOUT_USEC).
WARMUP_EXTEND_S = 600.0


class Daemon:
    """Everything ``anomalygpt-edge run`` runs; :meth:`start` / :meth:`stop` for tests and the demo."""

    recipe_watch: RecipeWatch | None = None  # started with the loops unless storage.recipe_watch_s is 0

    def __init__(self, config: DaemonConfig, *, link: Link | None = None):
        self.config = config
        self.started_at = time.time()
        self._injected_link = link
        self.link: Link | None = None
        self.sparkplug: Any = None  # the Sparkplug B Edge Node when the config has a sparkplug section
        self.counts = LineCounts(config.cameras)
        self.cameras: dict[str, Camera] = {}
        self.explainer: Any = None
        self.explanations: Any = None
        # Observers of published verdicts and explanations (the technician station); called on the
        # inspection worker / explanation worker, so they must only enqueue, never block.
        self.verdict_listeners: list[Callable[[Job, str, Verdict, dict, np.ndarray | None], None]] = []
        self.explanation_listeners: list[Callable[[Any, Any], None]] = []
        # Heartbeat, systemd READY/WATCHDOG/STATUS and optional metrics (runtime/line/status.py).
        self.health = DaemonHealth(
            config.device_id, heartbeat_s=config.health.heartbeat_s, metrics_bind=config.health.metrics_bind
        )
        self.supervisor = Supervisor(self.health)
        self.slots = RecipeSlots(
            config,
            RecipeStore(config.storage.store, keep_versions=config.storage.keep_versions),
            on_change=self.announce,
        )
        self.storage = LineStorage(config.storage, self.health.error)
        self.drift = DriftWatches(config.drift, self.slots, self.health.error)  # fed by the publisher
        self.board: TriggerBoard | None = None
        self.publisher: VerdictPublisher | None = None
        self.asks = AskBook()
        self.report = StatusReport(
            config,
            self.slots,
            self.cameras,
            self.health,
            self.storage,
            self.supervisor,
            self.counts,
            link=lambda: self.link,
            queues=lambda: self.queues,
            started_at=self.started_at,
            drift=self.drift,
        )
        archive = lambda: self.archive.archive if self.archive is not None else None  # noqa: E731
        # Proposals from labels (issue 14): the station's and cmd/recipe propose / apply / discard.
        self.proposals = ProposalDesk(
            self.slots, archive, drift=self.drift, policies=config.learn, max_pixels=config.limits.max_image_pixels
        )
        self.health.add_source("proposals", self.proposals.status)
        self.commands = CommandCenter(
            config,
            self.slots,
            self.cameras,
            trigger=self.trigger,
            link=lambda: self.link,
            explanations=lambda: self.explanations,
            last_verdict=lambda camera: self.last.get(camera),
            asks=self.asks,
            archive=archive,
            proposals=self.proposals,
        )

    # -- the parts' state under the names other code reads ----------------------------------------
    @property
    def store(self) -> RecipeStore:
        """The recipe store (the slots')."""
        return self.slots.store

    @property
    def bundles(self) -> dict[Path, Any]:
        """Bundle path -> open engine bundle."""
        return self.slots.bundles

    @property
    def pipelines(self) -> dict[Path, Any]:
        """Bundle path -> its vision pipeline."""
        return self.slots.pipelines

    @property
    def enrollers(self) -> dict[Path, Any]:
        """Bundle path -> its enroller."""
        return self.slots.enrollers

    @property
    def inspectors(self) -> dict[str, Inspector | None]:
        """Camera -> live inspector (None while its recipe cannot inspect)."""
        return self.slots.inspectors

    @property
    def recipe_names(self) -> dict[str, str]:
        """Camera -> the name of its recipe."""
        return self.slots.recipe_names

    @property
    def recipe_problems(self) -> dict[str, str | None]:
        """Camera -> why its recipe cannot inspect (None when it can)."""
        return self.slots.recipe_problems

    @property
    def queues(self) -> dict[Path, WorkQueue]:
        """Bundle path -> its work queue (empty before :meth:`start`)."""
        return self.board.queues if self.board is not None else {}

    @property
    def watchdog(self) -> DeadlineWatchdog | None:
        """The deadline watchdog (None before :meth:`start`)."""
        return self.board.watchdog if self.board is not None else None

    @property
    def last(self) -> dict[str, tuple[str, Verdict]]:
        """Camera -> (verdict id, verdict) of its last published verdict (what ``ask`` asks about)."""
        return self.publisher.last if self.publisher is not None else {}

    @property
    def spool(self) -> Any:
        """The verdict spool (None when disabled or before :meth:`start`)."""
        return self.storage.spool

    @property
    def archive(self) -> Any:
        """The archive writer (None when disabled, unavailable or before :meth:`start`)."""
        return self.storage.archive

    @property
    def disk(self) -> Any:
        """The disk budget of ``storage.data`` (None before :meth:`start`)."""
        return self.storage.disk

    @property
    def archive_problem(self) -> str | None:
        """Why the archive could not be opened, if it could not."""
        return self.storage.archive_problem

    @property
    def _stop(self) -> threading.Event:
        """Set when the daemon stops."""
        return self.supervisor.stopping

    @property
    def _threads(self) -> list[threading.Thread]:
        """Every supervised thread started so far."""
        return self.supervisor.threads

    @property
    def _crashes(self) -> dict[str, list[float]]:
        """Loop name -> recent crash times."""
        return self.supervisor.crashes

    def _spawner(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """Start ``target`` on thread ``name`` under the supervisor's last-resort handler."""
        return self.supervisor.spawner(name, target)

    # -- recipes (RecipeSlots) -------------------------------------------------------------------
    def bundle_key(self, camera: str) -> Path:
        """The resolved path of the bundle that inspects ``camera``."""
        return self.slots.bundle_key(camera)

    def binding(self, camera: str) -> RecipeBinding | None:
        """The camera's recipe binding from the config."""
        return self.slots.binding(camera)

    def load_recipe(self, camera: str, name: str) -> Inspector:
        """Make ``name`` the camera's recipe (see :meth:`RecipeSlots.load_recipe`)."""
        return self.slots.load_recipe(camera, name)

    def switch_recipe(self, camera: str, name: str) -> str | None:
        """Switch the camera's recipe and announce it; the previous name (see :meth:`RecipeSlots.switch_recipe`)."""
        return self.slots.switch_recipe(camera, name)

    def announce(self) -> None:
        """Republish the retained status now (a camera or recipe changed)."""
        link = self.link
        if link is not None and link.connected.is_set():
            link.publish_json(link.topic("status"), self.status(), qos=1, retain=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, mqtt_wait_s: float = 10.0) -> Daemon:
        """Open engines, recipes, storage, MQTT and cameras; returns once the threads run."""
        self.slots.open()
        self.storage.open()
        self._open_llm()
        self.supervisor.install_excepthook()
        self.link = self._build_link()
        self.sparkplug = open_sparkplug(self.config, self.status, self._sparkplug_trigger, self.health.error)
        # Board and publisher before the link connects: a trigger may arrive the moment it does.
        self.board = TriggerBoard(self.slots, self.cameras, self.counts, self.answer_error, self.health.error)
        self.publisher = VerdictPublisher(
            self.config,
            self.link,
            self.slots,
            self.health,
            self.counts,
            archive=self.storage.archive,
            explanations=self.explanations,
            verdict_listeners=self.verdict_listeners,
            explanation_listeners=self.explanation_listeners,
            sparkplug=self.sparkplug,
            drift=self.drift,
        )
        self._connect(mqtt_wait_s)
        if self.sparkplug is not None:
            self.sparkplug.start(min(mqtt_wait_s, 5.0))  # connects in the background either way
        # Warm-up before the workers and READY=1: the first part is not the one that pays for
        # first-run work, and systemd's watchdog (armed by READY) never sees it. Until it ends the
        # status says ``starting``; a trigger meanwhile waits and is answered by its deadline.
        self._warm_up()
        self._start_loops()
        self._watch_health()
        self.health.start(self.status, self._publish_heartbeat)
        self.announce()  # starting -> online (or degraded) in the retained status
        self.health.ready()
        return self

    def _warm_up(self) -> None:
        """Each live recipe's engines once per batch shape in use, telling systemd what it waits for."""
        notifier = self.health.notifier

        def before(what: str) -> None:
            # Each run may take a TensorRT build: extend the start timeout rather than be killed.
            notifier.extend_timeout(WARMUP_EXTEND_S)
            notifier.status(what)

        for run in self.slots.warm_up(warmup_batches(self.config.engines), before):
            if run.error:
                self.health.error(f"warm-up of recipe {run.recipe} (batch {run.batch}) failed: {run.error}")

    def _build_link(self) -> Link:
        """The injected link, or the MQTT link from the config (not connected yet)."""
        link: Link
        if self._injected_link is not None:
            link = self._injected_link
        else:
            mqtt = self.config.mqtt or MqttConfig()  # no mqtt section: the defaults (a broker on localhost)
            link = MqttLink(mqtt, self.config.device_id, self.commands.receive, self.status, self.storage.spool)
        link.on_error = self.health.error
        return link

    def _connect(self, wait_s: float) -> None:
        """Start the link (connecting in the background, up to ``wait_s`` here)."""
        assert self.link is not None
        if not self.link.start(wait_s) and self._injected_link is None:
            mqtt = self.config.mqtt or MqttConfig()
            log.warning("MQTT broker %s:%s not reachable yet; retrying", mqtt.host, mqtt.port)

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

    def _start_loops(self) -> None:
        """Inspection workers, the commands thread, folder watchers and cameras."""
        assert self.board is not None and self.publisher is not None
        board, stop = self.board, self.supervisor.stopping
        worker = InspectionWorker(self.slots, self.publisher, self.health, self.counts, board.deadline_ms)
        for n, queue in enumerate(board.queues.values()):
            for i in range(worker.policy.workers):  # engines.workers loops share the bundle's queue
                self.supervisor.spawn(f"inspect-{n}-{i}", worker.run, queue, stop)
        self.commands.start(self._spawner)
        self.proposals.start(self._spawner)  # proposals computed off the commands thread (seconds each)
        if self.config.storage.recipe_watch_s > 0:  # other processes' recipe commits reach the cameras
            self.recipe_watch = RecipeWatch(self.slots, self.config.storage.recipe_watch_s, self.health.error)
            self.supervisor.spawn("recipe-watch", self.recipe_watch.run, stop)
        for name, cam_cfg in self.config.cameras.items():
            binding = self.binding(name)
            if binding is not None and binding.trigger == "folder_watch":
                folder = Path(cam_cfg.source)
                watcher = FolderWatcher(binding, folder, board, self.answer_error, self.health.tick)
                self.supervisor.spawn(f"watch-{name}", watcher.run, stop)
                continue
            cam = Camera(create_source(cam_cfg), on_frame=board.on_frame, on_status=self._on_camera_status)
            self.cameras[name] = cam
            cam.start(self._spawner)  # a grabbing loop that dies of a bug is recorded and restarted

    def _watch_health(self) -> None:
        """Sources for the heartbeat and the threads whose death stops the systemd watchdog pings."""
        health, storage = self.health, self.storage
        if storage.spool is not None:
            health.add_source("spool", storage.spool.stats)
        if storage.archive is not None:
            archive = storage.archive.archive
            health.add_source("archive", lambda: archive.stats.to_json())
            health.watch_thread("archive-writer", lambda: storage.archive.thread if storage.archive else None)
        if storage.disk is not None:
            health.add_source("disk", storage.disk.stats)
        health.add_source("queues", self.report.queue_depths)
        health.add_source("drift", self.drift.states)  # per camera: Prometheus anomalygpt_edge_drift_* gauges
        # For Prometheus (anomalygpt_edge_condition_degraded) and /healthz: the status's state as numbers.
        health.add_source("condition", self.report.condition)
        # Threads that do not tick: a dead one stops the systemd watchdog pings just the same.
        health.watch_thread("deadline-watchdog", lambda: self.watchdog.thread if self.watchdog else None)
        health.watch_thread("mqtt-network", lambda: self.link.network_thread if self.link else None)
        watch_sparkplug(self.sparkplug, health)
        if self.link is not None and self.link.sender is not None:
            health.watch_thread("verdict-sender", lambda: self.link.sender.thread if self.link else None)

    def _sparkplug_trigger(self, camera: str, part_id: str | None) -> None:
        """A Sparkplug DCMD ``Trigger``: a part like a JSON ``cmd/trigger``, answered in DDATA (no reply topic)."""
        self.trigger(camera, part_id, None, None)

    def _publish_heartbeat(self, body: dict[str, Any]) -> None:
        if self.sparkplug is not None:
            self.sparkplug.refresh()  # node and camera metrics that changed: NDATA / DDATA
        link = self.link
        if link is not None and link.connected.is_set():
            link.publish_json(link.topic("status"), body, qos=1, retain=True)

    def stop(self) -> None:
        """Stop cameras first (no new work), then workers, then say ``offline`` and disconnect."""
        self.supervisor.stopping.set()
        self.health.stop()
        for cam in self.cameras.values():
            cam.stop()
        if self.board is not None:
            for q in self.board.queues.values():
                q.wake()
        # The commands and explanation loops end on their own stop signal, not on ``stopping``:
        # stop them before joining the supervised threads, or each join would wait its timeout.
        self.commands.stop()
        self.proposals.stop()
        if self.explanations is not None:
            self.explanations.stop()
        self.supervisor.join(3.0)
        if self.board is not None:
            self.board.stop()
        if self.link is not None:
            self.link.stop()
        if self.sparkplug is not None:
            self.sparkplug.stop()  # DDEATHs and the NDEATH
        self.storage.close()
        self.supervisor.restore_excepthook()

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.supervisor.stopping.set())
        self.start()
        try:
            while not self.supervisor.stopping.wait(1.0):
                pass
        finally:
            self.stop()

    # -- frames, triggers, answers ---------------------------------------------------------------
    def trigger(self, camera: str, part_id: str | None, command: Command | None, correlation: str | None) -> Job:
        """A PLC trigger: the first frame captured after it is the part; answered by its deadline, whatever happens."""
        assert self.board is not None, "start() the daemon before triggering"
        return self.board.trigger(camera, part_id, command, correlation)

    def answer(self, job: Job, verdict: Verdict, image: np.ndarray | None) -> bool:
        """Publish the one answer for ``job`` (see :meth:`VerdictPublisher.answer`)."""
        assert self.publisher is not None, "start() the daemon before answering"
        return self.publisher.answer(job, verdict, image)

    def answer_error(self, job: Job, reason: str) -> None:
        """Answer ``job`` with an explicit ERROR verdict giving ``reason``."""
        assert self.publisher is not None, "start() the daemon before answering"
        self.publisher.answer_error(job, reason)

    def _on_camera_status(self, camera: str, status: str, reason: str | None) -> None:
        if self.board is not None:
            self.board.on_camera_status(camera, status, reason)
        self.counts.add(camera, f"status_{status}")
        self.health.camera_state(camera, status, reason)
        self.announce()

    def _on_explanation(self, request: Any, explanation: Any) -> None:
        """An explanation is ready: the ask it answers (by request key) or the camera's explanation topic."""
        if self.publisher is not None:
            self.publisher.publish_explanation(request, explanation, self.asks.take(request))

    # -- status (StatusReport) -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The retained status document (published on connect and whenever a camera or recipe changes)."""
        return self.report.status()

    def drift_states(self) -> dict[str, dict[str, Any]]:
        """Camera -> its recipe's drift watch state (runtime/line/drift_watch.py), message included."""
        return self.drift.states()

    def problems(self) -> list[str]:
        """Why the daemon is ``degraded`` (empty when all is well)."""
        return self.report.problems()

    def stats(self) -> dict[str, Any]:
        """Counters per camera and queue, and the link's."""
        return self.report.stats()
