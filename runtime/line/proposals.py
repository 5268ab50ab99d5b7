"""Proposals on the line (issue 14, part 3): from the archive's labels to a recipe change a technician
applies or discards, one pending proposal per recipe.

:class:`ProposalDesk` is the daemon's ``proposals``. It gathers a recipe's labelled verdicts from
the archive (:func:`gather`: each archived image read under the pixel limit; a label whose image
was never kept, or is gone, is counted and said in the proposal's notes, never guessed), computes
:func:`~anomalygpt_edge.runtime.recipes.proposal.propose` with the enroller of the recipe's bundle
and keeps the result, crash-safely, as ``<store>/<recipe>/proposal.json`` with the labels it was
computed from, so a restart still shows it. :meth:`ProposalDesk.apply` is one store commit (a new
bank version; the old one is kept for a rollback), then the cameras on the recipe reload it and the
change is listed in the status's ``recipe_changes`` as a rollback is. A proposal is **stale** when
the live bank version is no longer the one it was computed on, or a label it used changed since:
its apply is refused with one line saying so.

Computation runs on the desk's own ``proposals`` thread (:meth:`start`, :meth:`submit`), never on
the ``commands`` thread, so enroll, switch, rollback and ask are not held up by a proposal (seconds
on a real recipe). At most one computation per recipe is pending or running: a second ``propose``
(or an ``apply`` / ``discard``) of a recipe being computed is refused at once with
``a proposal for <recipe> is being computed`` (:data:`BUSY`); other recipes are not held up.

Auto-apply (``learn:`` config, :class:`LearnPolicy`, off by default): after every ``every_labels``
new labels of a recipe the desk proposes on the ``proposals`` thread (:meth:`tick`, never the
inspection path) and applies only within the bounds, audited as ``by: auto`` with the bounds as
reason and announced (``recipe_changes`` + a notice in the status's ``proposals``); out of bounds
the proposal stays pending with the reason.

Every accepted label also reaches the drift watch (:meth:`on_label`), so the status shows the
labelled false-reject and escape rates.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from anomalygpt_edge.engines.preprocess import ImageError
from anomalygpt_edge.runtime.line.learn_config import LearnPolicy
from anomalygpt_edge.runtime.line.proposal_parts import (
    Gathered,
    Pending,
    apply_pending,
    drop_pending,
    gather,
    load_pending,
    save_pending,
    staleness,
)
from anomalygpt_edge.runtime.recipes.proposal import Proposal, propose
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore, now_iso

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller

log = logging.getLogger(__name__)

#: Notices (auto-applies, held proposals) the status lists, newest last.
MAX_NOTICES = 8
#: The author of an automatic change.
AUTO = "auto"
#: The refusal while the recipe's proposal is computed (a second propose, an apply, a discard).
BUSY = "a proposal for {} is being computed"
#: What the ``proposals`` thread runs: (recipe, author, reply), or None to stop.
_Job = tuple[str, str | None, Callable[[Proposal | None, Exception | None], None]]


class ProposalDesk:
    """One pending proposal per recipe; propose, apply, discard; auto-apply within bounds.

    ``archive()`` is the daemon's open archive (None: none), ``drift`` its drift watches (labels are
    passed on), ``policies`` the ``learn:`` section, ``max_pixels`` the image limit.
    """

    def __init__(
        self,
        slots: Any,
        archive: Callable[[], Any],
        *,
        drift: Any = None,
        policies: dict[str, LearnPolicy] | None = None,
        max_pixels: int | None = None,
    ):
        self.slots = slots
        self._archive = archive
        self.drift = drift
        self.policies = dict(policies or {})
        self.max_pixels = max_pixels
        # _work[recipe]: the recipe's proposal computed or applied one at a time (seconds), other recipes
        # not held up; _lock: the state below, held only briefly, so the heartbeat's status never waits.
        self._work: dict[str, threading.RLock] = {}
        self._lock = threading.Lock()
        self._computing: set[str] = set()  # recipes queued on or computed by the proposals thread
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None
        self._pending: dict[str, Pending] = {}
        self._new_labels: Counter[str] = Counter()
        self.notices: deque[dict[str, Any]] = deque(maxlen=MAX_NOTICES)
        self.applied = 0
        for name in self.store.names():
            saved = load_pending(self.store, name)
            if saved is not None:
                self._pending[name] = saved

    @property
    def store(self) -> RecipeStore:
        store: RecipeStore = self.slots.store
        return store

    # -- the proposals thread --------------------------------------------------------------------
    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None) -> None:
        """Start the ``proposals`` thread (through ``spawn``: the daemon's supervisor)."""
        if spawn is not None:
            self._thread = spawn("proposals", self._run)
        else:
            self._thread = threading.Thread(target=self._run, name="proposals", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the ``proposals`` thread after the computation in progress."""
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        if self._thread is not None:
            self._thread.join(5.0)

    def submit(self, recipe: str, by: str | None, done: Callable[[Proposal | None, Exception | None], None]) -> None:
        """Queue the recipe's proposal for the ``proposals`` thread; ``done(proposal, error)`` when it is
        computed. Refused at once (RecipeError, :data:`BUSY`) while that recipe is already computing."""
        self._reserve(recipe)
        try:
            self._jobs.put_nowait((recipe, by, done))
        except queue.Full:
            self._release(recipe)
            raise RecipeError("busy: too many proposals waiting; retry") from None

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                self.tick()
                continue
            if job is None:
                return
            recipe, by, done = job
            result: tuple[Proposal | None, Exception | None] = (None, None)
            try:
                if by == AUTO and recipe in self.policies:
                    self._auto(recipe, self.policies[recipe])
                else:
                    result = (self._compute(recipe, by), None)
            except Exception as exc:  # every propose gets its reply, whatever went wrong
                if not isinstance(exc, RecipeError | ImageError | ValueError | OSError):
                    log.exception("recipe %s: proposal failed", recipe)
                result = (None, exc)
            finally:
                self._release(recipe)
            try:
                done(*result)
            except Exception:  # a reply that cannot be sent never ends the thread
                log.exception("recipe %s: proposal reply failed", recipe)

    def _reserve(self, recipe: str) -> None:
        with self._lock:
            if recipe in self._computing:
                raise RecipeError(BUSY.format(recipe))
            self._computing.add(recipe)

    def _release(self, recipe: str) -> None:
        with self._lock:
            self._computing.discard(recipe)

    def _busy(self, recipe: str) -> None:
        with self._lock:
            if recipe in self._computing:
                raise RecipeError(BUSY.format(recipe))

    def _recipe_work(self, recipe: str) -> threading.RLock:
        with self._lock:
            return self._work.setdefault(recipe, threading.RLock())

    # -- the station's API -------------------------------------------------------------------------
    def propose(self, recipe: str, by: str | None) -> Proposal:
        """Compute (and keep, replacing the pending one) the proposal for ``recipe`` from its labels, here
        (the station, the CLI); refused at once while the ``proposals`` thread computes that recipe."""
        self._reserve(recipe)
        try:
            return self._compute(recipe, by)
        finally:
            self._release(recipe)

    def _compute(self, recipe: str, by: str | None) -> Proposal:
        with self._recipe_work(recipe):
            enroller = self._enroller(recipe)
            gathered = self._gather(recipe)
            if not gathered.parts:
                raise RecipeError(
                    f"recipe {recipe}: no labelled verdict with a kept image to learn from "
                    f"({gathered.total} labelled, {gathered.no_image} without image, "
                    f"{len(gathered.unreadable)} unreadable)"
                )
            proposal = propose(enroller, recipe, gathered.parts)
            proposal.notes += gathered.notes()
            pending = Pending(proposal, gathered.labels, by or "anonymous", now_iso())
            save_pending(self.store, pending)
            with self._lock:
                self._pending[recipe] = pending
            log.info("recipe %s: proposal by %s from %d labelled parts", recipe, by, len(gathered.parts))
            return proposal

    def pending(self, recipe: str) -> Proposal | None:
        """The recipe's pending proposal (None: none)."""
        with self._lock:
            held = self._pending.get(recipe)
            return held.proposal if held is not None else None

    def apply(self, recipe: str, by: str | None, reason: str | None = None, expect_base: int | None = None) -> dict:
        """Apply the pending proposal: one store commit, the cameras on it reload, the change is announced."""
        if by != AUTO:  # auto-apply runs inside its own computation
            self._busy(recipe)
        with self._recipe_work(recipe):
            with self._lock:
                held = self._pending.get(recipe)
            if held is None:
                raise RecipeError(f"recipe {recipe}: no pending proposal; propose first")
            p = held.proposal
            if expect_base is not None and expect_base != p.base_bank_version:
                raise RecipeError(
                    f"the pending proposal for recipe {recipe} is on bank version {p.base_bank_version}, "
                    f"not {expect_base}; look at it again before applying"
                )
            why = reason or f"proposal from {len(held.labels)} labels ({len(p.add_goldens)} goldens added)"
            committed = apply_pending(self._enroller(recipe), held, self._gather(recipe), by or "anonymous", why)
            drop_pending(self.store, recipe)
            with self._lock:
                self._pending.pop(recipe, None)
                self.applied += 1
            return self._announce(recipe, p, committed, by, why)

    def discard(self, recipe: str, by: str | None) -> None:
        """Drop the recipe's pending proposal (RecipeError when there is none)."""
        self._busy(recipe)
        with self._recipe_work(recipe):
            with self._lock:
                dropped = self._pending.pop(recipe, None)
            if dropped is None:
                raise RecipeError(f"recipe {recipe}: no pending proposal to discard")
            drop_pending(self.store, recipe)
        log.info("recipe %s: proposal discarded by %s", recipe, by)

    # -- labels and auto-apply -------------------------------------------------------------------
    def on_label(self, verdict_id: str, at: float) -> None:
        """An accepted label: to the drift watch, and counted towards the recipe's auto-apply."""
        archive = self._archive()
        if archive is None:
            return
        try:
            row = next((r for r in archive.labelled(since=at) if r.verdict_id == verdict_id), None)
            if row is None:
                return
            if self.drift is not None:
                self.drift.on_label(row.camera, row.label, row.verdict, at)
            with self._lock:
                self._new_labels[row.recipe] += 1
        except Exception:  # a label is stored already: its follow-ups never fail it
            log.exception("label %s: drift / proposal follow-up failed", verdict_id)

    def tick(self) -> None:
        """Auto-apply where due (the ``proposals`` thread calls this when idle; the ``commands`` thread
        after each label, which only queues it)."""
        for recipe, policy in self.policies.items():
            with self._lock:
                due = policy.auto_apply and self._new_labels[recipe] >= policy.every_labels
                due = due and recipe not in self._computing  # due again once that computation is done
                if due:
                    self._new_labels[recipe] = 0
            if not due:
                continue
            with contextlib.suppress(RecipeError):  # busy meanwhile, or the queue full: due again later
                if self._thread is None:  # no proposals thread (tools, tests): here
                    self._reserve(recipe)
                    try:
                        self._auto(recipe, policy)
                    finally:
                        self._release(recipe)
                else:
                    self.submit(recipe, AUTO, lambda _p, _e: None)

    def _auto(self, recipe: str, policy: LearnPolicy) -> None:
        with self._recipe_work(recipe):
            proposal = None
            try:
                proposal = self._compute(recipe, AUTO)
                held = out_of_bounds(proposal, policy, len(self._pending[recipe].labels))
                if held is None:
                    reason = (
                        f"auto-apply within bounds (min_labels {policy.min_labels}, max_new_goldens "
                        f"{policy.max_new_goldens}, max_threshold_change {policy.max_threshold_change:g})"
                    )
                    self.apply(recipe, AUTO, reason)  # announced with its notice (_announce)
                    return
            except (RecipeError, ImageError, ValueError, OSError) as exc:
                held = str(exc)
            with self._lock:
                pending = self._pending.get(recipe)
            if proposal is not None and pending is not None and pending.proposal is proposal:
                pending.held = held  # kept for the technician, with the reason
                save_pending(self.store, pending)
            self._notice(recipe, f"recipe {recipe}: proposal not applied automatically: {held}")
        self.slots.changed()

    def _notice(self, recipe: str, text: str) -> None:
        log.warning("%s", text)
        with self._lock:
            self.notices.append({"recipe": recipe, "message": text, "at": now_iso()})

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The status's ``proposals``: pending ones in short, notices, counts."""
        with self._lock:
            pending, notices, applied = dict(self._pending), list(self.notices), self.applied
            computing = sorted(self._computing)
        out: dict[str, Any] = {}
        for name, held in sorted(pending.items()):
            p = held.proposal
            with contextlib.suppress(RecipeError, OSError):
                stale = staleness(self.store, held) is not None
                out[name] = {
                    "base_bank_version": p.base_bank_version,
                    "stale": stale,
                    "labels": len(held.labels),
                    "add_goldens": len(p.add_goldens),
                    "refused_goldens": len(p.refused_goldens),
                    "add_defects": len(p.add_defects),
                    "threshold_before": p.threshold_before,
                    "threshold_after": p.threshold_after,
                    "by": held.by,
                    "at": held.at,
                    "held": held.held,
                    "notes": p.notes,
                }
        return {"pending": out, "computing": computing, "applied": applied, "notices": notices}

    # -- helpers ---------------------------------------------------------------------------------
    def _gather(self, recipe: str) -> Gathered:
        archive = self._archive()
        if archive is None:
            raise RecipeError("no archive: proposals learn from labelled verdicts in the archive (storage.archive)")
        return gather(archive, recipe, self.max_pixels, self._other_roi(recipe))

    def _other_roi(self, recipe: str) -> Callable[[str], bool]:
        """True for a camera whose config ROI overrides the recipe's with another one."""
        roi = self.store.load(recipe).roi
        binding = getattr(self.slots, "binding", lambda _camera: None)

        def other(camera: str) -> bool:
            b = binding(camera)
            return b is not None and b.roi is not None and tuple(b.roi) != (tuple(roi) if roi else None)

        return other

    def _enroller(self, recipe: str) -> Enroller:
        """The enroller of the bundle the recipe was enrolled with (a camera's on it first)."""
        if not self.store.exists(recipe):
            raise RecipeError(f"unknown recipe '{recipe}'; recipes: {', '.join(self.store.names()) or 'none'}")
        sha = self.store.load(recipe).bundle_sha256
        for camera, name in list(self.slots.recipe_names.items()):
            if name == recipe and self.slots.bundle_sha256(camera) == sha:
                enroller: Enroller = self.slots.enroller(camera)
                return enroller
        for enroller in self.slots.enrollers.values():
            if enroller.bundle.sha256 == sha:
                return enroller
        raise RecipeError(f"recipe {recipe} was enrolled with bundle {sha[:12]}, which no camera of this daemon opens")

    def _announce(self, recipe: str, p: Proposal, committed: Any, by: str | None, reason: str) -> dict[str, Any]:
        cameras = sorted(c for c, name in list(self.slots.recipe_names.items()) if name == recipe)
        change = {
            "recipe": recipe,
            "action": "apply",
            "from": p.base_bank_version,
            "to": committed.bank_version,
            "threshold": committed.threshold.value if committed.threshold else None,
            "cameras": cameras,
            "by": by,
            "reason": reason,
            "add_goldens": len(p.add_goldens),
            "add_defects": len(p.add_defects),
            "at": now_iso(),
        }
        with self.slots.lock:
            self.slots.changes.append(change)
        if by == AUTO:
            done = f"v{change['from']} -> v{change['to']}, threshold {change['threshold']:.4g}"
            self._notice(recipe, f"recipe {recipe}: applied automatically ({done}): {reason}")
        log.warning("recipe %s: proposal applied by %s, v%d -> v%d", recipe, by, change["from"], change["to"])
        self.slots.reload_users(recipe)  # reloads each camera on it, then republishes the status
        return change


def out_of_bounds(p: Proposal, policy: LearnPolicy, labels: int) -> str | None:
    """Why an automatic apply of ``p`` is held back (None: it is within ``policy``'s bounds)."""
    if labels < policy.min_labels:
        return f"{labels} labelled parts with images, min_labels is {policy.min_labels}"
    if len(p.add_goldens) > policy.max_new_goldens:
        return f"{len(p.add_goldens)} golden parts to add, max_new_goldens is {policy.max_new_goldens}"
    change = abs(p.threshold_after - p.threshold_before) / max(abs(p.threshold_before), 1e-12)
    if change > policy.max_threshold_change:
        return (
            f"threshold {p.threshold_before:.4g} -> {p.threshold_after:.4g} moves by {100 * change:.0f}%, "
            f"max_threshold_change is {100 * policy.max_threshold_change:g}%"
        )
    if not p.add_goldens and not p.add_defects:
        return "nothing to apply (no goldens or defects to add)"
    return None
