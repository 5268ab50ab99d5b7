"""Enrollment helpers of the station: uploads screened before decoding, painted masks, recipe state.

Every upload (golden samples and labelled defects alike) goes through :func:`screen_uploads`:
each file is hashed before any is decoded, so a repeat costs a hash and is skipped by name, and
decoding (with its header check and pixel limit) happens only for what will be enrolled.
:class:`UploadLedger` remembers which upload became which sample, so a later repeat of the same
bytes is skipped undecoded too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.calibration.threshold import Threshold
from anomalygpt_edge.engines.preprocess import ImageError, decode_image
from anomalygpt_edge.runtime.recipes.enrollment import LabelledImage
from anomalygpt_edge.runtime.recipes.store import Recipe
from anomalygpt_edge.runtime.web.station_protocol import DefectUpload, StationError

MAX_UPLOAD_IMAGES = 64
MAX_REMEMBERED_UPLOADS = 4096  # per recipe: upload hashes kept to skip repeats before decoding


@dataclass
class Screened:
    """The files of one upload that will be decoded (by index), their hashes, and what was skipped."""

    indices: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def screen_uploads(files: Sequence[tuple[str, bytes]], enrolled: set[str], known: dict[str, str]) -> Screened:
    """Hash every file before decoding any; skip files uploaded twice or already enrolled.

    ``files`` are (file name, bytes); ``enrolled`` the sha256 of the recipe's samples and defects;
    ``known`` maps upload-bytes sha256 to the sample sha256 it became (see :class:`UploadLedger`).
    """
    if not files:
        raise StationError("no files uploaded")
    if len(files) > MAX_UPLOAD_IMAGES:
        raise StationError(f"at most {MAX_UPLOAD_IMAGES} images per upload")
    out, seen = Screened(), set()
    for i, (fname, data) in enumerate(files):
        label = Path(fname).name or "upload"
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            out.skipped.append(f"{label}: uploaded twice")
            continue
        if known.get(digest) in enrolled:
            out.skipped.append(f"{label}: already enrolled")
            continue
        seen.add(digest)
        out.indices.append(i)
        out.labels.append(label)
        out.hashes.append(digest)
    return out


def decode_golden(fname: str, data: bytes) -> np.ndarray:
    """An uploaded golden image (header checked before decoding); StationError naming the file."""
    try:
        return decode_image(data, fname)
    except ImageError as exc:
        raise StationError(str(exc)) from None


def decode_defect(upload: DefectUpload, label: str) -> LabelledImage:
    """An uploaded defective part with its optional painted mask; StationError naming the file."""
    try:
        image = decode_image(upload.data, label)
        mask = None if upload.mask is None else mask_array(upload.mask, image.shape[:2], label)
    except ImageError as exc:
        raise StationError(str(exc)) from None
    return LabelledImage(label, image, mask, upload.defect_type)


class UploadLedger:
    """Per recipe: sha256 of uploaded file bytes -> sha256 of the golden sample or defect it became."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def known(self, recipe: str) -> dict[str, str]:
        """A copy of the recipe's table (read without holding the lock during decoding)."""
        with self._lock:
            return dict(self._tables.get(recipe, {}))

    def remember(self, recipe: str, hashes: list[str], new: list[str], skipped_by_enroller: bool) -> None:
        """Map upload bytes to what they became, so the same file is skipped next time undecoded.

        Only when the mapping is certain: one new sample per uploaded file, in order (the
        enroller adds them in input order) and none skipped by the enroller. Otherwise nothing is
        remembered and a repeated upload is decoded and then skipped by the enroller, as before.
        """
        if len(new) != len(hashes) or skipped_by_enroller:
            return
        with self._lock:
            table = self._tables.setdefault(recipe, {})
            table.update(zip(hashes, new))
            while len(table) > MAX_REMEMBERED_UPLOADS:
                table.pop(next(iter(table)))


def recipe_state(recipe: Recipe, cameras: list[str]) -> dict[str, Any]:
    """A recipe as the enrollment page shows it, with the threshold explained in plain words."""
    t: Threshold | None = recipe.threshold
    return {
        "name": recipe.name,
        "live": recipe.live,
        "roi": list(recipe.roi) if recipe.roi else None,
        "source": recipe.source,
        "target_frr": recipe.target_frr,
        "k": len(recipe.samples),
        "samples": [
            {"name": s.name, "sha256": s.sha256, "score": s.score, "flagged": s.flagged, "added_at": s.added_at}
            for s in recipe.samples
        ],
        "defects": [
            {
                "name": d.name,
                "sha256": d.sha256,
                "defect_type": d.defect_type,
                "has_mask": d.has_mask,
                "score": d.score,
                "added_at": d.added_at,
            }
            for d in recipe.defects
        ],
        "head": recipe.head_file is not None,
        "expectation": (recipe.quality or {}).get("expectation") or None,
        "quality": recipe.quality or None,
        "threshold": t.to_json() if t else None,
        "threshold_explained": t.explain() if t else None,
        "bank_version": recipe.bank_version,
        "bundle_sha256": recipe.bundle_sha256,
        "cameras": cameras,
        "updated_at": recipe.updated_at,
    }


def mask_array(data: bytes, shape: tuple[int, int], label: str) -> np.ndarray:
    """A painted mask (PNG or any decodable image) as uint8 0/255 of ``shape``; refused when empty.

    The colour channels say where the defect is; an alpha channel only hides what it makes
    transparent (a browser canvas exports RGBA, where an opaque black background is still "no defect").
    """
    mask = decode_image(data, f"{label} mask")
    if mask.ndim == 3:
        gray = mask[:, :, :3].max(axis=2)
        if mask.shape[2] == 4:
            gray = np.where(mask[:, :, 3] > 127, gray, 0)
    else:
        gray = mask
    if gray.shape[:2] != tuple(shape):
        raise ImageError(f"{label}: mask is {gray.shape[1]}x{gray.shape[0]}, the image is {shape[1]}x{shape[0]}")
    binary = np.where(gray > 127, 255, 0).astype(np.uint8)
    if not binary.any():
        raise ImageError(f"{label}: the mask is empty; paint the defect, or send no mask")
    return binary


def place_in_frame(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """``image`` (an ROI crop) at the ROI's offset in a zero canvas, so cropping the ROI gives it back."""
    if roi is None:
        return image
    x, y, w, h = roi
    if image.shape[:2] != (h, w):
        raise StationError(f"stored sample is {image.shape[1]}x{image.shape[0]}, the recipe's ROI is {w}x{h}")
    canvas = np.zeros((y + h, x + w, *image.shape[2:]), image.dtype)
    canvas[y : y + h, x : x + w] = image
    return canvas
