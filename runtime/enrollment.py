"""Golden-sample enrollment: features → memory bank → leave-one-out quality check → threshold.

Runs on the device with the bundle's engines (no torch). Incremental: samples can be added or
removed later; the bank, the quality check and the threshold are recomputed from the stored
per-sample features each time (encoding happens once per image).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from anomalygpt_edge.calibration.threshold import Threshold, fit_threshold
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.integrity import atomic_write_bytes, sha256_bytes
from anomalygpt_edge.runtime.memory_bank import MemoryBank, build_bank
from anomalygpt_edge.runtime.preprocess import ImageError, crop_roi
from anomalygpt_edge.runtime.recipes import GoldenSample, Recipe, RecipeError, RecipeStore, now_iso
from anomalygpt_edge.runtime.vision import VisionPipeline

log = logging.getLogger(__name__)

#: Above this many golden samples, leave-one-out becomes k-fold with this many folds.
LOO_MAX = 32
KFOLD = 8
#: A sample is flagged when its score is this many robust standard deviations above the golden
#: median *and* at least OUTLIER_RATIO times that median: the ratio guard keeps a very tight golden
#: set (tiny MAD) from flagging ordinary part-to-part variation.
OUTLIER_Z = 3.5
OUTLIER_RATIO = 1.5
#: A golden set whose scores spread (p90 - p10) by more than this multiple of the median is inconsistent.
MAX_SPREAD = 1.5


@dataclass
class QualityReport:
    """Outcome of the golden-sample quality check."""

    scores: dict[str, float] = field(default_factory=dict)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    inconsistent: str | None = None
    method: str = "leave-one-out"

    @property
    def ok(self) -> bool:
        return not self.flagged and self.inconsistent is None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "method": self.method,
            "scores": self.scores,
            "flagged": self.flagged,
            "inconsistent": self.inconsistent,
        }


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

    def to_json(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "recipe": r.name,
            "live": r.live,
            "k": len(r.samples),
            "bank_version": r.bank_version,
            "added": self.added,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "bank": self.bank,
            "quality": self.quality.to_json() if self.quality else None,
            "threshold": self.threshold.to_json() if self.threshold else None,
            "threshold_explained": self.threshold.explain() if self.threshold else None,
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

    # -- recipe lifecycle ---------------------------------------------------------------------
    def create(self, name: str, **settings: Any) -> Recipe:
        """A new, empty recipe (not live until golden parts are enrolled)."""
        if self.store.exists(name):
            raise RecipeError(f"recipe '{name}' already exists")
        if settings.get("source") == "text" and not self.bundle.has("decoder"):
            raise RecipeError(f"recipe {name}: source 'text' needs a bundle with AnomalyGPT's decoder")
        recipe = Recipe(
            name=name, bundle_sha256=self.bundle.sha256, bundle_path=str(self.bundle.path.resolve()), **settings
        )
        return self.store.commit(recipe)

    def open_or_create(self, name: str, **settings: Any) -> Recipe:
        if self.store.exists(name):
            recipe = self.store.load(name)
            if recipe.bundle_sha256 != self.bundle.sha256:
                raise RecipeError(
                    f"recipe {name} was enrolled with bundle {recipe.bundle_sha256[:12]}, this is "
                    f"{self.bundle.sha256[:12]}; re-enroll it into a new recipe"
                )
            return recipe
        return self.create(name, **settings)

    # -- samples ------------------------------------------------------------------------------
    def add(
        self, name: str, images: Sequence[tuple[str, np.ndarray]], accept_flagged: bool = False
    ) -> EnrollmentResult:
        """Encode and store new golden images, then rebuild bank, quality check and threshold."""
        t0 = time.perf_counter()
        recipe = self.store.load(name)
        known = {s.sha256 for s in recipe.samples}
        new: list[GoldenSample] = []
        prepared, owners, result_skipped = [], [], []
        for label, image in images:
            roi_image = crop_roi(image, recipe.roi, label)
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
            feats = self.pipeline.encode(prepared)
            for sample in new:
                rows = [i for i, o in enumerate(owners) if o == sample.sha256]
                self._save_features(name, sample.sha256, {k: v[rows] for k, v in feats.items()})
        recipe = replace(recipe, samples=recipe.samples + tuple(new))
        result = self._rebuild(recipe, accept_flagged)
        result.added = [s.name for s in new]
        result.skipped = result_skipped
        result.seconds = time.perf_counter() - t0
        return result

    def remove(self, name: str, which: str, accept_flagged: bool = False) -> EnrollmentResult:
        """Remove one golden sample (by file name or sha256 prefix) and rebuild."""
        t0 = time.perf_counter()
        recipe = self.store.load(name)
        matches = [s for s in recipe.samples if s.name == which or (len(which) >= 8 and s.sha256.startswith(which))]
        if len(matches) != 1:
            names = ", ".join(s.name for s in recipe.samples) or "none"
            raise RecipeError(f"recipe {name}: no single golden sample '{which}' (samples: {names})")
        recipe = replace(recipe, samples=tuple(s for s in recipe.samples if s is not matches[0]))
        result = self._rebuild(recipe, accept_flagged)
        result.seconds = time.perf_counter() - t0
        return result

    def rebuild(self, name: str, accept_flagged: bool = False) -> EnrollmentResult:
        return self._rebuild(self.store.load(name), accept_flagged)

    # -- internals ----------------------------------------------------------------------------
    def _save_features(self, name: str, sha: str, feats: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{f"layer_{i}": v.astype(np.float16) for i, v in enumerate(feats.values())})
        atomic_write_bytes(self.store.sample_path(name, sha, "npz"), buf.getvalue())

    def _load_features(self, name: str, sha: str) -> dict[str, np.ndarray]:
        path = self.store.sample_path(name, sha, "npz")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {n: data[f"layer_{i}"].astype(np.float32) for i, n in enumerate(self.pipeline.layer_names)}
        except Exception as exc:
            raise RecipeError(
                f"{path}: golden-sample features unreadable ({exc}); remove and re-add that sample"
            ) from exc

    def _rebuild(self, recipe: Recipe, accept_flagged: bool) -> EnrollmentResult:
        """Bank from all samples, LOO / k-fold scores, quality check, threshold; one commit."""
        if not recipe.samples:
            recipe = self.store.commit(replace(recipe, bank_file=None, threshold=None, quality={}))
            return EnrollmentResult(recipe)
        feats = [self._load_features(recipe.name, s.sha256) for s in recipe.samples]
        layers, info = build_bank(feats, recipe.bank_budget)
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
        quality = self.quality_check(recipe, feats)
        samples = tuple(
            replace(
                s,
                score=quality.scores.get(s.name),
                flagged=next((f["reason"] for f in quality.flagged if f["sha256"] == s.sha256), None),
            )
            for s in recipe.samples
        )
        threshold = None
        if quality.scores:
            scores = np.array([v for v in quality.scores.values()])
            threshold = fit_threshold(scores, recipe.target_frr)
        go_live = threshold is not None and (quality.ok or accept_flagged)
        recipe = replace(
            recipe,
            samples=samples,
            threshold=threshold if go_live else None,
            quality={**quality.to_json(), "accepted_flagged": bool(accept_flagged and not quality.ok)},
        )
        recipe = self.store.commit(recipe, bank)
        return EnrollmentResult(recipe, quality=quality, threshold=threshold, bank={**info, "bytes": bank.nbytes()})

    def golden_scores(self, recipe: Recipe, feats: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], str]:
        """Normal scores of the golden samples, as the live recipe would score a new good part.

        Bank source: each sample against a bank of the others (leave-one-out, k-fold above LOO_MAX).
        Text source: each sample's zero-shot text-decoder score (no bank is involved).
        """
        k = len(feats)
        if recipe.source == "text":
            table = self.bundle.text_features()
            cls = recipe.class_name or self.bundle.manifest.text_features.get("default_class", "object")
            if cls not in table:
                raise RecipeError(f"recipe {recipe.name}: class '{cls}' has no text features in the bundle")
            query = {n: np.stack([f[n][0] for f in feats]) for n in self.pipeline.layer_names}
            maps = self.pipeline.text_maps(query, table[cls])
            return {s.name: float(m.max()) for s, m in zip(recipe.samples, maps)}, "zero-shot text decoder"
        if k < 2:
            return {}, "none: a single golden sample cannot be checked against others"
        folds = [[i] for i in range(k)] if k <= LOO_MAX else [list(range(f, k, KFOLD)) for f in range(KFOLD)]
        scores: dict[str, float] = {}
        rng = np.random.default_rng(0)
        for held in folds:
            rest = [feats[i] for i in range(k) if i not in held]
            bank = {
                n: np.concatenate([r[n].reshape(-1, r[n].shape[-1]) for r in rest]) for n in self.pipeline.layer_names
            }
            m = next(iter(bank.values())).shape[0]
            if m > recipe.bank_budget:  # random subsample for speed: scores run high, i.e. conservative
                idx = np.sort(rng.choice(m, recipe.bank_budget, replace=False))
                bank = {n: v[idx] for n, v in bank.items()}
            # Score the un-augmented view of each held-out sample (its first feature row).
            query = {n: np.stack([feats[i][n][0] for i in held]) for n in self.pipeline.layer_names}
            maps = self.pipeline.bank_maps(query, bank)
            for i, mp in zip(held, maps):
                scores[recipe.samples[i].name] = float(mp.max())
        return scores, "leave-one-out" if k <= LOO_MAX else f"{KFOLD}-fold"

    def quality_check(self, recipe: Recipe, feats: list[dict[str, np.ndarray]]) -> QualityReport:
        """Flag golden samples that score far above the others, and golden sets too spread to decide on."""
        k = len(feats)
        scores, method = self.golden_scores(recipe, feats)
        report = QualityReport(scores=scores, method=method)
        if not scores:
            return report
        values = np.array(list(scores.values()))
        med = float(np.median(values))
        mad = float(np.median(np.abs(values - med))) * 1.4826
        if k >= 4 and mad > 0:
            for s in recipe.samples:
                z = (scores[s.name] - med) / mad
                if z > OUTLIER_Z and scores[s.name] > OUTLIER_RATIO * med:
                    report.flagged.append(
                        {
                            "name": s.name,
                            "sha256": s.sha256,
                            "score": scores[s.name],
                            "reason": (
                                f"scores {scores[s.name]:.4g} against the other golden parts, {z:.1f} robust SDs "
                                f"above their median {med:.4g}: possibly a defective or different part"
                            ),
                        }
                    )
        if k >= 4 and med > 0:
            p10, p90 = np.percentile(values, [10, 90])
            if (p90 - p10) / med > MAX_SPREAD:
                report.inconsistent = (
                    f"golden scores spread from {p10:.4g} to {p90:.4g} (median {med:.4g}): the parts or the "
                    f"imaging differ too much to decide on; check lighting, ROI and part pose"
                )
        return report


def _png_bytes(image: np.ndarray, label: str) -> bytes:
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError(f"{label}: empty image")
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ImageError(f"{label}: cannot be encoded as PNG")
    return buf.tobytes()
