"""``cmd/enroll`` sessions: frames a technician grabs from a line camera, enrolled on ``finish``.

An enroll session holds camera frames in memory: it is dropped, frames and all, when it has been
idle for ``commands.enroll_session_timeout_s``, and ``cancel`` ends one at any time (from paho's
thread, so it is never stuck behind slow commands). Frames added with ``add_defect`` are labelled
defective parts (optional type, optional mask as rectangles), enrolled on ``finish`` through
:meth:`Enroller.add_defects` after the golden frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from anomalygpt_edge.engines.preprocess import ImageError, crop_roi
from anomalygpt_edge.runtime.cameras.base import Camera
from anomalygpt_edge.runtime.line.command_bodies import (
    AddDefect,
    CommandError,
    EnrollBody,
    EnrollFinish,
    EnrollStart,
    Rect,
    RemoveDefect,
)
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.recipes.enrollment import LabelledImage
from anomalygpt_edge.runtime.recipes.store import RecipeError

log = logging.getLogger(__name__)
#: Golden and defective frames together: every one is a full camera image held in memory.
MAX_ENROLL_FRAMES = 200


class EnrollSession:
    """Frames a technician has grabbed from one camera for one recipe, enrolled on ``finish``."""

    def __init__(self, recipe: str):
        self.recipe = recipe
        self.frames: list[tuple[str, Any]] = []
        self.defects: list[LabelledImage] = []  # labelled defective frames, enrolled after the goldens
        self.last_seq = -1
        self.last_used = time.monotonic()
        self.finishing = False  # set while ``finish`` encodes: a cancel can no longer undo it


class EnrollDesk:
    """Open enroll sessions per camera; every method returns the reply's fields or raises CommandError."""

    def __init__(self, slots: RecipeSlots, cameras: Mapping[str, Camera], session_timeout_s: float):
        self.slots = slots
        self.cameras = cameras
        self.session_timeout_s = session_timeout_s
        self.sessions: dict[str, EnrollSession] = {}
        self.sessions_expired = 0
        self._expired: dict[str, str] = {}  # camera -> recipe of its session that expired, for the next reply
        # Sessions are touched from paho's thread (cancel) and the commands thread (the rest).
        self._lock = threading.Lock()

    def handle(self, body: EnrollBody) -> dict[str, Any]:
        """Carry out one enroll action (sessions idle too long are expired first by the caller)."""
        if body.action == "cancel":
            return self.cancel(body.camera)
        if isinstance(body, EnrollStart):
            return self.start(body)
        session = self._open_session(body.camera)
        if isinstance(body, AddDefect):
            return self.add_defect(session, body)
        if isinstance(body, RemoveDefect):
            return self.remove(session, body)
        if isinstance(body, EnrollFinish):
            return self.finish(session, body)
        return self.add(session, body.camera)

    def start(self, body: EnrollStart) -> dict[str, Any]:
        """Open a session into ``body.recipe`` (created with the ROI and target FRR when new)."""
        camera, name = body.camera, body.recipe
        with self._lock:
            open_session = self.sessions.get(camera)
        if open_session is not None:
            raise CommandError(
                f"an enrollment into '{open_session.recipe}' is open on {camera}; send action 'cancel' to end it"
            )
        settings: dict[str, Any] = {}
        binding = self.slots.binding(camera)
        if body.roi is not None:
            settings["roi"] = body.roi
        elif binding is not None and binding.roi is not None:
            settings["roi"] = binding.roi
        if body.target_frr is not None:
            settings["target_frr"] = body.target_frr
        recipe = self.slots.enroller(camera).open_or_create(name, **settings)
        with self._lock:
            self.sessions[camera] = EnrollSession(name)
            self._expired.pop(camera, None)
        return {
            "action": "start",
            "camera": camera,
            "recipe": name,
            "existing_samples": len(recipe.samples),
            "existing_defects": len(recipe.defects),
            "expires_after_idle_s": self.session_timeout_s,
        }

    def _open_session(self, camera: str) -> EnrollSession:
        with self._lock:
            session = self.sessions.get(camera)
            if session is not None:
                session.last_used = time.monotonic()
            expired = self._expired.get(camera)
        if session is None and expired is not None:
            raise CommandError(
                f"the enrollment into '{expired}' on {camera} expired after {self.session_timeout_s:g} s idle "
                "and its frames were discarded: send action 'start' again"
            )
        if session is None:
            raise CommandError(f"no enrollment open on {camera}: send action 'start' first")
        return session

    def _grab(self, camera: str, session: EnrollSession) -> Any:
        """A frame newer than the session's last one (golden or defect), within the session's bound."""
        cam = self.cameras.get(camera)
        if cam is None:
            raise CommandError(f"camera '{camera}' has no live frames to enroll from")
        if len(session.frames) + len(session.defects) >= MAX_ENROLL_FRAMES:
            raise CommandError(f"at most {MAX_ENROLL_FRAMES} frames (golden and defective) per enrollment")
        frame = cam.wait_frame(newer_than_seq=session.last_seq, timeout=2.0)
        if frame is None:
            raise CommandError(f"camera {camera} delivered no new frame ({cam.status}: {cam.reason})")
        return frame

    def _still_open(self, camera: str, session: EnrollSession, what: str) -> None:
        """Raise when the session was cancelled while a frame was awaited (call with the lock held)."""
        if self.sessions.get(camera) is not session:
            raise CommandError(f"the enrollment on {camera} was cancelled; {what}")

    def add(self, session: EnrollSession, camera: str) -> dict[str, Any]:
        """Take a new frame as a golden sample."""
        frame = self._grab(camera, session)
        with self._lock:
            self._still_open(camera, session, "frame not added")
            session.last_seq = frame.seq
            session.frames.append((f"{camera}-{frame.seq}", frame.image))
            session.last_used = time.monotonic()
        return {
            "action": "add",
            "camera": camera,
            "recipe": session.recipe,
            "count": len(session.frames),
            "frame_seq": frame.seq,
        }

    def add_defect(self, session: EnrollSession, body: AddDefect) -> dict[str, Any]:
        """Take a new frame as a labelled defective part, with an optional type and rectangle mask.

        The body was checked before this (so a malformed request never holds a frame); the
        rectangles are then checked against the frame and the recipe's ROI.
        """
        camera = body.camera
        recipe = self.slots.store.load(session.recipe)
        frame = self._grab(camera, session)
        mask = None
        if body.mask is not None:
            mask = rasterise(body.mask, frame.image.shape[:2])
            if not crop_roi(mask, recipe.roi, "mask").any():
                raise CommandError(f"field 'mask': no rectangle overlaps the recipe's ROI {list(recipe.roi or ())}")
        label = f"defect-{camera}-{frame.seq}"
        with self._lock:
            self._still_open(camera, session, "frame not added")
            session.last_seq = frame.seq
            session.defects.append(LabelledImage(label, frame.image, mask, body.defect_type))
            session.last_used = time.monotonic()
        return {
            "action": "add_defect",
            "camera": camera,
            "recipe": session.recipe,
            "name": label,
            "defect_type": body.defect_type,
            "has_mask": mask is not None,
            "defects": len(session.defects),
            "count": len(session.frames),
            "frame_seq": frame.seq,
        }

    def remove(self, session: EnrollSession, body: RemoveDefect) -> dict[str, Any]:
        """Drop a defect added in this session, or remove an enrolled labelled defect from the recipe."""
        camera, name = body.camera, body.name
        with self._lock:
            pending = [x for x in session.defects if x.label == name]
            if pending:
                session.defects.remove(pending[0])
                return {
                    "action": "remove",
                    "camera": camera,
                    "recipe": session.recipe,
                    "removed": name,
                    "pending": True,
                    "defects": len(session.defects),
                }
        recipe = self.slots.store.load(session.recipe)
        hits = [x for x in recipe.defects if x.name == name or (len(name) >= 8 and x.sha256.startswith(name))]
        if len(hits) != 1:
            known = ", ".join([x.label for x in session.defects] + [x.name for x in recipe.defects]) or "none"
            raise CommandError(f"no single labelled defect '{name}' in recipe '{session.recipe}' (defects: {known})")
        # Enroller.remove also matches golden samples: pass the defect's full sha256, never ambiguous.
        result = self.slots.enroller(camera).remove(session.recipe, hits[0].sha256)
        self.slots.reload_users(session.recipe)
        out = result.to_json()
        return {
            "action": "remove",
            "camera": camera,
            "removed": hits[0].name,
            "pending": False,
            **{k: out[k] for k in ("recipe", "live", "k", "defects", "bank_version", "head", "expectation")},
        }

    def finish(self, session: EnrollSession, body: EnrollFinish) -> dict[str, Any]:
        """Enroll the golden frames, then the labelled defects (training the head), and go live."""
        camera = body.camera
        with self._lock:
            self._still_open(camera, session, "nothing to finish")
            session.finishing = True
        try:
            result, golden_added, defects_added, skipped = self._enroll(session, bool(body.accept_flagged), camera)
        finally:
            with self._lock:
                if self.sessions.get(camera) is session:
                    del self.sessions[camera]
        out = {
            "action": "finish",
            "camera": camera,
            **result.to_json(),
            "added": golden_added,
            "defects_added": defects_added,
            "skipped": skipped,
        }
        switched = result.recipe.live and body.switch is not False
        if switched:
            self.slots.load_recipe(camera, session.recipe)
            out["switched"] = True
        # Every other camera already on the recipe (this one too with switch: false) runs what was
        # just committed, as it would after a restart: now, by this desk, not later by the recipe
        # watch as if another process had written it. Then the status is republished.
        self.slots.reload_users(session.recipe, except_camera=camera if switched else None)
        return out

    def _enroll(self, session: EnrollSession, accept: bool, camera: str) -> tuple[Any, list[str], list[str], list[str]]:
        """``(last result, golden added, defects added, skipped)``; goldens committed before defects."""
        enroller = self.slots.enroller(camera)
        result = None
        golden_added: list[str] = []
        skipped: list[str] = []
        if session.frames or not session.defects:
            result = enroller.add(session.recipe, session.frames, accept_flagged=accept)
            golden_added, skipped = list(result.added), list(result.skipped)
        defects_added: list[str] = []
        if session.defects:
            try:
                result = enroller.add_defects(session.recipe, session.defects, accept_flagged=accept)
            except (RecipeError, ImageError, ValueError) as exc:
                if golden_added:  # the goldens are committed: say so, the defects are not
                    raise CommandError(
                        f"{len(golden_added)} golden frames were enrolled into '{session.recipe}', but the "
                        f"{len(session.defects)} labelled defects were not: {exc}"
                    ) from None
                raise
            defects_added = list(result.added)
            skipped += result.skipped
        assert result is not None
        return result, golden_added, defects_added, skipped

    def cancel(self, camera: str) -> dict[str, Any]:
        """End the camera's enroll session at once (any thread); a camera without one is no error."""
        with self._lock:
            session = self.sessions.get(camera)
            if session is not None and session.finishing:
                raise CommandError(
                    f"the enrollment into '{session.recipe}' on {camera} is being finished; too late to cancel"
                )
            if session is not None:
                del self.sessions[camera]
            self._expired.pop(camera, None)
        frames = len(session.frames) + len(session.defects) if session is not None else 0
        return {
            "action": "cancel",
            "camera": camera,
            "recipe": session.recipe if session is not None else None,
            "discarded": frames,
            "discarded_defects": len(session.defects) if session is not None else 0,
            "was_open": session is not None,
        }

    def expire(self) -> None:
        """Drop enroll sessions idle past the timeout: their frames must not be held for ever."""
        now = time.monotonic()
        with self._lock:
            stale = [
                (camera, s)
                for camera, s in self.sessions.items()
                if not s.finishing and now - s.last_used > self.session_timeout_s
            ]
            for camera, s in stale:
                del self.sessions[camera]
                self._expired[camera] = s.recipe
            self.sessions_expired += len(stale)
        for camera, s in stale:
            log.warning(
                "enroll session into %s on %s expired after %.0f s idle: %d frames (%d defective) discarded",
                s.recipe,
                camera,
                self.session_timeout_s,
                len(s.frames) + len(s.defects),
                len(s.defects),
            )


def rasterise(rects: list[Rect], shape: tuple[int, int]) -> np.ndarray:
    """A uint8 mask of the frame's size (255 inside the rectangles); each rectangle must fit in the frame."""
    height, width = shape
    mask = np.zeros((height, width), np.uint8)
    for i, (x, y, w, h) in enumerate(rects):
        if x + w > width or y + h > height:
            raise CommandError(
                f"field 'mask' rectangle {i} [{x}, {y}, {w}, {h}] does not fit inside the {width}x{height} frame"
            )
        mask[y : y + h, x : x + w] = 255
    return mask
