"""Golden-sample enrollment: features → memory bank → leave-one-out quality check → threshold.

Runs on the device with the bundle's engines (no torch). Incremental: samples can be added or
removed later; the bank, the quality check and the threshold are recomputed from the stored
per-sample features each time (encoding happens once per image).

Labelled defective parts (optional, with or without a painted mask) train the recipe's defect
head (:mod:`runtime.defect_head`), fused with the bank score; the threshold is then set on the
cross-fitted fused scores of the goldens, and the labelled defects say which escape rate it implies.

Every change runs under the recipe's writer lock (:meth:`RecipeStore.writer`): station, MQTT and
CLI enrollment of one recipe are serialised, within a process and across processes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes, sha256_bytes
from anomalygpt_edge.calibration.threshold import Threshold, expectations, fit_threshold, variety_warning
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError, Prepared, crop_roi
from anomalygpt_edge.runtime.inspection.defect_head import DefectHead, HeadError, LabelledDefect
from anomalygpt_edge.runtime.inspection.head_training import ScoredPart, fit_head
from anomalygpt_edge.runtime.inspection.memory_bank import MemoryBank, build_bank
from anomalygpt_edge.runtime.inspection.pipeline import ENCODE_BATCH, VisionPipeline

# The golden set's self-check is a module of its own.
from anomalygpt_edge.runtime.recipes.golden_check import (
    QualityReport,
    golden_parts,
    part_score,
    quality_report,
)
from anomalygpt_edge.runtime.recipes.store import (
    DEFECT_TYPE,
    USES_TEXT,
    DefectSample,
    GoldenSample,
    Recipe,
    RecipeError,
    RecipeStore,
    now_iso,
)

log = logging.getLogger(__name__)

#: ``on_progress(stage, done, total)``: how far a long step is ("encoding": images, "memory bank":
#: coreset picks, "defects": labelled parts), for a command line's bar; the daemon passes none.
OnProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LabelledImage:
    """A known-defective part to enroll: the camera image, optionally its defect mask (same size)."""

    label: str
    image: np.ndarray
    mask: np.ndarray | None = None  # bool, or 8-bit with defect where > 127 (soft-edged masks)
    defect_type: str | None = None


@dataclass
class EnrollmentResult:
    """What an enrollment step did, for the CLI, MQTT replies and the web page."""

    recipe: Recipe
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    quality: QualityReport | None = None
    threshold: Threshold | None = None
    seconds: float = 0.0
    bank: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] | None = None
    expectation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "recipe": r.name,
            "live": r.live,
            "k": len(r.samples),
            "defects": len(r.defects),
            "bank_version": r.bank_version,
            "added": self.added,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "bank": self.bank,
            "head": self.head,
            "quality": self.quality.to_json() if self.quality else None,
            "threshold": self.threshold.to_json() if self.threshold else None,
            "threshold_explained": self.threshold.explain() if self.threshold else None,
            "expectation": self.expectation,
        }


def augmentations(image: np.ndarray, allowed: Sequence[str]) -> list[np.ndarray]:
    """The image and its allowed rotations/flips (only for rotation/flip-invariant parts)."""
    out = [image]
    if "rot90" in allowed:
        out += [np.rot90(image, k).copy() for k in (1, 2, 3)]
    if "hflip" in allowed:
        out.append(image[:, ::-1].copy())
    if "vflip" in allowed:
        out.append(image[::-1].copy())
    return out


class Enroller:
    """Builds and maintains the memory bank and threshold of recipes in a store."""

    def __init__(self, store: RecipeStore, bundle: EngineBundle, pipeline: VisionPipeline | None = None):
        self.store = store
        self.bundle = bundle
        self.pipeline = pipeline or VisionPipeline(bundle)
        self.roi_applied = False  # True: images come cropped to the recipe's ROI already (proposals from the archive)

    # -- recipe lifecycle ---------------------------------------------------------------------
    def create(self, name: str, **settings: Any) -> Recipe:
        """A new, empty recipe (not live until golden parts are enrolled)."""
        with self.store.writer(name):  # two creators of one name: the second is told it exists
            return self._create(name, **settings)

    def _create(self, name: str, **settings: Any) -> Recipe:
        if self.store.exists(name):
            raise RecipeError(f"recipe '{name}' already exists")
        if settings.get("source") in USES_TEXT and not self.bundle.has("decoder"):
            raise RecipeError(f"recipe {name}: source '{settings['source']}' needs a bundle with AnomalyGPT's decoder")
        recipe = Recipe(
            name=name, bundle_sha256=self.bundle.sha256, bundle_path=str(self.bundle.path.resolve()), **settings
        )
        return self.store.commit(recipe)

    def open_or_create(self, name: str, **settings: Any) -> Recipe:
        """The recipe if it exists (refused when enrolled with another bundle), else a new one."""
        with self.store.writer(name):
            return self._open_or_create(name, **settings)

    def _open_or_create(self, name: str, **settings: Any) -> Recipe:
        if self.store.exists(name):
            recipe = self.store.load(name)
            if recipe.bundle_sha256 != self.bundle.sha256:
                raise RecipeError(
                    f"recipe {name} was enrolled with bundle {recipe.bundle_sha256[:12]}, this is "
                    f"{self.bundle.sha256[:12]}; re-enroll it into a new recipe"
                )
            return recipe
        return self._create(name, **settings)

    # -- samples ------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        images: Sequence[tuple[str, np.ndarray]],
        accept_flagged: bool = False,
        on_progress: OnProgress | None = None,
    ) -> EnrollmentResult:
        """Encode and store new golden images, then rebuild bank, quality check and threshold.

        ``on_progress(stage, done, total)`` hears of the encoding (augmented views included) and the bank.
        """
        with self.store.writer(name):
            return self._add(name, images, accept_flagged, on_progress)

    def _add(
        self,
        name: str,
        images: Sequence[tuple[str, np.ndarray]],
        accept_flagged: bool,
        on_progress: OnProgress | None = None,
    ) -> EnrollmentResult:
        t0 = time.perf_counter()
        recipe = self.store.load(name)
        known = {s.sha256 for s in recipe.samples} | {d.sha256 for d in recipe.defects}
        new: list[GoldenSample] = []
        prepared, owners, result_skipped = [], [], []
        for label, image in images:
            roi_image = crop_roi(image, None if self.roi_applied else recipe.roi, label)
            png = _png_bytes(roi_image, label)
            sha = sha256_bytes(png)
            if sha in known:
                result_skipped.append(f"{label}: already enrolled")
                continue
            known.add(sha)
            atomic_write_bytes(self.store.sample_path(name, sha, "png"), png)
            for aug in augmentations(roi_image, recipe.augment):
                prepared.append(self.pipeline.prepare(aug, None, recipe.resize, label))
                owners.append(sha)
            new.append(GoldenSample(sha256=sha, name=label, added_at=now_iso()))
        if prepared:
            feats = self._encode(prepared, on_progress)
            for sample in new:
                rows = [i for i, o in enumerate(owners) if o == sample.sha256]
                self._save_features(name, sample.sha256, {k: v[rows] for k, v in feats.items()})
        recipe = replace(recipe, samples=recipe.samples + tuple(new))
        result = self._rebuild(recipe, accept_flagged, on_progress)
        result.added = [s.name for s in new]
        result.skipped = result_skipped
        result.seconds = time.perf_counter() - t0
        return result

    def _encode(self, prepared: Sequence[Prepared], on_progress: OnProgress | None) -> dict[str, np.ndarray]:
        """``pipeline.encode`` of ``prepared``, in its own batches so that ``on_progress`` hears of each one."""
        if on_progress is None:
            return self.pipeline.encode(prepared)
        chunks: list[dict[str, np.ndarray]] = []
        on_progress("encoding", 0, len(prepared))
        for i in range(0, len(prepared), ENCODE_BATCH):  # the same batches encode() makes: the same features
            chunks.append(self.pipeline.encode(prepared[i : i + ENCODE_BATCH]))
            on_progress("encoding", min(i + ENCODE_BATCH, len(prepared)), len(prepared))
        return {n: np.concatenate([c[n] for c in chunks]) for n in chunks[0]}

    def add_defects(
        self,
        name: str,
        items: Sequence[LabelledImage],
        accept_flagged: bool = False,
        on_progress: OnProgress | None = None,
    ) -> EnrollmentResult:
        """Store labelled defective parts (and their masks), then rebuild with a trained defect head.

        ``on_progress(stage, done, total)`` hears of each defect stored (encoded) and of the bank.
        """
        with self.store.writer(name):
            t0 = time.perf_counter()
            recipe = self.store.load(name)
            if recipe.source != "bank":
                raise RecipeError(f"recipe {name}: labelled defects need the few-shot bank source")
            known = {s.sha256 for s in recipe.samples} | {d.sha256 for d in recipe.defects}
            new, skipped = [], []
            if on_progress is not None:
                on_progress("defects", 0, len(items))
            for done, item in enumerate(items, 1):
                sample = self._store_defect(recipe, item, known)
                if on_progress is not None:
                    on_progress("defects", done, len(items))
                if sample is None:
                    skipped.append(f"{item.label}: already enrolled")
                    continue
                known.add(sample.sha256)
                new.append(sample)
            result = self._rebuild(replace(recipe, defects=recipe.defects + tuple(new)), accept_flagged, on_progress)
            result.added, result.skipped = [d.name for d in new], skipped
            result.seconds = time.perf_counter() - t0
            return result

    def _store_defect(self, recipe: Recipe, item: LabelledImage, known: set[str]) -> DefectSample | None:
        """Write one defect's PNG, mask and features; None when the same image is already enrolled."""
        if item.defect_type is not None and not DEFECT_TYPE.match(item.defect_type):
            raise RecipeError(f"{item.label}: defect type {item.defect_type!r} is invalid (letters, digits, _ .-)")
        roi_image = crop_roi(item.image, None if self.roi_applied else recipe.roi, item.label)
        png = _png_bytes(roi_image, item.label)
        sha = sha256_bytes(png)
        if sha in known:
            return None
        prep = self.pipeline.prepare(roi_image, None, recipe.resize, item.label)
        feats = self.pipeline.encode([prep])
        coverage = None
        if item.mask is not None:
            full = np.asarray(item.mask)
            if full.shape[:2] != item.image.shape[:2]:
                raise ImageError(
                    f"{item.label}: mask is {full.shape[1]}x{full.shape[0]}, image is "
                    f"{item.image.shape[1]}x{item.image.shape[0]}"
                )
            mask = crop_roi(full, None if self.roi_applied else recipe.roi, f"{item.label} mask")
            flat = mask.reshape(mask.shape[0], mask.shape[1], -1).max(-1)
            binary = (flat if flat.dtype == bool else flat > 127).astype(np.uint8) * 255
            if not binary.any():
                raise ImageError(f"{item.label}: the mask marks no defect pixels (inside the recipe's ROI)")
            atomic_write_bytes(self.store.defect_path(recipe.name, sha, "mask.png"), _png_bytes(binary, item.label))
            coverage = patch_coverage(binary > 0, prep, self.pipeline.grid)
        atomic_write_bytes(self.store.defect_path(recipe.name, sha, "png"), png)
        arrays = {f"layer_{i}": v.astype(np.float16) for i, v in enumerate(feats.values())}
        if coverage is not None:
            arrays["coverage"] = coverage.astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)  # named: the reader refuses pickles; numpy's stubs need it
        atomic_write_bytes(self.store.defect_path(recipe.name, sha, "npz"), buf.getvalue())
        return DefectSample(sha, item.label, now_iso(), item.defect_type, coverage is not None)

    def remove(self, name: str, which: str, accept_flagged: bool = False) -> EnrollmentResult:
        """Remove one golden sample or labelled defect (by file name or sha256 prefix) and rebuild."""
        with self.store.writer(name):
            t0 = time.perf_counter()
            recipe = self.store.load(name)

            def hits(items: Sequence[GoldenSample | DefectSample]) -> list[GoldenSample | DefectSample]:
                return [s for s in items if s.name == which or (len(which) >= 8 and s.sha256.startswith(which))]

            golden, defects = hits(recipe.samples), hits(recipe.defects)
            if len(golden) + len(defects) != 1:
                names = ", ".join([s.name for s in recipe.samples] + [d.name for d in recipe.defects]) or "none"
                raise RecipeError(
                    f"recipe {name}: no single golden sample '{which}' or labelled defect (samples: {names})"
                )
            recipe = replace(
                recipe,
                samples=tuple(s for s in recipe.samples if s not in golden),
                defects=tuple(d for d in recipe.defects if d not in defects),
            )
            result = self._rebuild(recipe, accept_flagged)
            result.seconds = time.perf_counter() - t0
            return result

    def rebuild(self, name: str, accept_flagged: bool = False) -> EnrollmentResult:
        with self.store.writer(name):
            return self._rebuild(self.store.load(name), accept_flagged)

    # -- internals ----------------------------------------------------------------------------
    def _save_features(self, name: str, sha: str, feats: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **{f"layer_{i}": v.astype(np.float16) for i, v in enumerate(feats.values())})
        atomic_write_bytes(self.store.sample_path(name, sha, "npz"), buf.getvalue())

    def _load_features(self, name: str, sha: str) -> dict[str, np.ndarray]:
        return _read_features(self.store.sample_path(name, sha, "npz"), self.pipeline)[0]

    def _load_defect(self, name: str, sample: DefectSample) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        return _read_features(self.store.defect_path(name, sample.sha256, "npz"), self.pipeline)

    def _bank(
        self, recipe: Recipe, feats: list[dict[str, np.ndarray]], on_progress: OnProgress | None = None
    ) -> tuple[dict, dict[str, Any], MemoryBank]:
        """The memory bank of every golden sample's features, with its build record."""
        picks = (lambda done, total: on_progress("memory bank", done, total)) if on_progress is not None else None
        layers, info = build_bank(
            [{n: f[n] for n in self.pipeline.layer_names} for f in feats], recipe.bank_budget, on_progress=picks
        )
        bank = MemoryBank(
            layers,
            {
                "bundle_sha256": self.bundle.sha256,
                "k": len(recipe.samples),
                "augment": list(recipe.augment),
                "samples": [s.sha256 for s in recipe.samples],
                "created_at": now_iso(),
                **info,
            },
        )
        return layers, info, bank

    def _rebuild(self, recipe: Recipe, accept_flagged: bool, on_progress: OnProgress | None = None) -> EnrollmentResult:
        """Bank from all samples, LOO / k-fold scores, quality check, defect head, threshold; one commit."""
        if not recipe.samples:
            recipe = self.store.commit(
                replace(recipe, bank_file=None, threshold=None, quality={}, head_file=None, bank_record=None)
            )
            return EnrollmentResult(recipe)
        feats = [self._load_features(recipe.name, s.sha256) for s in recipe.samples]
        layers, info, bank = self._bank(recipe, feats, on_progress)
        parts, method = self.golden_parts(recipe, feats)
        quality = self.quality_report(recipe, {s.name: self._part_score(p) for s, p in zip(recipe.samples, parts)})
        quality.method = method
        head, head_info, defect_scores = None, None, np.array([])
        normal = np.array([quality.scores[s.name] for s in recipe.samples if s.name in quality.scores])
        if recipe.defects and len(parts) >= 2:
            head, fit = self._train_head(recipe, layers, parts)
            normal, defect_scores = fit.golden_scores, fit.defect_scores
            head_info = {**fit.info, "seconds": round(fit.seconds, 3), "defects_held_out": fit.defects_held_out}
        threshold = fit_threshold(normal, recipe.target_frr) if normal.size else None
        varied = variety_warning(np.array(list(quality.scores.values())), len(recipe.samples))
        expectation = {}
        if threshold is not None:
            expectation = expectations(
                threshold, normal, defect_scores, len(recipe.samples), [varied] if varied else []
            )
        go_live = threshold is not None and (quality.ok or accept_flagged)
        recipe = _scored(recipe, quality, normal, defect_scores, head is not None)
        recipe = replace(
            recipe,
            threshold=threshold if go_live else None,
            quality={
                **quality.to_json(),
                "accepted_flagged": bool(accept_flagged and not quality.ok),
                "expectation": expectation,
            },
        )
        recipe = self.store.commit(recipe, bank, head)
        return EnrollmentResult(
            recipe,
            quality=quality,
            threshold=threshold,
            bank={**info, "bytes": bank.nbytes()},
            head=head_info,
            expectation=expectation,
        )

    def _train_head(
        self, recipe: Recipe, bank: dict[str, np.ndarray], golden: list[ScoredPart]
    ) -> tuple[DefectHead, Any]:
        """Cross-fitted defect head from the recipe's labelled defects against the full bank."""
        loaded = [self._load_defect(recipe.name, d) for d in recipe.defects]
        query = {n: np.stack([f[n][0] for f, _ in loaded]) for n in self.pipeline.feature_names}
        raw, patch_scores = self.pipeline.bank_raw(query, bank)
        patches = self.pipeline.patches(query)
        defects = [ScoredPart(raw[j], patch_scores[j], patches[j][None]) for j in range(len(loaded))]
        labels = [LabelledDefect(d.patches, cov) for d, (_, cov) in zip(defects, loaded)]
        try:
            fit = fit_head(self.pipeline, golden, defects, labels)
        except HeadError as exc:
            raise RecipeError(f"recipe {recipe.name}: defect head cannot be trained: {exc}") from exc
        return fit.head, fit

    def _part_score(self, part: ScoredPart) -> float:
        return part_score(self.pipeline, part)

    def golden_parts(self, recipe: Recipe, feats: list[dict[str, np.ndarray]]) -> tuple[list[ScoredPart], str]:
        """Each golden sample scored as the live recipe would score a new good part, unsmoothed."""
        return golden_parts(self.pipeline, self.bundle, recipe, feats)

    def golden_scores(self, recipe: Recipe, feats: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], str]:
        """Image scores of :meth:`golden_parts`, by sample name."""
        parts, method = self.golden_parts(recipe, feats)
        return {s.name: self._part_score(p) for s, p in zip(recipe.samples, parts)}, method

    def quality_check(self, recipe: Recipe, feats: list[dict[str, np.ndarray]]) -> QualityReport:
        """Flag golden samples that score far above the others, and golden sets too spread to decide on."""
        scores, method = self.golden_scores(recipe, feats)
        report = self.quality_report(recipe, scores)
        report.method = method
        return report

    def quality_report(self, recipe: Recipe, scores: dict[str, float]) -> QualityReport:
        """The quality check on given leave-one-out scores (bank only: a defect head never hides an outlier)."""
        return quality_report(recipe, scores)


