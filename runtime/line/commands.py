"""MQTT commands: ``cmd/trigger``, ``cmd/enroll``, ``cmd/recipe``, ``cmd/ask``, ``cmd/label`` (contract
in MQTT.md).

Every command gets exactly one reply (except a successful trigger, whose reply is its verdict):
malformed JSON, wrong types, unknown cameras or recipes and oversized payloads are answered with
``ok: false`` and an ``error`` saying what is wrong, and the daemon carries on. Size, JSON shape
and authorisation are checked by the command gate (``command_gate.py``); the bodies by their
pydantic models (``command_bodies.py``). Triggers and enroll ``cancel`` are handled on paho's
thread (they only queue work or drop a session, so a cancel is never stuck behind slow commands);
everything slow runs on the ``commands`` thread, except a recipe ``propose``: it is computed on the
proposal desk's ``proposals`` thread (``proposals.py``) and answered from there when it is done.
Enroll sessions are kept by ``enroll_desk.py``; asks awaiting their explanation by ``asks.py``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from anomalygpt_edge.engines.preprocess import ImageError, set_max_image_pixels
from anomalygpt_edge.runtime.cameras.base import Camera
from anomalygpt_edge.runtime.delivery.archive_labels import LabelWriteError, UnknownVerdict
from anomalygpt_edge.runtime.delivery.messages import reply
from anomalygpt_edge.runtime.delivery.mqtt_link import COMMANDS, Command
from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.line.asks import AskBook
from anomalygpt_edge.runtime.line.command_bodies import (
    ENROLL_ACTIONS,
    MAX_MASK_RECTS,
    RECIPE_ACTIONS,
    AskBody,
    CommandError,
    EnrollBody,
    LabelBody,
    RecipeApply,
    RecipePropose,
    RecipeRollback,
    RecipeShow,
    RecipeSwitch,
    RecipeVersions,
    TriggerBody,
    enroll_body,
    parse_body,
    recipe_body,
)
from anomalygpt_edge.runtime.line.command_gate import CommandGate, CommandPolicy, Rejection
from anomalygpt_edge.runtime.line.enroll_desk import MAX_ENROLL_FRAMES, EnrollDesk, EnrollSession
from anomalygpt_edge.runtime.line.link import Link
from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
from anomalygpt_edge.runtime.recipes.store import RecipeError

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.config import DaemonConfig

__all__ = [
    "ENROLL_ACTIONS",
    "MAX_ENROLL_FRAMES",
    "MAX_MASK_RECTS",
    "RECIPE_ACTIONS",
    "CommandCenter",
    "CommandError",
    "EnrollSession",
]
log = logging.getLogger(__name__)
DEFAULT_QUESTION = "Is there any anomaly in the image?"
#: Questions are cut to this many characters: the model's context is small.
MAX_QUESTION_CHARS = 500

#: The command gate's rejections in this module's reply wording.
_GATE_ERRORS = {
    "payload_too_large": "payload too large: {}",
    "malformed_json": "malformed JSON: {}",
    "too_deep": "malformed JSON: {}",
    "bad_payload": "malformed JSON: {}",
    "unauthorized": "not authorized: {}",
}


def _gate(config: DaemonConfig) -> CommandGate:
    """The command gate for this daemon's topics, payload limit and commands section."""
    from anomalygpt_edge.runtime.line.config import MqttConfig

    mqtt = config.mqtt or MqttConfig()  # no mqtt section: the defaults, as the link uses them
    ids = config.commands.allowed_client_ids
    policy = CommandPolicy(
        prefix=mqtt.prefix,
        device=config.device_id,
        max_payload_bytes=mqtt.max_payload_bytes,
        privileged=frozenset(config.commands.privileged),
        allowed_client_ids=frozenset(ids) if ids is not None else None,
        token=config.commands.token,
        allow_anonymous=config.commands.allow_anonymous_control,
    )
    return CommandGate(policy)


def _correlation(cmd: Command, data: dict[str, Any]) -> str | None:
    """The reply's ``correlation_id``: the body's when it is a string, else the command's correlation data."""
    corr = data.get("correlation_id")
    return corr if isinstance(corr, str) else cmd.correlation_text


