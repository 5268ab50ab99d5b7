"""MQTT commands: ``cmd/trigger``, ``cmd/enroll``, ``cmd/recipe``, ``cmd/ask`` (contract in MQTT.md).

Every command gets exactly one reply (except a successful trigger, whose reply is its verdict):
malformed JSON, wrong types, unknown cameras or recipes and oversized payloads are answered with
``ok: false`` and an ``error`` saying what is wrong, and the daemon carries on. Triggers and
enroll ``cancel`` are handled on paho's thread (they only queue work or drop a session, so a
cancel is never stuck behind slow commands); everything slow runs on the ``commands`` thread.

An enroll session holds camera frames in memory: it is dropped, frames and all, when it has been
idle for ``commands.enroll_session_timeout_s``, and ``cancel`` ends one at any time. Frames added
with ``add_defect`` are labelled defective parts (optional type, optional mask as rectangles),
enrolled on ``finish`` through :meth:`Enroller.add_defects` after the golden frames.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from anomalygpt_edge.engines.preprocess import ImageError, crop_roi, set_max_image_pixels
from anomalygpt_edge.runtime.delivery.messages import reply
from anomalygpt_edge.runtime.delivery.mqtt_link import COMMANDS, Command
from anomalygpt_edge.runtime.line.command_gate import CommandGate, CommandPolicy, Rejection
from anomalygpt_edge.runtime.recipes.enrollment import LabelledImage
from anomalygpt_edge.runtime.recipes.store import DEFECT_TYPE, RecipeError, check_name

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.daemon import Daemon

log = logging.getLogger(__name__)
ENROLL_ACTIONS = ("start", "add", "add_defect", "remove", "finish", "cancel")
RECIPE_ACTIONS = ("list", "show", "switch")
#: Golden and defective frames together: every one is a full camera image held in memory.
MAX_ENROLL_FRAMES = 200
#: A defect's mask is a list of rectangles: a few boxes outline any defect a technician can name,
#: and the bound keeps rasterising (and the payload) small whatever a client sends.
MAX_MASK_RECTS = 32


#: The command gate's rejections in this module's reply wording.
_GATE_ERRORS = {
    "payload_too_large": "payload too large: {}",
    "malformed_json": "malformed JSON: {}",
    "too_deep": "malformed JSON: {}",
    "bad_payload": "malformed JSON: {}",
    "unauthorized": "not authorized: {}",
}


def _gate(daemon: Daemon) -> CommandGate:
    """The command gate for this daemon's topics, payload limit and commands section."""
    cfg = daemon.config
    ids = cfg.commands.allowed_client_ids
    policy = CommandPolicy(
        prefix=cfg.mqtt.prefix,
        device=cfg.device_id,
        max_payload_bytes=cfg.mqtt.max_payload_bytes,
        privileged=frozenset(cfg.commands.privileged),
        allowed_client_ids=frozenset(ids) if ids is not None else None,
        token=cfg.commands.token,
        allow_anonymous=cfg.commands.allow_anonymous_control,
    )
    return CommandGate(policy)


class CommandError(ValueError):
    """A command that cannot be carried out; the message goes back in the reply's ``error``."""


def field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    """``data[name]`` checked against ``kind`` (bools are not numbers here)."""
    if name not in data or data[name] is None:
        if required:
            raise CommandError(f"missing field '{name}'")
        return None
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CommandError(f"field '{name}' must be {names}, got {type(value).__name__} {json.dumps(value)[:40]}")
    return value


class EnrollSession:
    """Frames a technician has grabbed from one camera for one recipe, enrolled on ``finish``."""

    def __init__(self, recipe: str):
        self.recipe = recipe
        self.frames: list[tuple[str, Any]] = []
        self.defects: list[LabelledImage] = []  # labelled defective frames, enrolled after the goldens
        self.last_seq = -1
        self.last_used = time.monotonic()
        self.finishing = False  # set while ``finish`` encodes: a cancel can no longer undo it


