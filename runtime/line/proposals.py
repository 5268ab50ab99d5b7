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

Auto-apply (``learn:`` config, :class:`LearnPolicy`, off by default): after every ``every_labels``
new labels of a recipe the desk proposes on the ``commands`` thread (:meth:`tick`, never the
inspection path) and applies only within the bounds, audited as ``by: auto`` with the bounds as
reason and announced (``recipe_changes`` + a notice in the status's ``proposals``); out of bounds
the proposal stays pending with the reason.

Every accepted label also reaches the drift watch (:meth:`on_label`), so the status shows the
labelled false-reject and escape rates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.engines.preprocess import ImageError, read_image
from anomalygpt_edge.runtime.line.learn_config import LearnPolicy
from anomalygpt_edge.runtime.recipes.proposal import MAX_PARTS, LabelledPart, Proposal, apply, propose
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore, now_iso

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller

log = logging.getLogger(__name__)

PROPOSAL_FILE = "proposal.json"
#: Notices (auto-applies, held proposals) the status lists, newest last.
MAX_NOTICES = 8
#: The author of an automatic change.
AUTO = "auto"


@dataclass
class Gathered:
    """The labelled parts of one recipe read from the archive, and what could not be used."""

    parts: list[LabelledPart] = field(default_factory=list)
    labels: list[list[Any]] = field(default_factory=list)  # [verdict id, label, labelled at] per part
    no_image: int = 0
    not_judged: int = 0
    unreadable: list[str] = field(default_factory=list)
    total: int = 0

    def notes(self) -> list[str]:
        out = []
        if self.no_image:
            out.append(
                f"{self.no_image} labelled verdicts have no kept image (an OK image is kept only at "
                "storage.archive_ok_sample_rate, or it was evicted): they cannot be re-scored and are left out."
            )
        if self.not_judged:
            out.append(f"{self.not_judged} labelled verdicts are ERROR verdicts (no part was judged): left out.")
        if self.unreadable:
            out.append(f"{len(self.unreadable)} archived images could not be read: {'; '.join(self.unreadable[:3])}")
        if self.total > MAX_PARTS:
            out.append(f"{self.total} labelled verdicts: only the newest {MAX_PARTS} are used.")
        return out


def gather(archive: Any, recipe: str, max_pixels: int | None = None) -> Gathered:
    """The recipe's labelled verdicts (newest :data:`MAX_PARTS`) as parts; images are the archived ROI crops."""
    rows = archive.labelled(recipe=recipe)
    out = Gathered(total=len(rows))
    for row in rows[-MAX_PARTS:]:
        if row.verdict not in ("OK", "NG"):  # an ERROR verdict judged no part (its image is no ROI crop)
            out.not_judged += 1
            continue
        if row.image_path is None:
            out.no_image += 1
            continue
        try:
            image = read_image(row.image_path, max_pixels)
        except (ImageError, OSError) as exc:
            out.unreadable.append(str(exc)[:160])
            continue
        out.parts.append(LabelledPart(row.verdict_id, image, row.label, row.defect_type, roi_applied=True))
        out.labels.append([row.verdict_id, row.label, row.at])
    return out


@dataclass
class Pending:
    """A recipe's pending proposal, the labels it was computed from, and why it was not applied (auto)."""

    proposal: Proposal
    labels: list[list[Any]]
    by: str
    at: str
    held: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"proposal": self.proposal.to_json(), "labels": self.labels, "by": self.by, "at": self.at} | (
            {"held": self.held} if self.held else {}
        )

    @classmethod
    def from_json(cls, data: Any) -> Pending:
        if not isinstance(data, dict) or not isinstance(data.get("proposal"), dict):
            raise RecipeError("proposal.json: malformed (no proposal object)")
        labels = data.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, list) and len(x) == 3 for x in labels):
            raise RecipeError("proposal.json: malformed labels")
        return cls(
            Proposal.from_json(data["proposal"]), labels, str(data.get("by")), str(data.get("at")), data.get("held")
        )


def save_pending(store: RecipeStore, pending: Pending) -> None:
    """``<store>/<recipe>/proposal.json``, written atomically (a crash leaves the old file or the new)."""
    path = store.folder(pending.proposal.recipe) / PROPOSAL_FILE
    atomic_write_bytes(path, json.dumps(pending.to_json(), indent=1).encode())


def load_pending(store: RecipeStore, recipe: str) -> Pending | None:
    """The recipe's saved proposal; None when there is none (a damaged file is logged and ignored)."""
    path = store.folder(recipe) / PROPOSAL_FILE
    if not path.is_file():
        return None
    try:
        return Pending.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        log.warning("recipe %s: pending proposal unreadable, ignored: %s", recipe, exc)
        return None


def drop_pending(store: RecipeStore, recipe: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (store.folder(recipe) / PROPOSAL_FILE).unlink()


def staleness(store: RecipeStore, pending: Pending, gathered: Gathered | None = None) -> str | None:
    """Why ``pending`` may not be applied any more (None: it still may)."""
    p = pending.proposal
    live = store.load(p.recipe)
    if live.bank_version != p.base_bank_version:
        return (
            f"the proposal for recipe {p.recipe} is stale: it was computed on bank version {p.base_bank_version}, "
            f"the live one is {live.bank_version}; compute a new proposal"
        )
    if gathered is not None:
        now = {vid: (label, at) for vid, label, at in gathered.labels}
        changed = [vid for vid, label, at in pending.labels if now.get(vid) != (label, at)]
        if changed:
            return (
                f"the proposal for recipe {p.recipe} is stale: {len(changed)} of its labels changed or their "
                f"images are gone since (first {changed[0]}); compute a new proposal"
            )
    return None


def apply_pending(enroller: Enroller, pending: Pending, gathered: Gathered, by: str, reason: str) -> Any:
    """Apply ``pending`` with the parts it was computed from (refused, with the reason, when stale)."""
    stale = staleness(enroller.store, pending, gathered)
    if stale:
        raise RecipeError(stale)
    used = {vid for vid, _, _ in pending.labels}
    parts = [p for p in gathered.parts if p.name in used]
    return apply(enroller, pending.proposal, parts, by=by, reason=reason)


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
        # _work: one proposal computed or applied at a time (seconds); _lock: the state below, held
        # only briefly, so the heartbeat's status never waits for a proposal being computed.
        self._work = threading.RLock()
        self._lock = threading.Lock()
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

    # -- the station's API -------------------------------------------------------------------------
    def propose(self, recipe: str, by: str | None) -> Proposal:
        """Compute (and keep, replacing the pending one) the proposal for ``recipe`` from its labels."""
        with self._work:
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
        with self._work:
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
        with self._work:
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
        """Auto-apply where due (the ``commands`` thread calls this when idle and after each label)."""
        for recipe, policy in self.policies.items():
            with self._lock:
                due = policy.auto_apply and self._new_labels[recipe] >= policy.every_labels
                if due:
                    self._new_labels[recipe] = 0
            if due:
                self._auto(recipe, policy)

    def _auto(self, recipe: str, policy: LearnPolicy) -> None:
        with self._work:
            proposal = None
            try:
                proposal = self.propose(recipe, AUTO)
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
        return {"pending": out, "applied": applied, "notices": notices}

    # -- helpers ---------------------------------------------------------------------------------
    def _gather(self, recipe: str) -> Gathered:
        archive = self._archive()
        if archive is None:
            raise RecipeError("no archive: proposals learn from labelled verdicts in the archive (storage.archive)")
        return gather(archive, recipe, self.max_pixels)

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
