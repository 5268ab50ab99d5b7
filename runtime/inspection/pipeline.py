"""VisionPipeline: the engines of one bundle turned into anomaly maps (preprocess → encoder → matcher).

Shared by enrollment, inspection and evaluation so that every path scores images identically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import Prepared, crop_roi, preprocess
from anomalygpt_edge.runtime.inspection.defect_head import DefectHead

ENCODE_BATCH = 8
#: Image-score rules a manifest may name (``matching.image_score``): the map's maximum
#: (PatchCore, AnomalyGPT) or the mean of its top 1 % (AnomalyDINO).
IMAGE_SCORES = ("max", "mean_top_1pct")


def image_score(anomaly_map: np.ndarray, rule: str = "max") -> float:
    """One image's anomaly score from its map, by the bundle's rule."""
    if rule == "mean_top_1pct":
        flat = anomaly_map.ravel()
        top = max(1, flat.size // 100)
        return float(np.partition(flat, flat.size - top)[-top:].mean())
    return float(anomaly_map.max())


def upsample_aligned(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling with ``align_corners=True`` (B, h, w) → (B, H, W), as the bank matcher graph does.

    Linear, so a map fused from upsampled parts equals the upsampled fused patch scores.
    """

    def weights(n_out: int, n_in: int) -> np.ndarray:
        if n_in == 1 or n_out == 1:
            return np.ones((n_out, n_in), np.float32) / n_in
        src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
        lo = np.minimum(np.floor(src).astype(int), n_in - 2)
        frac = (src - lo).astype(np.float32)
        m = np.zeros((n_out, n_in), np.float32)
        m[np.arange(n_out), lo] = 1 - frac
        m[np.arange(n_out), lo + 1] += frac
        return m

    ry, rx = weights(size[0], grids.shape[1]), weights(size[1], grids.shape[2])
    return np.einsum("Hh,bhw,Ww->bHW", ry, grids.astype(np.float32), rx)