def _sender(cmd: Command, data: dict[str, Any]) -> str | None:
    """The client id the command came from (MQTT 5 user property, else body field), for the audit."""
    sender = getattr(cmd, "sender", None) or dict(cmd.user_properties or []).get("client_id") or data.get("client_id")
    return sender[:64] if isinstance(sender, str) else None


class CommandCenter:
    """Checks and carries out commands; gets what it acts on as constructor arguments.

    ``trigger(camera, part_id, command, correlation)`` queues a triggered part; ``link()``,
    ``explanations()`` and ``last_verdict(camera)`` read the daemon's current link, explanation
    worker and the camera's last ``(verdict id, verdict)``; ``archive()`` the open archive (labels).
    """

    def __init__(
        self,
        config: DaemonConfig,
        slots: RecipeSlots,
        cameras: Mapping[str, Camera],
        *,
        trigger: Callable[[str, str | None, Command, str | None], Any],
        link: Callable[[], Link | None],
        explanations: Callable[[], Any],
        last_verdict: Callable[[str], tuple[str, Verdict] | None],
        asks: AskBook,
        archive: Callable[[], Any] = lambda: None,
        proposals: Any = None,
    ):
        self.config = config
        self.slots = slots
        self.cameras = cameras
        self._trigger_part = trigger
        self._link = link
        self._explanations = explanations
        self._last_verdict = last_verdict
        self._archive = archive
        self.proposals = proposals  # ProposalDesk (runtime/line/proposals.py): propose / apply / discard
        self.asks = asks
        self.desk = EnrollDesk(slots, cameras, config.commands.enroll_session_timeout_s)
        self.session_timeout_s = self.desk.session_timeout_s
        # The daemon's images are read by preprocess.read_image (cameras, folder watch): the
        # configured pixel limit applies to all of them from here on.
        set_max_image_pixels(config.limits.max_image_pixels)
        self.errors = 0
        self.gate = _gate(config)
        self._queue: queue.Queue[tuple[Command, dict[str, Any]] | None] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None

    @property
    def sessions(self) -> dict[str, EnrollSession]:
        """Open enroll sessions by camera."""
        return self.desk.sessions

    @property
    def sessions_expired(self) -> int:
        """Enroll sessions dropped for being idle too long."""
        return self.desk.sessions_expired

    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None) -> None:
        """Start the ``commands`` thread: plain, or through ``spawn`` (the daemon's last-resort handler,
        which records an exception the loop did not expect and runs the loop again)."""
        if spawn is not None:
            self._thread = spawn("commands", self._run)
        else:
            self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the ``commands`` thread after the command in progress."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(5.0)

    # -- entry point (paho's network thread) -----------------------------------------------------
    def receive(self, cmd: Command) -> None:
        """One command from the link: answered here (trigger, cancel) or queued for the commands thread."""
        data: dict[str, Any] = {}
        try:
            data = self._parse(cmd)
            if cmd.name == "trigger":
                self._trigger(cmd, data)
                return
            if cmd.name == "enroll" and data.get("action") == "cancel":
                body = parse_body(EnrollBody, data)
                self._send(cmd, data, True, **self.desk.cancel(self._camera(body.camera)))
                return
            try:
                self._queue.put_nowait((cmd, data))
            except queue.Full:
                raise CommandError("busy: too many commands waiting; retry") from None
        except CommandError as exc:
            self.fail(cmd, data, str(exc))
        except Exception as exc:  # every command gets its one reply, whatever went wrong here
            log.exception("command %s failed", cmd.name)
            self.fail(cmd, data, f"internal error: {type(exc).__name__}: {exc}")

    def fail(self, cmd: Command, data: dict[str, Any], error: str) -> None:
        """Refuse ``cmd`` with ``error`` (counted in :attr:`errors`)."""
        self.errors += 1
        log.warning("command %s refused: %s", cmd.name, error)
        self._send(cmd, data, False, error=error)

    def _send(self, cmd: Command, data: dict[str, Any], ok: bool, **fields: Any) -> None:
        link = self._link()
        if isinstance(data.get("request_id"), str):
            fields.setdefault("request_id", data["request_id"][:128])
        if link is not None:
            link.reply(cmd, reply(cmd.name, ok, _correlation(cmd, data), **fields))

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
        cmd.sender = checked.client_id
        return checked.body

    def _camera(self, camera: str) -> str:
        if camera not in self.config.cameras:
            known = ", ".join(self.config.cameras)
            raise CommandError(f"unknown camera '{camera}'; cameras: {known}")
        return camera

    # -- trigger ---------------------------------------------------------------------------------
    def _trigger(self, cmd: Command, data: dict[str, Any]) -> None:
        body = parse_body(TriggerBody, data)
        camera = self._camera(body.camera)
        binding = self.slots.binding(camera)
        if binding is not None and binding.trigger == "folder_watch":
            raise CommandError(f"camera '{camera}' is a watched folder: its parts are new files, not triggers")
        part = None if body.part_id is None else str(body.part_id)
        self._trigger_part(camera, part, cmd, _correlation(cmd, data))

    # -- slow commands (the ``commands`` thread) -------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._expire_asks()
                self._expire_sessions()
                self._learn()
                continue
            if item is None:
                return
            self._carry_out(*item)

    def _carry_out(self, cmd: Command, data: dict[str, Any]) -> None:
        try:
            result = getattr(self, f"_cmd_{cmd.name}")(cmd, data)
            if result is not None:
                self._send(cmd, data, True, **result)
            if cmd.name == "label":  # after its reply: an auto-apply it makes due takes seconds
                self._learn()
        except (CommandError, RecipeError, ImageError, ValueError, OSError) as exc:
            self.fail(cmd, data, str(exc))
        except Exception as exc:  # the daemon keeps running whatever a command does
            log.exception("command %s failed", cmd.name)
            self.fail(cmd, data, f"internal error: {type(exc).__name__}: {exc}")

    def _cmd_enroll(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any]:
        body = enroll_body(data)
        self._camera(body.camera)
        self._expire_sessions()
        return self.desk.handle(body)

    def _expire_sessions(self) -> None:
        """Drop enroll sessions idle past the timeout (called whenever the commands loop is idle)."""
        self.desk.expire()

    def _cmd_recipe(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any] | None:
        body = recipe_body(data)
        store = self.slots.store
        if isinstance(body, RecipeShow):
            if not store.exists(body.recipe):
                raise CommandError(f"unknown recipe '{body.recipe}'; recipes: {', '.join(store.names()) or 'none'}")
            r = store.load(body.recipe).to_json()
            r["samples"] = [{"name": s["name"], "score": s["score"], "flagged": s["flagged"]} for s in r["samples"]]
            return {"action": "show", "recipe": r}
        if isinstance(body, RecipeSwitch):
            camera = self._camera(body.camera)
            try:
                previous = self.slots.switch_recipe(camera, body.recipe)
            except RecipeError as exc:
                raise CommandError(str(exc)) from None
            return {"action": "switch", "camera": camera, "recipe": body.recipe, "previous": previous}
        if isinstance(body, RecipeVersions | RecipeRollback):
            return self._recipe_versions(cmd, data, body)
        if isinstance(body, RecipePropose | RecipeApply):
            return self._recipe_proposal(cmd, data, body)
        return {"action": "list", "recipes": self._recipe_list(), "cameras": dict(self.slots.recipe_names)}

    def _recipe_versions(
        self, cmd: Command, data: dict[str, Any], body: RecipeVersions | RecipeRollback
    ) -> dict[str, Any]:
        """``versions`` lists the recipe's live and kept versions; ``rollback`` makes one live (RecipeSlots)."""
        try:
            if isinstance(body, RecipeVersions):
                return {"action": "versions", "recipe": body.recipe, "versions": self.slots.store.versions(body.recipe)}
            change = self.slots.rollback(body.recipe, body.version, _sender(cmd, data))
        except RecipeError as exc:
            raise CommandError(str(exc)) from None
        return {
            "action": "rollback",
            "recipe": body.recipe,
            "bank_version": change["to"],
            "previous": change["from"],
        } | {k: change[k] for k in ("threshold", "cameras")}

    def _recipe_proposal(
        self, cmd: Command, data: dict[str, Any], body: RecipePropose | RecipeApply
    ) -> dict[str, Any] | None:
        """``propose`` / ``apply`` / ``discard`` / ``pending`` of the recipe's proposal from labels
        (runtime/line/proposals.py); a propose is answered from the ``proposals`` thread when computed."""
        desk, by = self.proposals, _sender(cmd, data)
        if desk is None:
            raise CommandError("proposals need the line daemon's archive and engines")
        try:
            if isinstance(body, RecipeApply):
                change = desk.apply(body.recipe, by, body.reason, body.expect_base_version)
                return {"action": "apply", "bank_version": change["to"], "previous": change["from"]} | {
                    k: change[k] for k in ("recipe", "threshold", "cameras", "add_goldens", "add_defects")
                }
            if body.action == "discard":
                desk.discard(body.recipe, by)
                return {"action": "discard", "recipe": body.recipe}
            if body.action == "pending":
                held = desk.pending(body.recipe)
                if held is None:
                    raise CommandError(f"no pending proposal for {body.recipe}")
                return {"action": "pending", "recipe": body.recipe, "proposal": held.to_json()}
            desk.submit(body.recipe, by, lambda p, exc: self._proposed(cmd, data, body.recipe, p, exc))
            return None
        except RecipeError as exc:
            raise CommandError(str(exc)) from None

    def _proposed(self, cmd: Command, data: dict[str, Any], recipe: str, proposal: Any, exc: Exception | None) -> None:
        """The reply to a ``propose`` (on the ``proposals`` thread, when it is computed)."""
        if exc is None:
            self._send(cmd, data, True, action="propose", recipe=recipe, proposal=proposal.to_json())
        elif isinstance(exc, RecipeError | ImageError | ValueError | OSError):
            self.fail(cmd, data, str(exc))
        else:
            self.fail(cmd, data, f"internal error: {type(exc).__name__}: {exc}")

    def _learn(self) -> None:
        """Queue auto-apply where the ``learn:`` policy says it is due (never raises into the commands loop)."""
        if self.proposals is not None:
            try:
                self.proposals.tick()
            except Exception:
                log.exception("automatic proposal failed")

    def _recipe_list(self) -> list[dict[str, Any]]:
        store = self.slots.store
        recipes: list[dict[str, Any]] = []
        for name in store.names():
            try:
                r = store.load(name)
                recipes.append({"name": name, "live": r.live, "k": len(r.samples), "bank_version": r.bank_version})
            except RecipeError as exc:
                recipes.append({"name": name, "live": False, "error": str(exc)})
        return recipes

    # -- label -----------------------------------------------------------------------------------
    def _cmd_label(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any]:
        """A label on an archived verdict; the author is the client id the gate accepted it from."""
        body = parse_body(LabelBody, data)
        archive = self._archive()
        if archive is None:
            raise CommandError("no archive: labels are stored in the archive (storage.archive: true)")
        author = cmd.sender or "anonymous mqtt client"
        try:
            row = archive.add_label(
                body.id, body.label, author=author, source="mqtt", defect_type=body.defect_type, note=body.note
            )
        except UnknownVerdict as exc:
            raise CommandError(str(exc)) from None
        except LabelWriteError as exc:
            raise CommandError(str(exc)) from None
        if self.proposals is not None:  # the drift watch's labelled rates, and auto-apply's count
            self.proposals.on_label(row.verdict_id, row.at)
        out = row.to_json()
        out["id"] = out.pop("verdict_id")
        out["image"] = archive.verdict_image(row.verdict_id) is not None  # an unkept OK image cannot come back
        return out

    # -- ask -------------------------------------------------------------------------------------
    def _cmd_ask(self, cmd: Command, data: dict[str, Any]) -> dict[str, Any] | None:
        body = parse_body(AskBody, data)
        camera = self._camera(body.camera)
        question = body.question or DEFAULT_QUESTION
        worker = self._explanations()
        if worker is None:
            raise CommandError("no LLM: set llm.enabled: true in the config to ask questions")
        last = self._last_verdict(camera)
        if last is None:
            raise CommandError(f"camera {camera} has no verdict yet to ask about")
        vid, verdict = last
        worker.submit(self.asks.open(cmd, camera, vid, verdict, question[:MAX_QUESTION_CHARS]))
        return None  # answered by the explanation worker when the text is ready

    def _expire_asks(self) -> None:
        """An ask whose request the explanation worker dropped (busy, stale) still gets a reply."""
        worker = self._explanations()
        max_age_s = worker.max_age_s if worker is not None else 10.0
        for ask in self.asks.expire(max_age_s):
            self.fail(ask.command, {}, "no answer: the LLM was busy and the question was dropped; ask again")
