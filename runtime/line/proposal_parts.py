"""The parts of a proposal on the line (``proposals.py``): the labelled verdicts gathered from the
archive (:func:`gather`), the pending proposal kept crash-safely as ``<store>/<recipe>/proposal.json``
(:class:`Pending`), when it is stale (:func:`staleness`) and its apply (:func:`apply_pending`)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.engines.preprocess import ImageError, read_image
from anomalygpt_edge.runtime.recipes.proposal import MAX_PARTS, LabelledPart, Proposal, apply
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller

log = logging.getLogger(__name__)

PROPOSAL_FILE = "proposal.json"


@dataclass
class Gathered:
    """The labelled parts of one recipe read from the archive, and what could not be used."""

    parts: list[LabelledPart] = field(default_factory=list)
    labels: list[list[Any]] = field(default_factory=list)  # [verdict id, label, labelled at] per part
    no_image: int = 0
    not_judged: int = 0
    unreadable: list[str] = field(default_factory=list)
    other_roi: int = 0
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
        if self.other_roi:
            out.append(
                f"{self.other_roi} labelled verdicts come from cameras whose config ROI differs from the "
                "recipe's (their archived crops are another region): left out."
            )
        if self.total > MAX_PARTS:
            out.append(f"{self.total} labelled verdicts: only the newest {MAX_PARTS} are used.")
        return out


def gather(
    archive: Any, recipe: str, max_pixels: int | None = None, other_roi: Callable[[str], bool] = lambda _: False
) -> Gathered:
    """The recipe's labelled verdicts (newest :data:`MAX_PARTS`) as parts; images are the archived ROI crops.

    ``other_roi(camera)`` is True for a camera whose config ROI overrides the recipe's with another
    one: its crops are another region of the part, so its labels are left out (counted in the notes)."""
    rows = archive.labelled(recipe=recipe)
    out = Gathered(total=len(rows))
    for row in rows[-MAX_PARTS:]:
        if row.verdict not in ("OK", "NG"):  # an ERROR verdict judged no part (its image is no ROI crop)
            out.not_judged += 1
            continue
        if other_roi(row.camera):
            out.other_roi += 1
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