class VisionPipeline:
    """Encoder and bank matcher (or text decoder) of a bundle, with the manifest's post-processing."""

    def __init__(self, bundle: EngineBundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.layer_names = [layer.name for layer in self.manifest.patch_layers]
        self.encoder = bundle.engine("encoder")
        self.matcher = bundle.engine("bank_matcher")
        self.sigma = float(self.manifest.matching.get("smoothing_sigma", 0.0))
        self.score_rule = str(self.manifest.matching.get("image_score", "max"))
        if self.score_rule not in IMAGE_SCORES:
            raise ValueError(
                f"{bundle.path}/manifest.json: matching.image_score {self.score_rule!r} is not one of {IMAGE_SCORES}"
            )
        layers = self.manifest.patch_layers
        self.grid = layers[0].grid
        #: Every encoder output a recipe stores per sample: the bank's layers, then the head-only ones.
        self.feature_names = self.layer_names + [layer.name for layer in self.manifest.head_layers]
        self.feature_dim = sum(layer.dim for layer in (*layers, *self.manifest.head_layers))
        self.last_timings: dict[str, float] = {}

    def prepare(
        self,
        image: np.ndarray,
        roi: tuple[int, int, int, int] | None = None,
        resize: str | None = None,
        name: str = "image",
    ) -> Prepared:
        """Crop the recipe's ROI and apply the bundle's preprocessing."""
        return preprocess(crop_roi(image, roi, name), self.manifest.preprocess, resize=resize, name=name)

    def encode(self, prepared: Sequence[Prepared]) -> dict[str, np.ndarray]:
        """Patch features per output (bank layers, then head layers), (B, N, C) float32, in batches."""
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in self.feature_names}
        for i in range(0, len(prepared), ENCODE_BATCH):
            batch = np.stack([p.pixel_values for p in prepared[i : i + ENCODE_BATCH]])
            out = self.encoder.run({"pixel_values": batch})
            for n in self.feature_names:
                chunks[n].append(out[n])
        return {n: np.concatenate(c) for n, c in chunks.items()}

    def bank_raw(self, features: dict[str, np.ndarray], bank: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Unsmoothed anomaly maps (B, H, W) and patch scores (B, N) of queries against a memory bank."""
        feeds = {f"q_{i}": np.ascontiguousarray(features[n], np.float32) for i, n in enumerate(self.layer_names)}
        feeds.update({f"bank_{i}": np.ascontiguousarray(bank[n], np.float32) for i, n in enumerate(self.layer_names)})
        out = self.matcher.run(feeds)
        return out["anomaly_map"][:, 0], out["patch_scores"]

    def patches(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Every output's patch features side by side (B, N, ΣC), head-only layers included: what a head reads."""
        return np.concatenate([features[n] for n in self.feature_names], axis=-1)

    def head_map(self, head: DefectHead, features: dict[str, np.ndarray]) -> np.ndarray:
        """A defect head's patch logits upsampled to the map size (B, H, W), unsmoothed."""
        logits = head.logits(self.patches(features))
        return upsample_aligned(logits.reshape(-1, *self.grid), self.manifest.map_size)

    def bank_maps(
        self, features: dict[str, np.ndarray], bank: dict[str, np.ndarray], head: DefectHead | None = None
    ) -> np.ndarray:
        """Anomaly maps (B, H, W) of encoded queries against a memory bank, fused with a defect head if any."""
        raw, _ = self.bank_raw(features, bank)
        if head is not None:
            raw = head.fuse(raw, self.head_map(head, features))
        return self.smooth(raw)

    def image_score(self, anomaly_map: np.ndarray) -> float:
        """The image score of one map by the bundle's rule (``matching.image_score``)."""
        return image_score(anomaly_map, self.score_rule)

    def text_maps(self, features: dict[str, np.ndarray], text_features: np.ndarray, smooth: bool = True) -> np.ndarray:
        """AnomalyGPT's zero-shot text-matching maps (B, H, W) from the bundle's decoder graph."""
        decoder = self.bundle.engine("decoder")
        b = next(iter(features.values())).shape[0]
        feeds = {n: np.ascontiguousarray(features[n], np.float32) for n in self.layer_names}
        tf = np.ascontiguousarray(np.broadcast_to(text_features.astype(np.float32), (b, *text_features.shape)))
        feeds[(self.manifest.text_features or {}).get("decoder_input", "text_feats")] = tf
        maps = decoder.run(feeds)["anomaly_map"][:, 0]
        return self.smooth(maps) if smooth else maps

    def combined_maps(
        self, features: dict[str, np.ndarray], bank: dict[str, np.ndarray], text_features: np.ndarray
    ) -> np.ndarray:
        """AnomalyGPT's few-shot mode as the paper states it: the mean of the text map and the bank map.

        (AnomalyGPT's released code *replaces* the text map by the bank map, which is source
        ``bank``; the averaged form appears in its comments and paper, and is source ``text+bank``.)
        """
        raw, _ = self.bank_raw(features, bank)
        return self.smooth(0.5 * (raw + self.text_maps(features, text_features, smooth=False)))

    def smooth(self, maps: np.ndarray) -> np.ndarray:
        """Gaussian blur each map by the bundle's ``smoothing_sigma`` (PatchCore's σ=4 default)."""
        if self.sigma <= 0:
            return maps
        return np.stack([cv2.GaussianBlur(m, (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT) for m in maps])

    def timed_maps(
        self,
        prepared: Sequence[Prepared],
        bank: dict[str, np.ndarray] | None,
        text_features: np.ndarray | None,
        head: DefectHead | None = None,
    ) -> np.ndarray:
        """Encode and match, recording per-stage milliseconds in :attr:`last_timings`."""
        t0 = time.perf_counter()
        feats = self.encode(prepared)
        t1 = time.perf_counter()
        if bank is not None and text_features is not None:
            maps = self.combined_maps(feats, bank, text_features)
        elif bank is not None:
            maps = self.bank_maps(feats, bank, head)
        else:
            assert text_features is not None, "a recipe matches against a bank, text features or both"
            maps = self.text_maps(feats, text_features)
        t2 = time.perf_counter()
        self.last_timings = {"encoder": (t1 - t0) * 1e3, "matcher": (t2 - t1) * 1e3}
        return maps