class CommandCenter:
    """Parses, validates and carries out commands for a :class:`Daemon`."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.sessions: dict[str, EnrollSession] = {}
        self.sessions_expired = 0
        self._expired: dict[str, str] = {}  # camera -> recipe of its session that expired, for the next reply
        self.session_timeout_s = daemon.config.commands.enroll_session_timeout_s
        # Sessions are touched from paho's thread (cancel) and the commands thread (the rest).
        self._sessions_lock = threading.Lock()
        # The daemon's images are read by preprocess.read_image (cameras, folder watch): the
        # configured pixel limit applies to all of them from here on.
        set_max_image_pixels(daemon.config.limits.max_image_pixels)
        self.ask_targets: dict[int, Command] = {}  # explanation request id -> the ask awaiting it
        self._ask_started: dict[int, float] = {}
        self.errors = 0
        self.gate = _gate(daemon)
        self._queue: queue.Queue[tuple[Command, dict[str, Any]] | None] = queue.Queue(maxsize=16)
        self._ask_ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None) -> None:
        """Start the ``commands`` thread: plain, or through ``spawn`` (the daemon's last-resort handler,
        which records an exception the loop did not expect and runs the loop again)."""
        if spawn is not None:
            self._thread = spawn("commands", self._run)
        else:
            self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(5.0)

    # -- entry point (paho's network thread) -----------------------------------------------------
    def receive(self, cmd: Command) -> None:
        data: dict[str, Any] = {}
        try:
            data = self._parse(cmd)
            if cmd.name == "trigger":
                self._trigger(cmd, data)
                return
            if cmd.name == "enroll" and data.get("action") == "cancel":
                self._send(cmd, data, True, **self._cancel(self._camera(data)))
                return
            try:
                self._queue.put_nowait((cmd, data))
            except queue.Full:
                raise CommandError("busy: too many commands waiting; retry") from None
        except CommandError as exc:
            self.fail(cmd, data, str(exc))

    def fail(self, cmd: Command, data: dict[str, Any], error: str) -> None:
        self.errors += 1
        log.warning("command %s refused: %s", cmd.name, error)
        self._send(cmd, data, False, error=error)

    def _send(self, cmd: Command, data: dict[str, Any], ok: bool, **fields: Any) -> None:
        corr = data.get("correlation_id") if isinstance(data.get("correlation_id"), str) else cmd.correlation_text
        link = self.daemon.link
        if link is not None:
            link.reply(cmd, reply(cmd.name, ok, corr, **fields))

    def _parse(self, cmd: Command) -> dict[str, Any]:
        """Size, JSON shape and (for enrollment/recipe changes) authorisation, by the command gate."""
        if cmd.name not in COMMANDS:
            raise CommandError(f"unknown command '{cmd.name}'; commands: {', '.join(COMMANDS)}")
        checked = self.gate.check(
            self.gate.policy.command_root + cmd.name,
            cmd.payload,
            getattr(cmd, "user_properties", None),
            cmd.response_topic,
        )
        if cmd.response_topic is not None and checked.reply_topic != cmd.response_topic:
            # A wildcard (unpublishable) or a topic inside our own namespace (a forged verdict or
            # status): the reply goes to <prefix>/<device>/reply/<command> instead.
            cmd.response_topic = None
        if isinstance(checked, Rejection):
            raise CommandError(_GATE_ERRORS.get(checked.code, "{}").format(checked.message))
        return checked.body

    def _camera(self, data: dict[str, Any]) -> str:
        camera = field(data, "camera", str)
        if camera not in self.daemon.config.cameras:
            known = ", ".join(self.daemon.config.cameras)
            raise CommandError(f"unknown camera '{camera}'; cameras: {known}")
        return camera

    def _recipe_name(self, data: dict[str, Any]) -> str:
        name = field(data, "recipe", str)
        try:
            return check_name(name)
        except RecipeError as exc:
            raise CommandError(str(exc)) from None

    # -- trigger ---------------------------------------------------------------------------------
    def _trigger(self, cmd: Command, data: dict[str, Any]) -> None:
        camera = self._camera(data)
        part = field(data, "part_id", (str, int), required=False)
        if camera not in self.daemon.cameras:
            raise CommandError(f"camera '{camera}' is a watched folder: its parts are new files, not triggers")
        corr = data.get("correlation_id") if isinstance(data.get("correlation_id"), str) else cmd.correlation_text
        self.daemon.trigger(camera, None if part is None else str(part), cmd, corr)

    # -- slow commands (the ``commands`` thread) -------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._expire_asks()
                self._expire_sessions()
                continue
            if item is None:
                return
            cmd, data = item
            try:
                result = getattr(self, f"_cmd_{cmd.name}")(cmd, data)
                if result is not None:
                    self._send(cmd, data, True, **result)
            except CommandError as exc:
                self.fail(cmd, data, str(exc))
            except (RecipeError, ImageError, ValueError, OSError) as exc:
                self.fail(cmd, data, str(exc))
            except Exception as exc:  # the daemon keeps running whatever a command does
                log.exception("command %s failed", cmd.name)
                self.fail(cmd, data, f"internal error: {type(exc).__name__}: {exc}")

    def _cmd_enroll(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any]:
        action = field(data, "action", str)
        if action not in ENROLL_ACTIONS:
            raise CommandError(f"action must be one of {', '.join(ENROLL_ACTIONS)}, got '{action}'")
        camera = self._camera(data)
        d = self.daemon
        self._expire_sessions()
        if action == "cancel":
            return self._cancel(camera)
        if action == "start":
            name = self._recipe_name(data)
            with self._sessions_lock:
                open_session = self.sessions.get(camera)
            if open_session is not None:
                raise CommandError(
                    f"an enrollment into '{open_session.recipe}' is open on {camera}; send action 'cancel' to end it"
                )
            settings: dict[str, Any] = {}
            roi = field(data, "roi", list, required=False)
            binding = d.binding(camera)
            if roi is not None:
                if len(roi) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi):
                    raise CommandError("field 'roi' must be [x, y, w, h] integers")
                settings["roi"] = tuple(roi)
            elif binding is not None and binding.roi is not None:
                settings["roi"] = binding.roi
            frr = field(data, "target_frr", (int, float), required=False)
            if frr is not None:
                settings["target_frr"] = float(frr)
            recipe = d.enrollers[d.bundle_key(camera)].open_or_create(name, **settings)
            with self._sessions_lock:
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
        with self._sessions_lock:
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
        if action == "add":
            frame = self._grab(camera, session)
            with self._sessions_lock:
                if self.sessions.get(camera) is not session:  # cancelled while the frame was awaited
                    raise CommandError(f"the enrollment on {camera} was cancelled; frame not added")
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
        if action == "add_defect":
            return self._add_defect(camera, session, data)
        if action == "remove":
            return self._remove_defect(camera, session, data)
        return self._finish(camera, session, data)

    def _grab(self, camera: str, session: EnrollSession) -> Any:
        """A frame newer than the session's last one (golden or defect), within the session's bound."""
        cam = self.daemon.cameras.get(camera)
        if cam is None:
            raise CommandError(f"camera '{camera}' has no live frames to enroll from")
        if len(session.frames) + len(session.defects) >= MAX_ENROLL_FRAMES:
            raise CommandError(f"at most {MAX_ENROLL_FRAMES} frames (golden and defective) per enrollment")
        frame = cam.wait_frame(newer_than_seq=session.last_seq, timeout=2.0)
        if frame is None:
            raise CommandError(f"camera {camera} delivered no new frame ({cam.status}: {cam.reason})")
        return frame

    def _add_defect(self, camera: str, session: EnrollSession, data: dict[str, Any]) -> dict[str, Any]:
        """Take a new frame as a labelled defective part, with an optional type and rectangle mask.

        Everything that can be checked without the frame is checked first, so a malformed request
        never holds a frame; the rectangles are then checked against the frame and the recipe's ROI.
        """
        defect_type = field(data, "defect_type", str, required=False)
        if defect_type is not None and not DEFECT_TYPE.match(defect_type):
            raise CommandError(
                f"field 'defect_type' {defect_type[:40]!r} is invalid: letters, digits, ' ', '_', '.', '-' (max 64)"
            )
        rects = _mask_rects(data.get("mask"))
        recipe = self.daemon.store.load(session.recipe)
        frame = self._grab(camera, session)
        mask = None
        if rects is not None:
            mask = _rasterise(rects, frame.image.shape[:2])
            if not crop_roi(mask, recipe.roi, "mask").any():
                raise CommandError(f"field 'mask': no rectangle overlaps the recipe's ROI {list(recipe.roi or ())}")
        label = f"defect-{camera}-{frame.seq}"
        with self._sessions_lock:
            if self.sessions.get(camera) is not session:
                raise CommandError(f"the enrollment on {camera} was cancelled; frame not added")
            session.last_seq = frame.seq
            session.defects.append(LabelledImage(label, frame.image, mask, defect_type))
            session.last_used = time.monotonic()
        return {
            "action": "add_defect",
            "camera": camera,
            "recipe": session.recipe,
            "name": label,
            "defect_type": defect_type,
            "has_mask": mask is not None,
            "defects": len(session.defects),
            "count": len(session.frames),
            "frame_seq": frame.seq,
        }

    def _remove_defect(self, camera: str, session: EnrollSession, data: dict[str, Any]) -> dict[str, Any]:
        """Drop a defect added in this session, or remove an enrolled labelled defect from the recipe."""
        name = field(data, "name", str)
        with self._sessions_lock:
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
        d = self.daemon
        recipe = d.store.load(session.recipe)
        hits = [x for x in recipe.defects if x.name == name or (len(name) >= 8 and x.sha256.startswith(name))]
        if len(hits) != 1:
            known = ", ".join([x.label for x in session.defects] + [x.name for x in recipe.defects]) or "none"
            raise CommandError(f"no single labelled defect '{name}' in recipe '{session.recipe}' (defects: {known})")
        # Enroller.remove also matches golden samples: pass the defect's full sha256, never ambiguous.
        result = d.enrollers[d.bundle_key(camera)].remove(session.recipe, hits[0].sha256)
        self._reload_users(session.recipe)
        out = result.to_json()
        return {
            "action": "remove",
            "camera": camera,
            "removed": hits[0].name,
            "pending": False,
            **{k: out[k] for k in ("recipe", "live", "k", "defects", "bank_version", "head", "expectation")},
        }

    def _reload_users(self, recipe: str) -> None:
        """Cameras inspecting with ``recipe`` pick up its new bank, head and threshold."""
        d = self.daemon
        for camera, name in list(d.recipe_names.items()):
            if name == recipe:
                # Not live any more: load_recipe leaves the camera answering ERROR and says why.
                with contextlib.suppress(RecipeError):
                    d.load_recipe(camera, name)
        if d.link is not None:
            d.link.publish_status()

    def _finish(self, camera: str, session: EnrollSession, data: dict[str, Any]) -> dict[str, Any]:
        """Enroll the golden frames, then the labelled defects (training the head), and go live."""
        d = self.daemon
        accept = field(data, "accept_flagged", bool, required=False) or False
        switch = field(data, "switch", bool, required=False)
        with self._sessions_lock:
            if self.sessions.get(camera) is not session:
                raise CommandError(f"the enrollment on {camera} was cancelled; nothing to finish")
            session.finishing = True
        enroller = d.enrollers[d.bundle_key(camera)]
        golden_added: list[str] = []
        skipped: list[str] = []
        try:
            result = None
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
        finally:
            with self._sessions_lock:
                if self.sessions.get(camera) is session:
                    del self.sessions[camera]
        assert result is not None
        out = {
            "action": "finish",
            "camera": camera,
            **result.to_json(),
            "added": golden_added,
            "defects_added": defects_added,
            "skipped": skipped,
        }
        if result.recipe.live and switch is not False:
            d.load_recipe(camera, session.recipe)
            out["switched"] = True
        if d.link is not None:
            d.link.publish_status()
        return out

    def _cancel(self, camera: str) -> dict[str, Any]:
        """End the camera's enroll session at once (any thread); a camera without one is no error."""
        with self._sessions_lock:
            session = self.sessions.get(camera)
            if session is not None and session.finishing:
                raise CommandError(
                    f"the enrollment into '{session.recipe}' on {camera} is being finished; too late to cancel"
                )
            if session is not None:
                del self.sessions[camera]
            self._expired.pop(camera, None)
        if session is None:
            return {
                "action": "cancel",
                "camera": camera,
                "recipe": None,
                "discarded": 0,
                "discarded_defects": 0,
                "was_open": False,
            }
        return {
            "action": "cancel",
            "camera": camera,
            "recipe": session.recipe,
            "discarded": len(session.frames) + len(session.defects),
            "discarded_defects": len(session.defects),
            "was_open": True,
        }

    def _expire_sessions(self) -> None:
        """Drop enroll sessions idle past the timeout: their frames must not be held for ever."""
        now = time.monotonic()
        with self._sessions_lock:
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

    def _cmd_recipe(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any]:
        action = field(data, "action", str)
        d = self.daemon
        if action == "list":
            recipes = []
            for name in d.store.names():
                try:
                    r = d.store.load(name)
                    recipes.append({"name": name, "live": r.live, "k": len(r.samples), "bank_version": r.bank_version})
                except RecipeError as exc:
                    recipes.append({"name": name, "live": False, "error": str(exc)})
            return {"action": "list", "recipes": recipes, "cameras": dict(d.recipe_names)}
        if action == "show":
            name = self._recipe_name(data)
            if not d.store.exists(name):
                raise CommandError(f"unknown recipe '{name}'; recipes: {', '.join(d.store.names()) or 'none'}")
            r = d.store.load(name).to_json()
            r["samples"] = [{"name": s["name"], "score": s["score"], "flagged": s["flagged"]} for s in r["samples"]]
            return {"action": "show", "recipe": r}
        if action == "switch":
            camera = self._camera(data)
            name = self._recipe_name(data)
            try:
                previous = d.switch_recipe(camera, name)
            except RecipeError as exc:
                raise CommandError(str(exc)) from None
            return {"action": "switch", "camera": camera, "recipe": name, "previous": previous}
        raise CommandError(f"action must be one of {', '.join(RECIPE_ACTIONS)}, got '{action}'")

    def _cmd_ask(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any] | None:
        camera = self._camera(data)
        question = field(data, "question", str, required=False) or "Is there any anomaly in the image?"
        d = self.daemon
        if d.explanations is None:
            raise CommandError("no LLM: set llm.enabled: true in the config to ask questions")
        last = d.last.get(camera)
        if last is None:
            raise CommandError(f"camera {camera} has no verdict yet to ask about")
        from anomalygpt_edge.runtime.explain.explainer import ExplainRequest

        vid, verdict = last
        req = ExplainRequest(verdict, question[:500], key=f"ask{next(self._ask_ids)}:{camera}", verdict_id=vid)
        self.ask_targets[id(req)] = cmd
        self._ask_started[id(req)] = time.monotonic()
        d.explanations.submit(req)
        return None  # answered by the explanation worker when the text is ready

    def _expire_asks(self) -> None:
        """An ask whose request the explanation worker dropped (busy, stale) still gets a reply."""
        worker = self.daemon.explanations
        limit = (worker.max_age_s if worker is not None else 10.0) + 60.0
        now = time.monotonic()
        for key, started in list(self._ask_started.items()):
            cmd = self.ask_targets.get(key)
            if cmd is None:
                self._ask_started.pop(key, None)
            elif now - started > limit and self.ask_targets.pop(key, None) is not None:
                self._ask_started.pop(key, None)
                self.fail(cmd, {}, "no answer: the LLM was busy and the question was dropped; ask again")


def _mask_rects(value: Any) -> list[tuple[int, int, int, int]] | None:
    """The ``mask`` field of ``add_defect``: None, or 1..MAX_MASK_RECTS rectangles [x, y, w, h]."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise CommandError("field 'mask' must be a non-empty list of rectangles [x, y, w, h] in camera pixels")
    if len(value) > MAX_MASK_RECTS:
        raise CommandError(f"field 'mask' has {len(value)} rectangles; at most {MAX_MASK_RECTS}")
    rects = []
    for i, r in enumerate(value):
        ok = isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
        if not ok or r[0] < 0 or r[1] < 0 or r[2] <= 0 or r[3] <= 0:
            raise CommandError(
                f"field 'mask' rectangle {i} must be [x, y, w, h] whole camera pixels, x, y >= 0, w, h > 0; "
                f"got {json.dumps(r)[:60]}"
            )
        rects.append((r[0], r[1], r[2], r[3]))
    return rects


def _rasterise(rects: list[tuple[int, int, int, int]], shape: tuple[int, int]) -> np.ndarray:
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
