"""Heatmap overlays for technicians and the archive: anomaly map in colour over the image."""

from __future__ import annotations

import cv2
import numpy as np

from anomalygpt_edge.runtime.inspection.verdict import Verdict


def overlay(image: np.ndarray, verdict: Verdict, alpha: float = 0.45) -> np.ndarray:
    """BGR image with the anomaly map (scaled so the threshold sits mid-scale) and region boxes."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    out = image.copy()
    if verdict.anomaly_map is not None and np.isfinite(verdict.threshold) and verdict.threshold > 0:
        norm = np.clip(0.5 * verdict.anomaly_map / verdict.threshold, 0, 1)
        colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
        if colour.shape[:2] != out.shape[:2]:
            colour = cv2.resize(colour, (out.shape[1], out.shape[0]))
        out = cv2.addWeighted(out, 1 - alpha, colour, alpha, 0)
    for r in verdict.regions:
        x, y, w, h = r.bbox
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), 1)
    label = f"{verdict.verdict} {verdict.normalized_score:.2f}"
    cv2.putText(out, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(
        out,
        label,
        (4, 16),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5,
        (0, 0, 255) if verdict.verdict != "OK" else (0, 200, 0),
        1,
        cv2.LINE_AA,
    )
    return out
