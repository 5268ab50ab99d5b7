"""Inspector: one recipe's engines, bank and threshold, turning images into Verdicts."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import Prepared, map_to_source
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
from anomalygpt_edge.runtime.inspection.verdict import Region, Verdict, anomaly_sentence, location_word
from anomalygpt_edge.runtime.recipes.store import (
    USES_BANK,
    USES_TEXT,
    Recipe,
    RecipeError,
    RecipeStore,
    text_features_for,
)

MAX_REGIONS = 8
log = logging.getLogger(__name__)


class Inspector:
    """Decides OK/NG for images of one recipe. Cheap to call repeatedly; engines are shared."""

    def __init__(
        self, bundle: EngineBundle, recipe: Recipe, store: RecipeStore, pipeline: VisionPipeline | None = None
    ):
        if not recipe.live or recipe.threshold is None:  # live means it has one; said so the type narrows
            raise RecipeError(
                f"recipe {recipe.name} is not live: "
                + (
                    "enroll golden parts first"
                    if not recipe.samples
                    else "its golden-sample quality check failed "
                    "or it has too few samples; see `anomalygpt-edge enroll --recipe " + recipe.name + "`"
                )
            )
        if recipe.bundle_sha256 != bundle.sha256:
            raise RecipeError(
                f"recipe {recipe.name} was enrolled with another engine bundle or encoder precision (this is "
                f"{getattr(bundle, 'precision', 'fp32')}); re-enroll it"
            )
        self.bundle = bundle
        self.recipe = recipe
        self.pipeline = pipeline or VisionPipeline(bundle)
        self.threshold = recipe.threshold.value
        widths = {layer.name: layer.dim for layer in bundle.manifest.patch_layers}
        self.bank = store.load_bank(recipe, widths).layers if recipe.source in USES_BANK else None
        self.head = store.load_head(recipe, self.pipeline.feature_dim) if recipe.source == "bank" else None
        self.text_features = None
        if recipe.source in USES_TEXT:
            self.text_features = text_features_for(recipe, bundle)

    @classmethod
    def from_store(
        cls, store_dir: Path | str, recipe_name: str, bundle_dir: Path | str | None = None, backend: str = "auto"
    ) -> Inspector:
        """Open the recipe and its bundle (the recipe's recorded bundle unless ``bundle_dir`` is given)."""
        store = RecipeStore(store_dir)
        recipe = store.load(recipe_name)
        bundle = EngineBundle.open(bundle_dir or recipe.bundle_path, backend=backend)
        return cls(bundle, recipe, store)

    def inspect(self, image: np.ndarray, name: str = "image") -> Verdict:
        """Verdict for one camera image (BGR or gray, full frame; the recipe's ROI is applied)."""
        return self.inspect_batch([image], [name])[0]

    def inspect_batch(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[Verdict]:
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        t0 = time.perf_counter()
        prepared = [self.pipeline.prepare(im, self.recipe.roi, self.recipe.resize, n) for im, n in zip(images, names)]
        t1 = time.perf_counter()
        maps = self.pipeline.timed_maps(prepared, self.bank, self.text_features, self.head)
        timings = {"preprocess": (t1 - t0) * 1e3, **self.pipeline.last_timings}
        verdicts = []
        for amap, prep in zip(maps, prepared):
            t2 = time.perf_counter()
            verdict = self.decide(amap, prep)
            verdict.latency_ms = {
                **{k: v / len(prepared) for k, v in timings.items()},
                "decide": (time.perf_counter() - t2) * 1e3,
            }
            verdicts.append(verdict)
        return verdicts

    def maps(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Anomaly maps (B, H, W) of encoded images by this recipe's bank, text features and head."""
        p = self.pipeline
        if self.bank is not None and self.text_features is not None:
            return p.combined_maps(features, self.bank, self.text_features)
        if self.bank is not None:
            return p.bank_maps(features, self.bank, self.head)
        assert self.text_features is not None
        return p.text_maps(features, self.text_features)

    def decide(self, anomaly_map: np.ndarray, prepared: Prepared) -> Verdict:
        """Score by the bundle's rule (max of the map by default); NG above the threshold, regions located.

        A score that is not a finite number is never OK (``NaN > threshold`` is False): it is an ERROR
        verdict with the reason, so a damaged engine or bank fails safe.
        """
        score = self.pipeline.image_score(anomaly_map)
        if not np.isfinite(score):
            return Verdict.error(
                self.recipe.name,
                f"anomaly score is {score} (not a finite number): engine or memory bank output is damaged",
                bank_version=self.recipe.bank_version,
                bundle_sha256=self.bundle.sha256,
            )
        source_map = map_to_source(anomaly_map, prepared)
        ng = score > self.threshold
        regions = find_regions(source_map, self.threshold) if ng else []
        if ng and not regions:  # peak fell outside the source image (letterbox padding): locate it anyway
            py, px = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
            h, w = anomaly_map.shape
            regions = [
                Region(
                    (0, 0, prepared.source_size[1], prepared.source_size[0]),
                    0.0,
                    score,
                    location_word(px + 0.5, py + 0.5, w, h),
                )
            ]
        return Verdict(
            verdict="NG" if ng else "OK",
            score=score,
            threshold=self.threshold,
            recipe=self.recipe.name,
            regions=regions,
            sentence=anomaly_sentence([r.location for r in regions]) if ng else anomaly_sentence([]),
            bank_version=self.recipe.bank_version,
            bundle_sha256=self.bundle.sha256,
            anomaly_map=source_map,
            image_size=prepared.source_size,
        )


def inspect_many(items: Sequence[tuple[Inspector, np.ndarray, str]]) -> list[Verdict]:
    """One verdict per ``(inspector, image, name)``, in order: the micro-batched path of the line.

    Images whose inspectors share a pipeline (one bundle) go through one encoder run; each recipe's
    bank is then matched against its own images in one matcher run. A failure fails only what it
    touched: an image that cannot be prepared, every image of a failed encoder run, every image of
    a recipe whose matching failed. Each becomes an explicit ERROR verdict, never a missing one.
    """
    verdicts: list[Verdict | None] = [None] * len(items)
    prepared: dict[int, Prepared] = {}
    pre_ms: dict[int, float] = {}
    for i, (inspector, image, name) in enumerate(items):
        t0 = time.perf_counter()
        try:
            prepared[i] = inspector.pipeline.prepare(image, inspector.recipe.roi, inspector.recipe.resize, name)
        except Exception as exc:  # one bad image must not fail its batch mates
            verdicts[i] = _failed(inspector, name, exc)
        pre_ms[i] = (time.perf_counter() - t0) * 1e3
    by_pipeline: dict[int, list[int]] = {}
    for i in prepared:
        by_pipeline.setdefault(id(items[i][0].pipeline), []).append(i)
    for indices in by_pipeline.values():
        for i, verdict in _encode_and_match(items, indices, prepared).items():
            verdict.latency_ms = {"preprocess": pre_ms[i], **verdict.latency_ms}
            verdicts[i] = verdict
    missing = RuntimeError("no result")  # cannot happen; an answer is owed all the same
    return [v if v is not None else _failed(items[i][0], items[i][2], missing) for i, v in enumerate(verdicts)]


def _failed(inspector: Inspector, name: str, exc: BaseException) -> Verdict:
    log.error("%s: inspection failed: %r", name, exc)
    return Verdict.error(
        inspector.recipe.name,
        f"inspection failed: {exc}",
        bank_version=inspector.recipe.bank_version,
        bundle_sha256=inspector.bundle.sha256,
    )


def _encode_and_match(
    items: Sequence[tuple[Inspector, np.ndarray, str]], indices: list[int], prepared: dict[int, Prepared]
) -> dict[int, Verdict]:
    """Verdicts for ``indices`` (one pipeline): one encoder run, then one matcher run per inspector."""
    pipeline = items[indices[0]][0].pipeline
    t0 = time.perf_counter()
    try:
        features = pipeline.encode([prepared[i] for i in indices])
    except Exception as exc:  # the engine failed for the whole batch: every part in it is answered ERROR
        return {i: _failed(items[i][0], items[i][2], exc) for i in indices}
    encoder_ms = (time.perf_counter() - t0) * 1e3 / len(indices)
    groups: dict[int, list[int]] = {}
    for row, i in enumerate(indices):
        groups.setdefault(id(items[i][0]), []).append(row)
    out: dict[int, Verdict] = {}
    for rows in groups.values():
        inspector = items[indices[rows[0]]][0]
        t1 = time.perf_counter()
        try:
            maps = inspector.maps({k: v[rows] for k, v in features.items()})
        except Exception as exc:  # this recipe's matching failed: its parts only
            out.update({indices[r]: _failed(inspector, items[indices[r]][2], exc) for r in rows})
            continue
        matcher_ms = (time.perf_counter() - t1) * 1e3 / len(rows)
        for amap, r in zip(maps, rows):
            t2 = time.perf_counter()
            verdict = inspector.decide(amap, prepared[indices[r]])
            timings = {"encoder": encoder_ms, "matcher": matcher_ms, "decide": (time.perf_counter() - t2) * 1e3}
            verdict.latency_ms = timings
            out[indices[r]] = verdict
    return out


def find_regions(source_map: np.ndarray, pixel_threshold: float) -> list[Region]:
    """Connected components of ``map > pixel_threshold``, largest first, at most :data:`MAX_REGIONS`."""
    h, w = source_map.shape
    mask = (source_map > pixel_threshold).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        peak = float(source_map[labels == i].max())
        cx, cy = centroids[i]
        regions.append(Region((x, y, bw, bh), 100.0 * area / (h * w), peak, location_word(cx, cy, w, h)))
    regions.sort(key=lambda r: (-r.area_pct, -r.peak))
    return regions[:MAX_REGIONS]
