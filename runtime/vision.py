"""VisionPipeline: the engines of one bundle turned into anomaly maps (preprocess → encoder → matcher).

Shared by enrollment, inspection and evaluation so that every path scores images identically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime.preprocess import Prepared, crop_roi, preprocess

ENCODE_BATCH = 8


class VisionPipeline:
    """Encoder and bank matcher (or text decoder) of a bundle, with the manifest's post-processing."""

    def __init__(self, bundle: EngineBundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.layer_names = [layer.name for layer in self.manifest.patch_layers]
        self.encoder = bundle.engine("encoder")
        self.matcher = bundle.engine("bank_matcher")
        self.sigma = float(self.manifest.matching.get("smoothing_sigma", 0.0))
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
        """Patch features per layer, (B, N, C) float32, encoded in batches of :data:`ENCODE_BATCH`."""
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in self.layer_names}
        for i in range(0, len(prepared), ENCODE_BATCH):
            batch = np.stack([p.pixel_values for p in prepared[i : i + ENCODE_BATCH]])
            out = self.encoder.run({"pixel_values": batch})
            for n in self.layer_names:
                chunks[n].append(out[n])
        return {n: np.concatenate(c) for n, c in chunks.items()}

    def bank_maps(self, features: dict[str, np.ndarray], bank: dict[str, np.ndarray]) -> np.ndarray:
        """Anomaly maps (B, H, W) of encoded queries against a memory bank."""
        feeds = {f"q_{i}": np.ascontiguousarray(features[n], np.float32) for i, n in enumerate(self.layer_names)}
        feeds.update({f"bank_{i}": np.ascontiguousarray(bank[n], np.float32) for i, n in enumerate(self.layer_names)})
        maps = self.matcher.run(feeds)["anomaly_map"][:, 0]
        return self.smooth(maps)

    def text_maps(self, features: dict[str, np.ndarray], text_features: np.ndarray) -> np.ndarray:
        """AnomalyGPT's zero-shot text-matching maps (B, H, W) from the bundle's decoder graph."""
        decoder = self.bundle.engine("decoder")
        b = next(iter(features.values())).shape[0]
        feeds = {n: np.ascontiguousarray(features[n], np.float32) for n in self.layer_names}
        tf = np.ascontiguousarray(np.broadcast_to(text_features.astype(np.float32), (b, *text_features.shape)))
        feeds[(self.manifest.text_features or {}).get("decoder_input", "text_feats")] = tf
        return self.smooth(decoder.run(feeds)["anomaly_map"][:, 0])

    def smooth(self, maps: np.ndarray) -> np.ndarray:
        """Gaussian blur each map by the bundle's ``smoothing_sigma`` (PatchCore's σ=4 default)."""
        if self.sigma <= 0:
            return maps
        return np.stack([cv2.GaussianBlur(m, (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT) for m in maps])

    def timed_maps(
        self, prepared: Sequence[Prepared], bank: dict[str, np.ndarray] | None, text_features: np.ndarray | None
    ) -> np.ndarray:
        """Encode and match, recording per-stage milliseconds in :attr:`last_timings`."""
        t0 = time.perf_counter()
        feats = self.encode(prepared)
        t1 = time.perf_counter()
        maps = self.bank_maps(feats, bank) if bank is not None else self.text_maps(feats, text_features)
        t2 = time.perf_counter()
        self.last_timings = {"encoder": (t1 - t0) * 1e3, "matcher": (t2 - t1) * 1e3}
        return maps