def _scored(
    recipe: Recipe, quality: QualityReport, normal: np.ndarray, defect_scores: np.ndarray, has_head: bool
) -> Recipe:
    """The recipe with each golden and defect sample's held-out score and flag, and its head file kept or not."""
    scored = {s.name: float(v) for s, v in zip(recipe.samples, normal)} if normal.size == len(recipe.samples) else {}
    samples = tuple(
        replace(
            s,
            score=scored.get(s.name),
            flagged=next((f["reason"] for f in quality.flagged if f["sha256"] == s.sha256), None),
        )
        for s in recipe.samples
    )
    defects = tuple(replace(d, score=float(v)) for d, v in zip(recipe.defects, defect_scores))
    return replace(
        recipe,
        samples=samples,
        defects=defects or recipe.defects,
        head_file=recipe.head_file if has_head else None,
    )


def _read_features(path: Any, pipeline: VisionPipeline) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A stored sample's features per layer (float32) and, for a masked defect, its patch coverage."""
    try:
        with np.load(path, allow_pickle=False) as data:
            feats = {n: data[f"layer_{i}"].astype(np.float32) for i, n in enumerate(pipeline.feature_names)}
            coverage = data["coverage"].astype(np.float32) if "coverage" in data.files else None
    except Exception as exc:
        raise RecipeError(f"{path}: sample features unreadable ({exc}); remove and re-add that sample") from exc
    for n, layer in zip(pipeline.feature_names, [*pipeline.manifest.patch_layers, *pipeline.manifest.head_layers]):
        if feats[n].ndim != 3 or feats[n].shape[-1] != layer.dim or not np.all(np.isfinite(feats[n])):
            raise RecipeError(f"{path}: sample features of layer {n} are damaged; remove and re-add that sample")
    return feats, coverage


