"""The Station: everything the technician web page needs from the line, behind one small interface.

The web layer (``server.py``) calls only :class:`Station`; it never touches cameras, engines or
the recipe store itself. :class:`StationBase` holds what every implementation shares (recipes and
enrollment through the real ``Enroller``, the recent-verdict log, ``ask`` through the real
``Explainer``). :class:`LocalStation` runs its own cameras and inspection loops (no MQTT), for a
bench or a laptop; ``daemon_station.DaemonStation`` serves the running line daemon's own cameras,
engines, verdicts and explanations.

Records handed to the web layer are plain JSON-ready dicts; images are JPEG/PNG bytes.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import logging
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from anomalygpt_edge.calibration.threshold import Threshold
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError, crop_roi, decode_image, list_images, read_image
from anomalygpt_edge.runtime.inspection.heatmap import overlay
from anomalygpt_edge.runtime.inspection.verdict import Region, Verdict
from anomalygpt_edge.runtime.recipes.enrollment import Enroller, LabelledImage
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeError, RecipeStore

log = logging.getLogger(__name__)

JPEG_QUALITY = 85
#: Verdicts kept in memory for the history page (images only for NG/ERROR and a sample of OK).
HISTORY_SIZE = 2000
KEEP_OK_IMAGE_EVERY = 10
MAX_UPLOAD_IMAGES = 64
MAX_REMEMBERED_UPLOADS = 4096  # per recipe: upload hashes kept to skip repeats before decoding


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


# --- cameras --------------------------------------------------------------------------------------


@dataclass
class CameraSpec:
    """A frame source: ``kind`` is ``video_file``, ``image_folder`` or ``opencv`` (index, device or URL)."""

    name: str
    kind: str
    source: str
    fps: float = 10.0
    loop: bool = True


class FrameGrabber:
    """A thread that keeps only the newest frame of one source (a slow reader never builds a backlog).

    File sources are paced at their ``fps`` and loop; a source that fails is reopened with backoff.
    """

    def __init__(self, spec: CameraSpec):
        self.spec = spec
        self.status = "starting"
        self.skipped = 0  # image-folder files that could not be read
        self.last_error: str | None = None
        self._frame: Frame | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"grab-{spec.name}", daemon=True)

    def start(self) -> FrameGrabber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def latest(self) -> Frame | None:
        with self._lock:
            return self._frame

    def _publish(self, image: np.ndarray) -> None:
        with self._lock:
            self._seq += 1
            self._frame = Frame(image, self._seq, time.time())

    def _images(self) -> Iterable[np.ndarray]:
        spec = self.spec
        if spec.kind == "image_folder":
            files = list_images(Path(spec.source))
            if not files:
                raise OSError(f"{spec.source}: no images")
            for p in files:
                try:
                    # The same header check and pixel limit as the daemon's cameras: a huge or
                    # broken file is skipped (and said), the files after it still come.
                    image = read_image(p)
                except ImageError as exc:
                    self.skipped += 1
                    self.last_error = str(exc)
                    continue
                yield image
            return
        src: int | str = int(spec.source) if spec.source.isdigit() else spec.source
        cap = cv2.VideoCapture(src)
        try:
            if not cap.isOpened():
                raise OSError(f"cannot open {spec.source}")
            while not self._stop.is_set():
                ok, image = cap.read()
                if not ok:
                    return
                yield image
        finally:
            cap.release()

    def _run(self) -> None:
        backoff = 0.5
        paced = self.spec.kind in ("video_file", "image_folder")
        period = 1.0 / self.spec.fps if self.spec.fps > 0 else 0.0
        while not self._stop.is_set():
            got = False
            try:
                next_t = time.monotonic()
                for image in self._images():
                    got = True
                    self.status = "ok"
                    self._publish(image)
                    if paced:  # replay at the camera's rate, like a live line would deliver frames
                        next_t += period
                        if self._stop.wait(max(0.0, next_t - time.monotonic())):
                            return
                    if self._stop.is_set():
                        return
            except Exception as exc:  # a camera error must never end the grabber: report and retry
                self.status = f"error: {exc}"
                log.warning("camera %s: %s", self.spec.name, exc)
            if got and paced and self.spec.loop:
                backoff = 0.5
                continue
            if got and paced:
                self.status = "ended"
                return
            if not self.status.startswith("error"):
                self.status = "reconnecting"
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)


# --- records --------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise StationError("cannot encode image as JPEG")
    return buf.tobytes()


def verdict_from_record(record: dict[str, Any]) -> Verdict:
    """Rebuild a :class:`Verdict` (without its map) from a record, for the LLM."""
    regions = [
        Region(tuple(r["bbox"]), float(r["area_pct"]), float(r["peak"]), r["location"])
        for r in record.get("regions") or []
    ]
    nan = float("nan")
    return Verdict(
        verdict=record["verdict"],
        score=nan if record.get("score") is None else float(record["score"]),
        threshold=nan if record.get("threshold") is None else float(record["threshold"]),
        recipe=record.get("recipe") or "",
        regions=regions,
        sentence=record.get("sentence") or "",
        reason=record.get("reason"),
    )


class VerdictLog:
    """Recent verdicts for the web page: records (newest last), their JPEGs, per-camera last verdict,
    recent overlays and rates. Thread-safe; bounded (:data:`HISTORY_SIZE` records)."""

    def __init__(self, size: int = HISTORY_SIZE):
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._by_id: dict[str, dict[str, Any]] = {}
        self._images: dict[str, tuple[bytes, bytes | None]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._overlays: dict[str, collections.OrderedDict[str, bytes]] = collections.defaultdict(
            collections.OrderedDict
        )
        self._times: dict[str, collections.deque[float]] = collections.defaultdict(lambda: collections.deque(maxlen=50))
        self._latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=50)
        )
        self._lock = threading.Lock()

    def add(
        self,
        record: dict[str, Any],
        roi_image: np.ndarray | None,
        verdict: Verdict,
        keep_image: bool,
    ) -> dict[str, Any]:
        """Store one verdict record (``id``, ``camera``, ``captured_at_epoch`` …) with its images."""
        camera = record["camera"]
        overlay_jpeg = _jpeg(overlay(roi_image, verdict)) if roi_image is not None else None
        record["has_image"] = bool(keep_image and roi_image is not None)
        image_jpeg = _jpeg(roi_image) if record["has_image"] else None
        now = time.time()
        with self._lock:
            if len(self._records) == self._records.maxlen:
                old = self._records[0]["id"]
                self._images.pop(old, None)
                self._by_id.pop(old, None)
            self._records.append(record)
            self._by_id[record["id"]] = record
            if image_jpeg is not None:
                self._images[record["id"]] = (image_jpeg, overlay_jpeg)
            self._last[camera] = record
            if overlay_jpeg is not None:
                ring = self._overlays[camera]
                ring[record["id"]] = overlay_jpeg
                while len(ring) > 8:
                    ring.popitem(last=False)
            self._times[camera].append(time.monotonic())
            if record.get("ts"):
                self._latencies[camera].append(1e3 * (now - record["ts"]))
        return record

    def explain(self, verdict_id: str, text: str) -> None:
        """Attach an LLM explanation to a recorded verdict (it comes later, asynchronously)."""
        with self._lock:
            r = self._by_id.get(verdict_id)
            if r is not None:
                r["explanation"] = text

    def last(self, camera: str) -> dict[str, Any] | None:
        with self._lock:
            return self._last.get(camera)

    def overlay(self, camera: str, verdict_id: str | None) -> bytes | None:
        with self._lock:
            ring = self._overlays.get(camera)
            if not ring:
                return None
            return next(reversed(ring.values())) if verdict_id is None else ring.get(verdict_id)

    def rates(self, camera: str) -> dict[str, Any]:
        """Verdicts per second and capture-to-verdict latency over the camera's last 50 verdicts."""
        with self._lock:
            times = list(self._times.get(camera, ()))
            lat = sorted(self._latencies.get(camera, ()))
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 and times[-1] > times[0] else None
        return {
            "inspect_fps": round(fps, 2) if fps else None,
            "latency_ms_p50": round(lat[len(lat) // 2], 1) if lat else None,
            "latency_ms_max": round(lat[-1], 1) if lat else None,
        }

    def query(self, q: HistoryQuery) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._records)
        out = []
        for r in reversed(items):
            if q.camera and r["camera"] != q.camera:
                continue
            if q.recipe and r["recipe"] != q.recipe:
                continue
            if q.ng_only and r["verdict"] == "OK":
                continue
            if q.since is not None and r["ts"] < q.since:
                continue
            if q.until is not None and r["ts"] >= q.until:
                continue
            out.append(r)
            if len(out) >= q.limit:
                break
        return out

    def item(self, verdict_id: str) -> dict[str, Any]:
        with self._lock:
            r = self._by_id.get(verdict_id)
        if r is None:
            raise NotFoundError(f"no verdict '{verdict_id}' in the recent history")
        return r

    def image(self, verdict_id: str, kind: str) -> bytes:
        with self._lock:
            pair = self._images.get(verdict_id)
        if pair is None:
            raise NotFoundError(f"no image kept for verdict '{verdict_id}' (OK images are sampled)")
        data = pair[0] if kind == "image" else pair[1]
        if data is None:
            raise NotFoundError(f"no {kind} for verdict '{verdict_id}'")
        return data


class StationBase:
    """What every station shares: recipes and enrollment through an ``Enroller``, the verdict log,
    and ``ask`` through an explainer. Subclasses say where frames, cameras and engines come from."""

    def __init__(self, store: RecipeStore, explainer_factory: Callable[[], Any] | None = None):
        self.store = store
        self.log = VerdictLog()
        self._enroll_lock = threading.Lock()  # an enroller rebuilds one recipe at a time
        self._last_capture: dict[tuple[str, str], int] = {}
        # recipe -> sha256 of uploaded file bytes -> sha256 of the golden sample it became
        self._uploads: dict[str, dict[str, str]] = {}
        self._uploads_lock = threading.Lock()
        self._explainer_factory = explainer_factory
        self._explainer: Any = None
        self._explainer_error: str | None = None
        self._llm_lock = threading.Lock()
        self._conversation: tuple[str, str, Any] | None = None
        self._started = time.time()

    # -- what a subclass provides ------------------------------------------------------------------
    def camera_names(self) -> list[str]:
        raise NotImplementedError

    def latest_frame(self, camera: str) -> Frame:
        """The camera's newest frame (StationError when there is none)."""
        raise NotImplementedError

    def next_frame(self, camera: str, newer_than_seq: int) -> Frame:
        """A frame newer than ``newer_than_seq`` (waits briefly), so two captures never take the same frame."""
        deadline = time.monotonic() + 2.0
        while True:
            frame = self.latest_frame(camera)
            if frame.seq > newer_than_seq or time.monotonic() > deadline:
                return frame
            time.sleep(0.02)

    def enroller_for(self, camera: str | None) -> Enroller:
        raise NotImplementedError

    def camera_recipe(self, camera: str) -> str | None:
        raise NotImplementedError

    def assign(self, camera: str, recipe: str | None) -> dict[str, Any]:
        raise NotImplementedError

    # -- cameras -------------------------------------------------------------------------------
    def _check_camera(self, camera: str) -> None:
        if camera not in self.camera_names():
            raise NotFoundError(f"no camera '{camera}' (cameras: {', '.join(self.camera_names()) or 'none'})")

    def latest_jpeg(self, camera: str) -> bytes:
        return _jpeg(self.latest_frame(camera).image)

    def last_verdict(self, camera: str) -> dict[str, Any] | None:
        self._check_camera(camera)
        return self.log.last(camera)

    def last_overlay(self, camera: str, verdict_id: str | None = None) -> bytes | None:
        self._check_camera(camera)
        return self.log.overlay(camera, verdict_id)

    # -- recipes and enrollment ------------------------------------------------------------------
    def recipes(self) -> list[dict[str, Any]]:
        out = []
        for n in self.store.names():
            try:
                out.append(self.recipe(n))
            except RecipeError as exc:
                out.append({"name": n, "error": str(exc)})
        return out

    def recipe(self, name: str) -> dict[str, Any]:
        if not self.store.exists(name):
            raise NotFoundError(f"no recipe '{name}'")
        users = [c for c in self.camera_names() if self.camera_recipe(c) == name]
        return recipe_state(self.store.load(name), users)

    def sample_png(self, recipe: str, sha256: str) -> bytes:
        r = self.store.load(recipe)
        if not any(s.sha256 == sha256 for s in r.samples):
            raise NotFoundError(f"recipe {recipe} has no sample {sha256[:12]}")
        return self.store.sample_path(recipe, sha256, "png").read_bytes()

    def enroll_start(
        self, recipe: str, camera: str | None, roi: tuple[int, int, int, int] | None, **settings: Any
    ) -> dict[str, Any]:
        if camera is not None:
            self._check_camera(camera)
            if roi is not None:
                with contextlib.suppress(StationError):  # no frame yet: the ROI is checked at capture
                    crop_roi(self.latest_frame(camera).image, roi, f"camera {camera}")  # refuse an ROI off the image
        enroller = self.enroller_for(camera)
        # The recipe's writer lock too: an MQTT or CLI commit between the load and the ROI commit
        # would otherwise be overwritten.
        with self._enroll_lock, self.store.writer(recipe):
            if self.store.exists(recipe):
                current = enroller.open_or_create(recipe)
                if roi is not None and tuple(roi) != current.roi:
                    if current.samples:
                        raise StationError(
                            f"recipe {recipe} already has {len(current.samples)} golden samples taken with "
                            f"ROI {current.roi}; remove them or create a new recipe to change the ROI"
                        )
                    self.store.commit(replace(current, roi=tuple(roi)))
            else:
                enroller.create(recipe, roi=tuple(roi) if roi else None, **settings)
        return self.recipe(recipe)

    def _step(self, recipe: str, result: Any) -> dict[str, Any]:
        return {**result.to_json(), "state": self.recipe(recipe)}

    def enroll_capture(self, recipe: str, camera: str) -> dict[str, Any]:
        self._check_camera(camera)
        key = (recipe, camera)
        frame = self.next_frame(camera, self._last_capture.get(key, -1))
        self._last_capture[key] = frame.seq
        with self._enroll_lock:
            result = self.enroller_for(camera).add(recipe, [(f"{camera}-{frame.seq:06d}.png", frame.image)])
        return self._step(recipe, result)

    def enroll_upload(self, recipe: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        if not files:
            raise StationError("no files uploaded")
        if len(files) > MAX_UPLOAD_IMAGES:
            raise StationError(f"at most {MAX_UPLOAD_IMAGES} images per upload")
        current = self.store.load(recipe)
        # A file already enrolled as a golden sample or as a labelled defect is skipped undecoded.
        enrolled = {s.sha256 for s in current.samples} | {d.sha256 for d in current.defects}
        known = self._uploads.get(recipe, {})
        images, hashes, skipped, seen = [], [], [], set()
        # Every file is hashed and its header checked before any is decoded: a duplicate costs a
        # hash, an oversized or broken file is refused (naming it) before a pixel is allocated.
        for fname, data in files:
            label = Path(fname).name or "upload"
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen or known.get(digest) in enrolled:
                skipped.append(f"{label}: already enrolled" if digest not in seen else f"{label}: uploaded twice")
                continue
            seen.add(digest)
            try:
                images.append((label, decode_image(data, fname)))
            except ImageError as exc:
                raise StationError(str(exc)) from None
            hashes.append(digest)
        with self._enroll_lock:
            before = {s.sha256 for s in self.store.load(recipe).samples}
            result = self.enroller_for(None).add(recipe, images)
        self._remember_uploads(recipe, images, hashes, result, before)
        result.skipped = skipped + list(result.skipped)
        return self._step(recipe, result)

    def _remember_uploads(
        self, recipe: str, images: list[tuple[str, Any]], hashes: list[str], result: Any, before: set[str]
    ) -> None:
        """Map upload bytes to the sample they became, so the same file is skipped next time undecoded.

        Only when the mapping is certain: one new sample per uploaded file, in order (the
        enroller adds them in input order and skips none). Otherwise nothing is remembered and a
        repeated upload is decoded and then skipped by the enroller, as before.
        """
        new = [s.sha256 for s in result.recipe.samples if s.sha256 not in before]
        if len(new) != len(images) or result.skipped:
            return
        with self._uploads_lock:
            table = self._uploads.setdefault(recipe, {})
            table.update(zip(hashes, new))
            while len(table) > MAX_REMEMBERED_UPLOADS:
                table.pop(next(iter(table)))

    def enroll_remove(self, recipe: str, sample: str) -> dict[str, Any]:
        with self._enroll_lock:
            result = self.enroller_for(None).remove(recipe, sample)
        return self._step(recipe, result)

    # -- labelled defective parts (all through Enroller.add_defects) ------------------------------
    def defect_png(self, recipe: str, sha256: str, mask: bool = False) -> bytes:
        r = self.store.load(recipe)
        found = next((d for d in r.defects if d.sha256 == sha256), None)
        if found is None or (mask and not found.has_mask):
            raise NotFoundError(f"recipe {recipe} has no labelled defect {sha256[:12]}{' mask' if mask else ''}")
        return self.store.defect_path(recipe, sha256, "mask.png" if mask else "png").read_bytes()

    def enroll_defect_upload(self, recipe: str, files: list[DefectUpload]) -> dict[str, Any]:
        if not files:
            raise StationError("no files uploaded")
        if len(files) > MAX_UPLOAD_IMAGES:
            raise StationError(f"at most {MAX_UPLOAD_IMAGES} images per upload")
        current = self.store.load(recipe)
        enrolled = {s.sha256 for s in current.samples} | {d.sha256 for d in current.defects}
        known = self._uploads.get(recipe, {})
        items, hashes, skipped, seen = [], [], [], set()
        # As for golden uploads: hashed and header-checked before anything is decoded, so a
        # repeated file costs a hash and an oversized image or mask is refused before its pixels exist.
        for f in files:
            label = Path(f.name).name or "upload"
            digest = hashlib.sha256(f.data).hexdigest()
            if digest in seen or known.get(digest) in enrolled:
                skipped.append(f"{label}: already enrolled" if digest not in seen else f"{label}: uploaded twice")
                continue
            seen.add(digest)
            try:
                image = decode_image(f.data, label)
                mask = None if f.mask is None else _mask_array(f.mask, image.shape[:2], label)
            except ImageError as exc:
                raise StationError(str(exc)) from None
            items.append(LabelledImage(label, image, mask, f.defect_type))
            hashes.append(digest)
        with self._enroll_lock:
            before = {d.sha256 for d in self.store.load(recipe).defects}
            result = self.enroller_for(None).add_defects(recipe, items)
        new = [d.sha256 for d in result.recipe.defects if d.sha256 not in before]
        if len(new) == len(items) and not result.skipped:  # the same certainty rule as golden uploads
            with self._uploads_lock:
                table = self._uploads.setdefault(recipe, {})
                table.update(zip(hashes, new))
                while len(table) > MAX_REMEMBERED_UPLOADS:
                    table.pop(next(iter(table)))
        result.skipped = skipped + list(result.skipped)
        return self._step(recipe, result)

    def enroll_defect_capture(self, recipe: str, camera: str, defect_type: str | None = None) -> dict[str, Any]:
        self._check_camera(camera)
        key = (recipe, camera)
        frame = self.next_frame(camera, self._last_capture.get(key, -1))
        self._last_capture[key] = frame.seq
        item = LabelledImage(f"defect-{camera}-{frame.seq:06d}.png", frame.image, None, defect_type)
        with self._enroll_lock:
            result = self.enroller_for(camera).add_defects(recipe, [item])
        return self._step(recipe, result)

    def enroll_defect_mark(
        self, recipe: str, sample: str, mask: bytes | None = None, defect_type: str | None = None
    ) -> dict[str, Any]:
        """The golden sample's stored image (ROI applied) becomes a labelled defect.

        The Enroller takes camera frames and applies the recipe's ROI itself, so the sample is
        placed back at the ROI's offset in a frame-sized canvas (and the mask, painted on the
        sample, likewise): the ROI crop then gives back exactly the stored image. The golden is
        removed first (the same image cannot be both); if the defect cannot be added it is put back.
        """
        enroller = self.enroller_for(None)
        with self._enroll_lock:
            r = self.store.load(recipe)
            hits = [s for s in r.samples if s.name == sample or (len(sample) >= 8 and s.sha256.startswith(sample))]
            if len(hits) != 1:
                raise NotFoundError(f"recipe {recipe} has no single golden sample '{sample}'")
            golden = hits[0]
            image = decode_image(self.store.sample_path(recipe, golden.sha256, "png").read_bytes(), golden.name)
            painted = None if mask is None else _mask_array(mask, image.shape[:2], golden.name)
            frame = _place_in_frame(image, r.roi)
            frame_mask = None if painted is None else _place_in_frame(painted, r.roi)
            enroller.remove(recipe, golden.sha256)
            try:
                result = enroller.add_defects(recipe, [LabelledImage(golden.name, frame, frame_mask, defect_type)])
            except Exception:
                enroller.add(recipe, [(golden.name, frame)])  # the golden comes back; the error is the answer
                raise
        return self._step(recipe, result)

    def enroll_defect_remove(self, recipe: str, defect: str) -> dict[str, Any]:
        enroller = self.enroller_for(None)
        with self._enroll_lock:
            r = self.store.load(recipe)
            hits = [d for d in r.defects if d.name == defect or (len(defect) >= 8 and d.sha256.startswith(defect))]
            if len(hits) != 1:
                raise NotFoundError(f"recipe {recipe} has no single labelled defect '{defect}'")
            # By full sha256: Enroller.remove also matches golden names, a defect's must not hit one.
            result = enroller.remove(recipe, hits[0].sha256)
        return self._step(recipe, result)

    def enroll_finish(self, recipe: str, camera: str | None, accept_flagged: bool = False) -> dict[str, Any]:
        with self._enroll_lock:
            result = self.enroller_for(camera).rebuild(recipe, accept_flagged)
        if result.recipe.live and camera is not None:
            self.assign(camera, recipe)
        return self._step(recipe, result)

    def delete_recipe(self, recipe: str) -> None:
        if not self.store.exists(recipe):
            raise NotFoundError(f"no recipe '{recipe}'")
        used = [c for c in self.camera_names() if self.camera_recipe(c) == recipe]
        if used:
            raise StationError(f"recipe {recipe} is in use on {', '.join(used)}: put another recipe on them first")
        with self._enroll_lock:
            self.store.delete(recipe)

    # -- history ---------------------------------------------------------------------------------
    def history(self, query: HistoryQuery) -> list[dict[str, Any]]:
        return self.log.query(query)

    def history_item(self, verdict_id: str) -> dict[str, Any]:
        return self.log.item(verdict_id)

    def history_image(self, verdict_id: str, kind: str) -> bytes:
        return self.log.image(verdict_id, kind)

    # -- ask -------------------------------------------------------------------------------------
    def _get_explainer(self) -> Any:
        with self._llm_lock:
            if self._explainer is None and self._explainer_error is None:
                if self._explainer_factory is None:
                    self._explainer_error = "no LLM configured for this station"
                else:
                    try:
                        self._explainer = self._explainer_factory()
                    except Exception as exc:  # noqa: BLE001 - a missing model degrades ask, nothing else
                        self._explainer_error = f"{type(exc).__name__}: {exc}"
            if self._explainer is None:
                raise StationError(f"the LLM is not available: {self._explainer_error}")
            return self._explainer

    def ask(self, conversation: str, verdict_id: str, question: str, on_text: Callable[[str], None]) -> dict[str, Any]:
        record = self.history_item(verdict_id)
        verdict = verdict_from_record(record)
        question = question.strip() or "Is there any anomaly in the image?"
        try:
            explainer = self._get_explainer()
        except StationError as exc:
            # Without a model the operator still gets the vision system's own answer.
            on_text(verdict.sentence)
            return {"text": verdict.sentence, "source": "template", "note": str(exc), "turn": "first"}
        with self._llm_lock:
            # One model, one context: a follow-up continues only while nothing else (another chat,
            # or the explanation worker, which sets the explainer's verdict) has used the model since.
            follow = (
                self._conversation is not None
                and self._conversation[:2] == (conversation, verdict_id)
                and getattr(explainer, "_verdict", None) is self._conversation[2]
            )
            if follow:
                result = explainer.follow_up(question, on_text=on_text)
            else:
                result = explainer.explain(verdict, question, on_text=on_text)
            self._conversation = (conversation, verdict_id, getattr(explainer, "_verdict", None))
        out = result.to_json() if hasattr(result, "to_json") else {"text": str(result)}
        out["turn"] = "follow-up" if follow else "first"
        return out

    # -- system ----------------------------------------------------------------------------------
    def _versions(self) -> dict[str, Any]:
        import onnxruntime

        import anomalygpt_edge

        return {
            "version": anomalygpt_edge.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "onnxruntime": onnxruntime.__version__,
            "opencv": cv2.__version__,
            "uptime_s": round(time.time() - self._started, 1),
        }

    def _llm_status(self) -> dict[str, Any]:
        return {
            "loaded": self._explainer is not None,
            "error": self._explainer_error,
            "configured": self._explainer_factory is not None,
        }


def bundle_status(bundle: EngineBundle) -> dict[str, Any]:
    """The engine bundle as the system page shows it."""
    m = bundle.manifest
    return {
        "path": str(bundle.path),
        "sha256": bundle.sha256,
        "source": m.source,
        "exporter": m.exporter,
        "created_at": m.created_at,
        "schema_version": m.schema_version,
    }


def make_record(
    camera: str,
    verdict: Verdict,
    frame_seq: int | None,
    captured_at: float,
    verdict_id: str | None = None,
    message: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The history record of one verdict: the published message when there is one, else the verdict's JSON."""
    base = dict(message) if message is not None else verdict.to_json()
    return {
        **base,
        "id": verdict_id or uuid.uuid4().hex,
        "camera": camera,
        "recipe": verdict.recipe,
        "verdict": verdict.verdict,
        "regions": base.get("regions", [r.to_json() for r in verdict.regions]),
        "sentence": verdict.sentence,
        "frame_seq": frame_seq,
        "captured_at": _iso(captured_at),
        "ts": captured_at,
        "explanation": None,
    }


@dataclass
class _CameraState:
    spec: CameraSpec
    grabber: FrameGrabber
    recipe: str | None = None
    inspect_fps: float = 5.0
    done_seq: int = 0
    error: str | None = None


class LocalStation(StationBase):
    """A :class:`Station` that runs its own cameras and inspection (no MQTT): grabbers, one
    inspection loop per camera, the recipe store and an enroller, and an optional LLM.

    ``explainer_factory`` returns an object with ``explain(verdict, question, on_text)`` and
    ``follow_up(question, on_text)`` (e.g. ``Explainer.default``); it is called once, on first use.
    ``explain_ng`` explains NG verdicts in the background for the history page.
    """

    def __init__(
        self,
        store: RecipeStore,
        bundle: EngineBundle,
        cameras: list[CameraSpec],
        bindings: dict[str, str] | None = None,
        inspect_fps: float = 5.0,
        explainer_factory: Callable[[], Any] | None = None,
        explain_ng: bool = False,
    ):
        super().__init__(store, explainer_factory)
        self.bundle = bundle
        self.enroller = Enroller(store, bundle)
        self._cams: dict[str, _CameraState] = {
            c.name: _CameraState(c, FrameGrabber(c), (bindings or {}).get(c.name), inspect_fps) for c in cameras
        }
        self._inspectors: dict[tuple[str, int, str], Inspector] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._explain_ng = explain_ng and explainer_factory is not None
        self._explain_queue: collections.deque[str] = collections.deque(maxlen=8)
        self._explain_event = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalStation:
        """Start grabbers and inspection loops."""
        for name, cam in self._cams.items():
            cam.grabber.start()
            t = threading.Thread(target=self._inspect_loop, args=(name,), name=f"inspect-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self._explain_ng:
            t = threading.Thread(target=self._explain_loop, name="station-explain", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._explain_event.set()
        for cam in self._cams.values():
            cam.grabber.stop()
        for t in self._threads:
            t.join(timeout=5)

    # -- cameras -------------------------------------------------------------------------------
    def camera_names(self) -> list[str]:
        return list(self._cams)

    def _cam(self, name: str) -> _CameraState:
        self._check_camera(name)
        return self._cams[name]

    def camera_recipe(self, camera: str) -> str | None:
        return self._cam(camera).recipe

    def enroller_for(self, camera: str | None) -> Enroller:
        return self.enroller

    def cameras(self) -> list[dict[str, Any]]:
        out = []
        for name, cam in self._cams.items():
            frame = cam.grabber.latest()
            roi = None
            if cam.recipe and self.store.exists(cam.recipe):
                roi = self.store.load(cam.recipe).roi
            out.append(
                {
                    "name": name,
                    "kind": cam.spec.kind,
                    "status": cam.grabber.status,
                    "recipe": cam.recipe,
                    "roi": list(roi) if roi else None,
                    "frame_size": list(frame.image.shape[1::-1]) if frame else None,
                    "frame_seq": frame.seq if frame else None,
                    "inspection_error": cam.error,
                    "skipped": cam.grabber.skipped,
                    "last_error": cam.grabber.last_error,
                    **self.log.rates(name),
                }
            )
        return out

    def latest_frame(self, camera: str) -> Frame:
        frame = self._cam(camera).grabber.latest()
        if frame is None:
            raise StationError(f"camera '{camera}' has no frame yet ({self._cams[camera].grabber.status})")
        return frame

    # -- inspection ----------------------------------------------------------------------------
    def _inspector(self, name: str) -> Inspector:
        recipe = self.store.load(name)
        key = (name, recipe.bank_version, recipe.updated_at)
        with self._lock:
            ins = self._inspectors.get(key)
        if ins is None:
            pipeline = self.enroller.pipeline  # one set of engines for every camera and the enroller
            ins = Inspector(self.bundle, recipe, self.store, pipeline)
            with self._lock:
                self._inspectors = {k: v for k, v in self._inspectors.items() if k[0] != name}
                self._inspectors[key] = ins
        return ins

    def _inspect_loop(self, name: str) -> None:
        cam = self._cams[name]
        period = 1.0 / cam.inspect_fps
        while not self._stop.wait(period):
            frame = cam.grabber.latest()
            if cam.recipe is None or frame is None or frame.seq == cam.done_seq:
                continue
            cam.done_seq = frame.seq
            try:
                self._inspect(name, cam, frame)
                cam.error = None
            except (RecipeError, ImageError) as exc:  # not live yet, ROI off the frame: say so on the page
                cam.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything one frame does
                cam.error = f"{type(exc).__name__}: {exc}"
                log.exception("inspection on %s failed", name)

    def _inspect(self, name: str, cam: _CameraState, frame: Frame) -> None:
        assert cam.recipe is not None
        inspector = self._inspector(cam.recipe)
        t0 = time.perf_counter()
        verdict = inspector.inspect(frame.image, f"{name}#{frame.seq}")
        record = make_record(name, verdict, frame.seq, frame.captured_at)
        record["latency_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 3)
        roi_image = crop_roi(frame.image, inspector.recipe.roi, name)
        keep = verdict.verdict != "OK" or frame.seq % KEEP_OK_IMAGE_EVERY == 0
        self.log.add(record, roi_image, verdict, keep)
        if self._explain_ng and verdict.verdict == "NG":
            self._explain_queue.append(record["id"])
            self._explain_event.set()

    def _explain_loop(self) -> None:
        # Explanations run here, never in the inspection loop: a slow LLM must not delay verdicts.
        while not self._stop.is_set():
            self._explain_event.wait(1.0)
            self._explain_event.clear()
            while self._explain_queue and not self._stop.is_set():
                vid = self._explain_queue.pop()  # newest first; older ones may be dropped by maxlen
                try:
                    record = self.history_item(vid)
                    explainer = self._get_explainer()
                    with self._llm_lock:
                        result = explainer.explain(verdict_from_record(record), on_text=None)
                    self.log.explain(vid, result.text)
                except Exception as exc:  # noqa: BLE001 - an LLM failure leaves the record unexplained
                    log.warning("explanation of %s failed: %s", vid, exc)

    def assign(self, camera: str, recipe: str | None) -> dict[str, Any]:
        cam = self._cam(camera)
        if recipe is not None:
            r = self.store.load(recipe)
            if not r.live:
                raise StationError(f"recipe {recipe} is not live yet: finish its enrollment first")
        cam.recipe = recipe
        cam.error = None
        return {"camera": camera, "recipe": recipe}

    # -- system ----------------------------------------------------------------------------------
    def system(self) -> dict[str, Any]:
        engines = {f"{g}/{p}": e.describe() for (g, p), e in list(self.bundle._engines.items())}
        return {
            **self._versions(),
            "bundle": bundle_status(self.bundle),
            "backend": self.bundle.backend,
            "engines": engines,
            "cameras": self.cameras(),
            "spool_depth": None,
            "broker": {"connected": None, "note": "standalone station: no MQTT broker attached"},
            "llm": self._llm_status(),
        }


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


def _mask_array(data: bytes, shape: tuple[int, int], label: str) -> np.ndarray:
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


def _place_in_frame(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """``image`` (an ROI crop) at the ROI's offset in a zero canvas, so cropping the ROI gives it back."""
    if roi is None:
        return image
    x, y, w, h = roi
    if image.shape[:2] != (h, w):
        raise StationError(f"stored sample is {image.shape[1]}x{image.shape[0]}, the recipe's ROI is {w}x{h}")
    canvas = np.zeros((y + h, x + w, *image.shape[2:]), image.dtype)
    canvas[y : y + h, x : x + w] = image
    return canvas
