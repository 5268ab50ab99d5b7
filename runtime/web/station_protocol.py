"""The :class:`Station` protocol: everything the technician web page needs from the line.

The web layer (``server.py``) calls only :class:`Station`; it never touches cameras, engines or
the recipe store itself. Records handed to it are plain JSON-ready dicts; images are JPEG/PNG
bytes. Errors are :class:`StationError` (a request the station cannot do, said why) and
:class:`NotFoundError` (the named thing does not exist).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class DefectUpload:
    """One uploaded known-defective image: its file bytes, optionally a painted mask (PNG, same size)."""

    name: str
    data: bytes
    mask: bytes | None = None
    defect_type: str | None = None


class StationError(ValueError):
    """A request the station cannot do (unknown camera or recipe, no frame yet, bad image); says why."""


class NotFoundError(StationError):
    """The named camera, recipe, sample or verdict does not exist."""


class StaleProposalError(StationError):
    """The pending proposal was computed on a bank version that is no longer live (answered 409)."""


@dataclass(frozen=True)
class Frame:
    """The newest image of one camera."""

    image: np.ndarray  # BGR
    seq: int
    captured_at: float  # time.time()


@dataclass(frozen=True)
class HistoryQuery:
    """Filters of the history page; ``None`` means any."""

    camera: str | None = None
    recipe: str | None = None
    ng_only: bool = False
    since: float | None = None  # epoch seconds
    until: float | None = None
    limit: int = 100


class Station(Protocol):
    """What the technician station's web layer needs from the line (all methods thread-safe)."""

    def cameras(self) -> list[dict[str, Any]]:
        """Each camera: name, status, active recipe, ROI, measured fps and latency."""

    def latest_jpeg(self, camera: str) -> bytes:
        """The camera's newest frame as JPEG (raises NotFoundError/StationError when there is none)."""

    def last_verdict(self, camera: str) -> dict[str, Any] | None:
        """The camera's newest verdict record, or None before the first."""

    def last_overlay(self, camera: str, verdict_id: str | None = None) -> bytes | None:
        """JPEG heatmap overlay of the camera's last verdict (or of a recent one, by id); None if none."""

    def recipes(self) -> list[dict[str, Any]]:
        """Every recipe's state (see :meth:`recipe`)."""

    def recipe(self, name: str) -> dict[str, Any]:
        """One recipe: settings, samples with quality flags, threshold and its plain-words explanation."""

    def sample_png(self, recipe: str, sha256: str) -> bytes:
        """A golden sample's stored image (ROI applied)."""

    def enroll_start(
        self, recipe: str, camera: str | None, roi: tuple[int, int, int, int] | None, **settings: Any
    ) -> dict[str, Any]:
        """Create (or pick) a recipe for enrollment; a new or empty recipe takes ``roi``."""

    def enroll_capture(self, recipe: str, camera: str) -> dict[str, Any]:
        """Add the camera's current frame as a golden sample; returns the enrollment step result."""

    def enroll_upload(self, recipe: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Add uploaded image files as golden samples."""

    def enroll_remove(self, recipe: str, sample: str) -> dict[str, Any]:
        """Remove one golden sample (name or sha256 prefix) and rebuild."""

    def enroll_finish(self, recipe: str, camera: str | None, accept_flagged: bool = False) -> dict[str, Any]:
        """Rebuild bank and threshold; when live, the camera starts inspecting with the recipe."""

    def enroll_defect_upload(self, recipe: str, files: list[DefectUpload]) -> dict[str, Any]:
        """Add uploaded images as labelled defective parts (each with an optional mask and type)."""

    def enroll_defect_capture(self, recipe: str, camera: str, defect_type: str | None = None) -> dict[str, Any]:
        """Add the camera's current frame as a labelled defective part (no mask)."""

    def enroll_defect_mark(
        self, recipe: str, sample: str, mask: bytes | None = None, defect_type: str | None = None
    ) -> dict[str, Any]:
        """Turn an enrolled golden sample into a labelled defect, with an optional mask painted on it."""

    def enroll_defect_remove(self, recipe: str, defect: str) -> dict[str, Any]:
        """Remove one labelled defect (name or sha256 prefix) and rebuild."""

    def defect_png(self, recipe: str, sha256: str, mask: bool = False) -> bytes:
        """A labelled defect's stored image (ROI applied), or its mask."""

    def assign(self, camera: str, recipe: str | None) -> dict[str, Any]:
        """Make ``recipe`` the one ``camera`` inspects with (None: stop inspecting)."""

    def delete_recipe(self, recipe: str) -> None:
        """Remove a recipe and its bank (cameras using it stop inspecting)."""

    def labels_archive(self, flush: bool = False) -> Any:
        """The archive that holds verdict labels (None: none); ``flush`` writes queued verdicts first."""

    def label_verdict(
        self, verdict_id: str, label: str, author: str, defect_type: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Label an archived verdict ``good``/``defect`` as ``author`` (the row, plus ``image``)."""

    def verdict_labels(self, verdict_id: str) -> list[dict[str, Any]]:
        """Every label of one archived verdict, oldest first."""

    def current_labels(self, verdict_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The current label of each of these verdicts that has one."""

    def labelled_counts(self, recipe: str) -> dict[str, Any]:
        """The recipe's labelled verdicts: good, defect, false rejects / escapes among them, without image."""

    def propose(self, recipe: str, by: str) -> dict[str, Any]:
        """Compute a proposal from the recipe's labelled verdicts (seconds); it becomes the pending one."""

    def proposal(self, recipe: str) -> dict[str, Any]:
        """The recipe's pending proposal, with ``stale`` (NotFoundError when there is none)."""

    def apply_proposal(
        self, recipe: str, by: str, reason: str | None = None, base_bank_version: int | None = None
    ) -> dict[str, Any]:
        """Apply the pending proposal in one recipe commit (StaleProposalError when the recipe moved since)."""

    def discard_proposal(self, recipe: str, by: str) -> dict[str, Any]:
        """Drop the recipe's pending proposal (NotFoundError when there is none)."""

    def recipe_versions(self, recipe: str) -> list[dict[str, Any]]:
        """The recipe's live version and its kept ones, newest number first."""

    def rollback_recipe(self, recipe: str, version: int | None, by: str) -> dict[str, Any]:
        """Make a kept version live again (the previous one when ``version`` is None)."""

    def history(self, query: HistoryQuery) -> list[dict[str, Any]]:
        """Recent verdict records, newest first, filtered."""

    def history_item(self, verdict_id: str) -> dict[str, Any]:
        """One verdict record."""

    def history_image(self, verdict_id: str, kind: str) -> bytes:
        """JPEG of a verdict's ``image`` (the inspected ROI) or its ``heatmap`` overlay."""

    def ask(self, conversation: str, verdict_id: str, question: str, on_text: Callable[[str], None]) -> dict[str, Any]:
        """Answer ``question`` about a verdict, streaming text pieces to ``on_text``; multi-turn per conversation."""

    def system(self) -> dict[str, Any]:
        """Versions, engines, backend, per-camera rates and latencies, spool depth, broker connection."""
