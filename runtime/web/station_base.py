"""What every station shares: recipes and enrollment through an ``Enroller``, the verdict log,
and ``ask`` through an explainer. :class:`~anomalygpt_edge.runtime.web.daemon_station.DaemonStation`
(the one runtime: the line daemon, with or without an MQTT broker) says where frames, cameras and
engines come from.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import cv2

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import crop_roi, decode_image
from anomalygpt_edge.runtime.delivery.archive_labels import UnknownVerdict
from anomalygpt_edge.runtime.recipes.enrollment import Enroller, LabelledImage
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore
from anomalygpt_edge.runtime.web import enroll_ops
from anomalygpt_edge.runtime.web.enroll_ops import UploadLedger, mask_array, place_in_frame, recipe_state
from anomalygpt_edge.runtime.web.records import VerdictLog, jpeg, verdict_from_record
from anomalygpt_edge.runtime.web.station_protocol import (
    DefectUpload,
    Frame,
    HistoryQuery,
    NotFoundError,
    StationError,
)


class StationBase:
    """What every station shares: recipes and enrollment through an ``Enroller``, the verdict log,
    and ``ask`` through an explainer. A subclass (the daemon's station) says where frames, cameras
    and engines come from."""

    def __init__(self, store: RecipeStore, explainer_factory: Callable[[], Any] | None = None):
        self.store = store
        self.log = VerdictLog()
        self._enroll_lock = threading.Lock()  # an enroller rebuilds one recipe at a time
        self._last_capture: dict[tuple[str, str], int] = {}
        self._uploads = UploadLedger()  # upload bytes -> the sample they became, to skip repeats
        self._explainer_factory = explainer_factory
        self._explainer: Any = None
        self._explainer_error: str | None = None
        self._llm_lock = threading.Lock()
        self._conversation: tuple[str, str, Any] | None = None
        self._started = time.time()

    # -- what a subclass provides ------------------------------------------------------------------
    def camera_names(self) -> list[str]:
        """The station's cameras, by name."""
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
        """The enroller for ``camera``'s engines (None: the default bundle's)."""
        raise NotImplementedError

    def camera_recipe(self, camera: str) -> str | None:
        """The recipe ``camera`` inspects with, or None."""
        raise NotImplementedError

    def assign(self, camera: str, recipe: str | None) -> dict[str, Any]:
        """Make ``recipe`` the one ``camera`` inspects with."""
        raise NotImplementedError

    # -- cameras -------------------------------------------------------------------------------
    def _check_camera(self, camera: str) -> None:
        if camera not in self.camera_names():
            raise NotFoundError(f"no camera '{camera}' (cameras: {', '.join(self.camera_names()) or 'none'})")

    def latest_jpeg(self, camera: str) -> bytes:
        return jpeg(self.latest_frame(camera).image)

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
                if roi is not None and roi != current.roi:
                    if current.samples:
                        raise StationError(
                            f"recipe {recipe} already has {len(current.samples)} golden samples taken with "
                            f"ROI {current.roi}; remove them or create a new recipe to change the ROI"
                        )
                    self.store.commit(replace(current, roi=roi))
            else:
                enroller.create(recipe, roi=roi, **settings)
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

    def _screen(self, recipe: str, files: list[tuple[str, bytes]]) -> enroll_ops.Screened:
        """The upload's files minus repeats, hashed before anything is decoded (see enroll_ops)."""
        current = self.store.load(recipe)
        # A file already enrolled as a golden sample or as a labelled defect is skipped undecoded.
        enrolled = {s.sha256 for s in current.samples} | {d.sha256 for d in current.defects}
        return enroll_ops.screen_uploads(files, enrolled, self._uploads.known(recipe))

    def _upload_step(self, recipe: str, screened: enroll_ops.Screened, result: Any, new: list[str]) -> dict[str, Any]:
        self._uploads.remember(recipe, screened.hashes, new, bool(result.skipped))
        result.skipped = screened.skipped + list(result.skipped)
        return self._step(recipe, result)

    def enroll_upload(self, recipe: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        screened = self._screen(recipe, files)
        # Decoded only after every file was hashed: an oversized or broken file is refused
        # (naming it) before a pixel is allocated, a duplicate costs a hash.
        images = [
            (label, enroll_ops.decode_golden(files[i][0], files[i][1]))
            for i, label in zip(screened.indices, screened.labels)
        ]
        with self._enroll_lock:
            before = {s.sha256 for s in self.store.load(recipe).samples}
            result = self.enroller_for(None).add(recipe, images)
        new = [s.sha256 for s in result.recipe.samples if s.sha256 not in before]
        return self._upload_step(recipe, screened, result, new)

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
        screened = self._screen(recipe, [(f.name, f.data) for f in files])
        # As for golden uploads; the mask's header is checked before its pixels exist too.
        items = [enroll_ops.decode_defect(files[i], label) for i, label in zip(screened.indices, screened.labels)]
        with self._enroll_lock:
            before = {d.sha256 for d in self.store.load(recipe).defects}
            result = self.enroller_for(None).add_defects(recipe, items)
        new = [d.sha256 for d in result.recipe.defects if d.sha256 not in before]
        return self._upload_step(recipe, screened, result, new)

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
            painted = None if mask is None else mask_array(mask, image.shape[:2], golden.name)
            frame = place_in_frame(image, r.roi)
            frame_mask = None if painted is None else place_in_frame(painted, r.roi)
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
    def labels_archive(self, flush: bool = False) -> Any:
        """The archive that holds verdict labels: none here (the daemon's station has one)."""
        return None

    def _labels(self, flush: bool = False) -> Any:
        archive = self.labels_archive(flush)
        if archive is None:
            raise StationError("labels are kept in the line daemon's archive, and this station has none")
        return archive

    def label_verdict(
        self, verdict_id: str, label: str, author: str, defect_type: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Label an archived verdict (``source: station``); the row, and ``image``: whether its image is kept.
        Raises NotFoundError for an unknown id, StationError for a bad field, LabelWriteError when not stored."""
        args = {"author": author, "source": "station", "defect_type": defect_type, "note": note}
        try:
            try:
                row = self._labels().add_label(verdict_id, label, **args)
            except UnknownVerdict:  # a verdict just shown may still wait in the archive's queue
                row = self._labels(flush=True).add_label(verdict_id, label, **args)
        except UnknownVerdict as exc:
            raise NotFoundError(str(exc)) from None
        except ValueError as exc:
            raise StationError(str(exc)) from None
        self._after_label(verdict_id, row.at)
        out: dict[str, Any] = row.to_json()
        out["image"] = self._labels().verdict_image(verdict_id) is not None  # an unkept OK image cannot come back
        return out

    def _after_label(self, verdict_id: str, at: float) -> None:
        """A label was stored (the daemon's station passes it to the drift watch and the proposal desk)."""

    def verdict_labels(self, verdict_id: str) -> list[dict[str, Any]]:
        """Every label of one archived verdict, oldest first."""
        archive = self._labels()
        if not archive.known_verdicts([verdict_id]):
            raise NotFoundError(f"no verdict '{verdict_id}' in the archive")
        return [x.to_json() for x in archive.label_history(verdict_id)]

    def current_labels(self, verdict_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The current label of each of these verdicts that has one (none without an archive)."""
        archive = self.labels_archive()
        if archive is None or not verdict_ids:
            return {}
        return {k: v.to_json() for k, v in archive.current_labels(verdict_ids).items()}

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
            last = self._conversation
            follow = False
            if (
                last is not None
                and last[:2] == (conversation, verdict_id)
                and getattr(explainer, "_verdict", None) is last[2]
            ):
                follow = True
                # The explainer re-checks under its own lock: the worker may explain another part in between.
                result = explainer.follow_up(question, on_text=on_text, verdict=last[2])
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
