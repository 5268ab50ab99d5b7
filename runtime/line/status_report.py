"""The daemon's status document, its ``problems`` and its counters.

The retained status (published on connect, on every camera or recipe change, and by the heartbeat)
says ``starting`` while the engines warm up (before READY=1), then ``degraded`` whenever
:meth:`StatusReport.problems` is not empty: a sender that cannot spool,
a full disk, a store moved aside, a dead or restarted thread, a camera whose recipe cannot inspect.
``warnings`` (the drift watch's plain words, see ``drift_watch.py``) do not make it ``degraded``:
the daemon works, the parts changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anomalygpt_edge
from anomalygpt_edge.runtime.cameras.base import Camera
from anomalygpt_edge.runtime.delivery.messages import STATUS_SCHEMA, iso
from anomalygpt_edge.runtime.line.jobs import WorkQueue
from anomalygpt_edge.runtime.line.line_counts import LineCounts
from anomalygpt_edge.runtime.line.link import Link
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.line.states import CameraState, DaemonState
from anomalygpt_edge.runtime.line.status import DaemonHealth
from anomalygpt_edge.runtime.line.storage import LineStorage
from anomalygpt_edge.runtime.line.supervisor import Supervisor

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.config import DaemonConfig
    from anomalygpt_edge.runtime.line.drift_watch import DriftWatches


class StatusReport:
    """Builds the status document from the daemon's parts; ``link()`` / ``queues()`` read the current ones."""

    def __init__(
        self,
        config: DaemonConfig,
        slots: RecipeSlots,
        cameras: Mapping[str, Camera],
        health: DaemonHealth,
        storage: LineStorage,
        supervisor: Supervisor,
        counts: LineCounts,
        link: Callable[[], Link | None],
        queues: Callable[[], Mapping[Path, WorkQueue]],
        started_at: float,
        drift: DriftWatches | None = None,
    ):
        self.config = config
        self.slots = slots
        self.cameras = cameras
        self.health = health
        self.storage = storage
        self.supervisor = supervisor
        self.counts = counts
        self.link = link
        self.queues = queues
        self.started_at = started_at
        self.drift = drift  # the drift watch: a ``drift`` object per camera and plain-words ``warnings``

    def status(self) -> dict[str, Any]:
        """The retained status document (published on connect and whenever a camera or recipe changes)."""
        problems = self.problems()
        # Until the engines are warmed up (before READY=1) the daemon is not serving parts yet.
        state: DaemonState = "starting" if not self.slots.warmed.is_set() else "degraded" if problems else "online"
        pipelines = self.slots.pipelines
        drift = self.drift.states() if self.drift is not None else {}
        base = {
            "schema": STATUS_SCHEMA,
            "state": state,
            "problems": problems,
            # Not problems (the daemon works): what the line should look at, in plain words (drift).
            "warnings": self.drift.warnings(drift) if self.drift is not None else [],
            "device": self.config.device_id,
            "version": anomalygpt_edge.__version__,
            "started_at": iso(self.started_at),
            "cameras": {name: {**self._camera(name), "drift": drift.get(name)} for name in self.config.cameras},
            "recipes": self.slots.store.names(),
            "bundles": [
                {"path": str(k), "sha256": b.sha256, "engine_backend": pipelines[k].encoder.describe()}
                for k, b in self.slots.bundles.items()
            ],
            "bundle_sha256": next(iter(self.slots.bundles.values())).sha256 if self.slots.bundles else None,
            "engine_backend": next(iter(pipelines.values())).encoder.describe() if pipelines else None,
            "llm": self.config.llm.enabled,
            "spool": self._spool_status(),
            "warmup": [run.to_json() for run in self.slots.warmups],
            "recipe_changes": list(self.slots.changes),  # the last rollbacks, newest last
        }
        return self.health.status(base)

    def _camera(self, name: str) -> dict[str, Any]:
        b = self.slots.binding(name)
        cam = self.cameras.get(name)
        inspector, problem, recipe = self.slots.current(name)
        info = cam.info() if cam else {"type": self.config.cameras[name].type, "status": self.camera_state(name)}
        return {
            **info,
            "recipe": recipe,
            "live": inspector is not None,
            "problem": problem,
            "trigger": b.trigger if b else None,
            "fps": b.fps if b else None,
            "deadline_ms": b.deadline_ms if b else None,
        }

    def camera_state(self, camera: str) -> CameraState:
        """The state of a camera without a grabbing thread: a watched folder, or one not started yet."""
        b = self.slots.binding(camera)
        if b is not None and b.trigger == "folder_watch":
            return "watching" if Path(self.config.cameras[camera].source).is_dir() else "folder missing"
        return "starting" if not self.supervisor.stopping.is_set() else "stopped"

    def _spool_status(self) -> dict[str, Any] | None:
        spool = self.storage.spool
        if spool is None:
            return None
        out = spool.stats()
        link = self.link()
        sender = link.sender if link is not None else None
        if sender is not None and (memory := sender.memory_depth()):
            out["in_memory"] = memory  # verdicts the spool could not take, published from memory
        if sender is not None and sender.stats["dropped_memory"]:
            out["dropped_memory"] = sender.stats["dropped_memory"]
        return out

    def problems(self) -> list[str]:
        """Why the daemon is ``degraded`` (empty when all is well): disk, spool, archive, threads, recipes."""
        out: list[str] = []
        link = self.link()
        sender = link.sender if link is not None else None
        if sender is not None and sender.problem:
            out.append(sender.problem)
        out += self.storage.problems()
        out += [f"thread {name} is dead: {reason}" for name, reason in self.health.dead_threads().items()]
        out += self.supervisor.recent_crashes()
        # A bound camera whose recipe cannot inspect answers every part ERROR: the line is not
        # fully served, whatever the reason (not enrolled yet, or files refused by their checks).
        out += self.slots.refused()
        return out

    def condition(self) -> dict[str, int]:
        """The status's state as numbers (Prometheus ``anomalygpt_edge_condition_degraded``, /healthz)."""
        problems = self.problems()
        return {"degraded": int(bool(problems)), "problems": len(problems)}

    def queue_depths(self) -> dict[str, int]:
        """Work waiting per inspection worker (triggered / free-run) and in the archive writer."""
        out = {
            f"inspect-{n}.{kind}": depth
            for n, q in enumerate(self.queues().values())
            for kind, depth in q.depth().items()
        }
        if self.storage.archive is not None:
            out["archive"] = self.storage.archive.depth()
        return out

    def stats(self) -> dict[str, Any]:
        """Counters per camera and queue, and the link's."""
        link = self.link()
        return {
            "cameras": {k: dict(v) for k, v in self.counts.items()},
            "queues": {str(k): {**q.depth(), **q.counts} for k, q in self.queues().items()},
            "mqtt": dict(link.stats) if link else None,
        }