def patch_coverage(mask: np.ndarray, prep: Prepared, grid: tuple[int, int]) -> np.ndarray:
    """Share of each encoder patch (``grid`` rows × cols) that a source-image mask covers, exactly.

    Each patch's rectangle is mapped back through the preprocessing window into source pixels and
    its mask area summed with an integral image, so a defect of a few pixels still covers its patch
    (a resampled mask would alias it away) and letterbox padding counts as not covered.
    """
    h, w = prep.pixel_values.shape[1:]
    x0, y0, x1, y1 = prep.window
    integral = cv2.integral(mask.astype(np.float64))  # (H+1, W+1)
    src_h, src_w = mask.shape
    ys = y0 + np.arange(grid[0] + 1) * (h / grid[0]) * (y1 - y0) / h
    xs = x0 + np.arange(grid[1] + 1) * (w / grid[1]) * (x1 - x0) / w
    yi = np.clip(np.round(ys).astype(int), 0, src_h)
    xi = np.clip(np.round(xs).astype(int), 0, src_w)
    area = np.outer(np.diff(ys), np.diff(xs))
    covered = integral[yi[1:]][:, xi[1:]] - integral[yi[:-1]][:, xi[1:]] - integral[yi[1:]][:, xi[:-1]]
    covered = covered + integral[yi[:-1]][:, xi[:-1]]
    return np.clip(covered / np.maximum(area, 1e-9), 0.0, 1.0).reshape(-1).astype(np.float32)


def _png_bytes(image: np.ndarray, label: str) -> bytes:
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError(f"{label}: empty image")
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ImageError(f"{label}: cannot be encoded as PNG")
    return buf.tobytes()
