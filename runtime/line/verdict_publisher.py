"""Verdict publishing: the one answer for each part, to the PLC, the archive and the observers.

The last step of the line's data flow (frame -> preprocess -> engines -> verdict -> publish).
Answering never touches the disk on the answering thread: the verdict is queued for the link's
sender, whose group commit to the spool releases the PLC's reply (at once from memory when the
spool cannot commit). A failure after a part was claimed still sends the PLC a minimal ERROR.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from anomalygpt_edge.engines.preprocess import ImageError, crop_roi
from anomalygpt_edge.runtime.delivery.messages import (
    EXPLANATION_SCHEMA,
    VERDICT_SCHEMA,
    finish_and_encode,
    uuid7,
    verdict_message,
)
from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.asks import LineExplainRequest, PendingAsk
from anomalygpt_edge.runtime.line.jobs import Job
from anomalygpt_edge.runtime.line.line_counts import LineCounts
from anomalygpt_edge.runtime.line.link import Link
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.line.status import DaemonHealth

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.delivery.archive import ArchiveWriter
    from anomalygpt_edge.runtime.explain.explainer import ExplanationWorker
    from anomalygpt_edge.runtime.line.config import DaemonConfig
    from anomalygpt_edge.runtime.line.drift_watch import DriftWatches

log = logging.getLogger(__name__)
VerdictListener = Callable[[Job, str, Verdict, dict, "np.ndarray | None"], None]
ExplanationListener = Callable[[Any, Any], None]


class VerdictPublisher:
    """Answers jobs: verdict to the link (reply on durability), then heatmap, explanation, archive, listeners.

    ``verdict_listeners`` and ``explanation_listeners`` (the technician station) are called on the
    inspection worker / explanation worker, so they must only enqueue, never block.
    """

    def __init__(
        self,
        config: DaemonConfig,
        link: Link,
        slots: RecipeSlots,
        health: DaemonHealth,
        counts: LineCounts,
        *,
        archive: ArchiveWriter | None = None,
        explanations: ExplanationWorker | None = None,
        verdict_listeners: list[VerdictListener] | None = None,
        explanation_listeners: list[ExplanationListener] | None = None,
        sparkplug: Any = None,
        drift: DriftWatches | None = None,
    ):
        self.config = config
        self.link = link
        self.slots = slots
        self.health = health
        self.counts = counts
        self.archive = archive
        self.explanations = explanations
        self.verdict_listeners = verdict_listeners if verdict_listeners is not None else []
        self.explanation_listeners = explanation_listeners if explanation_listeners is not None else []
        self.sparkplug = sparkplug  # the Sparkplug B Edge Node (None without a sparkplug section)
        self.drift = drift  # the drift watch, fed every verdict (O(1), never raises)
        self.last: dict[str, tuple[str, Verdict]] = {}  # camera -> (verdict id, verdict), for `ask`

    # -- answering -------------------------------------------------------------------------------
    def answer_error(self, job: Job, reason: str) -> None:
        """Answer ``job`` with an explicit ERROR verdict giving ``reason``."""
        inspector, _, recipe = self.slots.current(job.camera)
        verdict = Verdict.error(
            recipe or "",
            reason,
            bank_version=inspector.recipe.bank_version if inspector else None,
            bundle_sha256=self.slots.bundle_sha256(job.camera),
        )
        self.answer(job, verdict, job.pixels())

    def answer(self, job: Job, verdict: Verdict, image: np.ndarray | None) -> bool:
        """Publish the one answer for ``job``; False if it was answered already (the late result is dropped).

        Never blocks on the disk: the verdict is queued for the sender's next group commit and the
        PLC's reply goes out as soon as that batch is durable (or at once if the spool cannot
        commit). If building the answer fails, the PLC still gets an explicit ERROR.
        """
        if not job.claim():
            self.counts.add(job.camera, "late_discarded")
            return False
        try:
            self._publish(job, verdict, image)
        except Exception as exc:  # last resort: the part was claimed, so it must still be answered
            log.exception("camera %s: answering failed", job.camera)
            self.health.error(f"camera {job.camera}: answering failed: {exc!r}", camera=job.camera)
            self.emergency_reply(job, f"internal error while answering: {exc!r}")
        return True

    def emergency_reply(self, job: Job, reason: str) -> None:
        """A minimal ERROR reply straight to the PLC (no spool, no archive) when the normal path failed."""
        if job.command is None:
            return
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

    def _message(self, job: Job, verdict: Verdict, vid: str) -> dict[str, Any]:
        frame = job.frame
        return verdict_message(
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

    def _publish(self, job: Job, verdict: Verdict, image: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        self.counts.add(job.camera, "verdicts")
        self.counts.add(job.camera, verdict.verdict)
        vid = uuid7()
        msg = self._message(job, verdict, vid)
        link = self.link
        payload = finish_and_encode(msg, t0)
        self.health.frame(job.camera, msg["latency_ms"].get("total"), verdict.verdict)
        reply = None
        if job.command is not None:
            command, body = job.command, {**msg, "command": "trigger", "ok": verdict.verdict != "ERROR"}

            def reply(durable: bool) -> None:  # on the sender thread, once the verdict is durable
                link.reply(command, body)

        link.publish_verdict(vid, link.topic(job.camera, "verdict"), payload, on_durable=reply)
        if self.sparkplug is not None:  # the same verdict as DDATA (only queued: spooled on the node's sender)
            self.sparkplug.publish_verdict(job.camera, vid, msg)
        self.last[job.camera] = (vid, verdict)
        if self.drift is not None:
            self.drift.observe(job.camera, verdict)
        try:
            self._after_verdict(job, vid, verdict, msg, self._roi_image(job.camera, verdict, image))
        except Exception as exc:  # heatmap/archive/listeners: the answer is already on its way
            log.exception("camera %s: after-verdict work failed", job.camera)
            self.health.error(f"camera {job.camera}: after-verdict work failed: {exc!r}", camera=job.camera)

    def _roi_image(self, camera: str, verdict: Verdict, image: np.ndarray | None) -> np.ndarray | None:
        """The part of ``image`` the verdict is about (the recipe's ROI), the whole image when unknown."""
        if image is None or verdict.verdict == "ERROR":
            return image
        inspector = self.slots.inspectors.get(camera)
        if inspector is None:
            return image
        try:
            return crop_roi(image, inspector.recipe.roi)
        except ImageError:
            return image

    # -- after the verdict, off the PLC's critical path ------------------------------------------
    def _after_verdict(self, job: Job, vid: str, verdict: Verdict, msg: dict, image: np.ndarray | None) -> None:
        """What follows a published verdict: heatmap, explanation, archive, observers."""
        binding = self.slots.binding(job.camera)
        heat = None
        if verdict.verdict == "NG" and image is not None and (binding is None or binding.heatmap or self.archive):
            from anomalygpt_edge.runtime.inspection.heatmap import overlay

            heat = overlay(image, verdict)
            if binding is not None and binding.heatmap:
                ok, jpg = cv2.imencode(".jpg", heat, [cv2.IMWRITE_JPEG_QUALITY, 85])
                if ok:
                    self.link.publish_heatmap(job.camera, vid, jpg.tobytes())
        if self.explanations is not None and (verdict.verdict == "NG" or self.config.llm.explain == "all"):
            # A newer verdict of the same camera supersedes one still waiting (key = camera).
            self.explanations.submit(LineExplainRequest(verdict, key=job.camera, verdict_id=vid, camera=job.camera))
        if self.archive is not None:
            # The archive decides which images it keeps (NG/ERROR always, OK at its sample rate).
            self.archive.submit(msg, image, heat)
        for listener in self.verdict_listeners:
            try:
                listener(job, vid, verdict, msg, image)
            except Exception:  # an observer's bug must never reach the verdict path
                log.exception("verdict listener %r failed", listener)

    def publish_explanation(self, request: Any, explanation: Any, ask: PendingAsk | None) -> None:
        """An explanation: the reply to ``ask`` when it answers one, else on ``<camera>/explanation``."""
        for listener in self.explanation_listeners:
            try:
                listener(request, explanation)
            except Exception:
                log.exception("explanation listener %r failed", listener)
        camera = ask.camera if ask is not None else getattr(request, "camera", "") or request.key
        body = {
            "schema": EXPLANATION_SCHEMA,
            "verdict_id": request.verdict_id,
            "camera": camera,
            "recipe": request.verdict.recipe,
            "verdict": request.verdict.verdict,
            "question": request.question,
            **explanation.to_json(),
        }
        if ask is not None:
            target = ask.command
            self.link.reply(target, {"command": "ask", "ok": True, "correlation_id": target.correlation_text, **body})
        else:
            self.link.publish_json(self.link.topic(camera, "explanation"), body, qos=1)
