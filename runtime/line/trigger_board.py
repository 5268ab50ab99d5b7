"""The trigger board: turns camera frames, PLC triggers and watched files into jobs on work queues.

The first step of the line's data flow. A PLC trigger waits for the first frame captured after it
(plus the binding's ``settle_ms``); free-run cameras offer a frame at the binding's rate; folder
parts arrive with their image. Every triggered part is tracked by the :class:`DeadlineWatchdog`
and answered by its deadline whatever happens (queue full, camera lost, engine too slow).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from anomalygpt_edge.runtime.cameras.base import Camera, Frame
from anomalygpt_edge.runtime.delivery.mqtt_link import Command
from anomalygpt_edge.runtime.line.deadline import DeadlineWatchdog
from anomalygpt_edge.runtime.line.jobs import Job, WorkQueue
from anomalygpt_edge.runtime.line.line_counts import LineCounts
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.config import RecipeBinding

#: The deadline of a camera without a binding.
DEFAULT_DEADLINE_MS = 500.0


class TriggerBoard:
    """Triggers waiting for a frame, free-run pacing, the work queues and the deadline watchdog.

    ``answer_error(job, reason)`` answers a part that cannot be inspected; ``on_error`` receives
    the watchdog's own failures.
    """

    def __init__(
        self,
        slots: RecipeSlots,
        cameras: Mapping[str, Camera],
        counts: LineCounts,
        answer_error: Callable[[Job, str], None],
        on_error: Callable[[str], None] | None = None,
    ):
        self.slots = slots
        self.cameras = cameras
        self.counts = counts
        self.answer_error = answer_error
        # One queue (and one worker) per bundle: cameras sharing a bundle share its engines.
        self.queues: dict[Path, WorkQueue] = {key: WorkQueue() for key in slots.bundles}
        self._awaiting: dict[str, list[Job]] = collections.defaultdict(list)  # triggers waiting for a frame
        self._await_lock = threading.Lock()
        self._last_free: dict[str, float] = {}
        self.watchdog = DeadlineWatchdog(self.on_deadline, on_error=on_error)

    def stop(self) -> None:
        """Wake the workers waiting on the queues and stop the watchdog."""
        for q in self.queues.values():
            q.wake()
        self.watchdog.stop()

    # -- per-camera settings ---------------------------------------------------------------------
    def deadline_ms(self, camera: str) -> float:
        """The camera's answer deadline in milliseconds."""
        b = self.slots.binding(camera)
        return b.deadline_ms if b else DEFAULT_DEADLINE_MS

    def _settle(self, camera: str) -> float:
        b = self.slots.binding(camera)
        return b.settle_ms / 1e3 if b else 0.0

    # -- frames ----------------------------------------------------------------------------------
    def on_frame(self, frame: Frame) -> None:
        """Called on the camera's thread for every new frame: hand it to waiting triggers, schedule free-run."""
        cam = frame.camera
        self.counts.add(cam, "frames")
        with self._await_lock:
            waiting = self._awaiting.get(cam) or []
            ready = [j for j in waiting if frame.captured_mono >= j.created_mono + self._settle(cam)]
            if ready:
                self._awaiting[cam] = [j for j in waiting if j not in ready]
        for job in ready:
            job.frame, job.captured_at = frame, frame.captured_at
            self.enqueue_triggered(job)
        self._offer_free_run(frame)

    def _offer_free_run(self, frame: Frame) -> None:
        cam = frame.camera
        binding = self.slots.binding(cam)
        if binding is None or binding.trigger != "free_run" or self.slots.inspectors.get(cam) is None:
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
        self.queues[self.slots.bundle_key(cam)].put_free(job)

    # -- triggered parts -------------------------------------------------------------------------
    def trigger(self, camera: str, part_id: str | None, command: Command | None, correlation: str | None) -> Job:
        """A PLC trigger: the first frame captured after it is the part; answered by its deadline, whatever happens."""
        now = command.received_mono if command else time.monotonic()
        job = Job(
            camera,
            "trigger",
            deadline_mono=now + self.deadline_ms(camera) / 1e3,
            created_mono=now,
            part_id=part_id,
            command=command,
            correlation=correlation,
        )
        self.counts.add(camera, "triggers")
        self.watchdog.track(job)
        cam = self.cameras.get(camera)
        if cam is None or not cam.online:
            status = f"{cam.status}: {cam.reason}" if cam is not None and cam.reason else getattr(cam, "status", "none")
            self.answer_error(job, f"camera {camera} is not delivering frames ({status})")
            return job
        with self._await_lock:
            self._awaiting[camera].append(job)
        return job

    def folder_part(self, binding: RecipeBinding, path: Path) -> Job:
        """A folder-watch part (its image not read yet), tracked by the deadline watchdog from now."""
        now = time.monotonic()
        job = Job(
            binding.camera,
            "folder_watch",
            deadline_mono=now + binding.deadline_ms / 1e3,
            created_mono=now,
            captured_at=time.time(),
            part_id=path.stem,
        )
        self.counts.add(binding.camera, "frames")
        self.watchdog.track(job)
        return job

    def enqueue_triggered(self, job: Job) -> None:
        """Queue a triggered part for its bundle's worker; a full queue answers it ERROR."""
        if not self.queues[self.slots.bundle_key(job.camera)].put_triggered(job):
            self.answer_error(job, "inspection queue full: too many triggered parts waiting")

    def on_camera_status(self, camera: str, status: str, reason: str | None) -> None:
        """A camera that is no longer online fails the triggers waiting for its frame."""
        if status == "online":
            return
        with self._await_lock:
            lost, self._awaiting[camera] = self._awaiting.get(camera, []), []
        for job in lost:
            self.answer_error(job, f"camera {camera} lost during the trigger ({status}: {reason})")

    def on_deadline(self, job: Job) -> None:
        """The watchdog's answer for a part whose deadline passed, naming where it was stuck."""
        with self._await_lock:
            if job in self._awaiting.get(job.camera, []):
                self._awaiting[job.camera].remove(job)
                stage = "waiting for a frame"
            else:
                stage = "queued for inspection" if job.frame is not None or job.image is not None else "waiting"
        self.answer_error(job, f"deadline exceeded: no verdict within {self.deadline_ms(job.camera):g} ms ({stage})")
