"""Verdict: the decision for one part, with what the PLC, the archive and the LLM need to know.

Location words and sentences follow AnomalyGPT's training answers (``datasets/mvtec.py``): a 3×3
grid over the inspected image, cell boundaries at 1/3 and 2/3, words "top left" … "bottom right".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

VERDICTS = ("OK", "NG", "ERROR")
LOCATION_WORDS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
NORMAL_SENTENCE = "No, there are no anomalies in the image."


def location_word(cx: float, cy: float, width: float, height: float) -> str:
    """AnomalyGPT's 3×3 grid word for a point (x right, y down) in an image of the given size."""

    def third(v: float, size: float) -> int:
        r = v / size
        return 0 if r <= 1 / 3 else 1 if r <= 2 / 3 else 2

    return LOCATION_WORDS[third(cy, height)][third(cx, width)]


def anomaly_sentence(locations: list[str]) -> str:
    """AnomalyGPT's answer sentence for the given region locations (largest first)."""
    if not locations:
        return NORMAL_SENTENCE
    if len(locations) == 1:
        return f"Yes, there is an anomaly in the image, at the {locations[0]} of the image."
    unique = list(dict.fromkeys(locations))
    if len(unique) == 1:
        return f"Yes, there are {len(locations)} anomalies in the image, all at the {unique[0]} of the image."
    listed = ", ".join(unique[:-1]) + f" and {unique[-1]}"
    return f"Yes, there are {len(locations)} anomalies in the image, they are at the {listed} of the image."


@dataclass(frozen=True)
class Region:
    """A connected area of the anomaly map above the pixel threshold, in source-image pixels."""

    bbox: tuple[int, int, int, int]  # x, y, w, h
    area_pct: float  # share of the inspected image, percent
    peak: float  # highest anomaly score inside
    location: str  # 3×3 grid word of the region's centroid

    def to_json(self) -> dict[str, Any]:
        return {
            "bbox": list(self.bbox),
            "area_pct": round(self.area_pct, 3),
            "peak": round(self.peak, 5),
            "location": self.location,
        }


@dataclass
class Verdict:
    """OK/NG/ERROR for one inspected image.

    ``normalized_score`` maps the recipe's threshold to 0.5 (score / threshold / 2, capped to
    [0, 1]) so dashboards can compare recipes. ``anomaly_map`` is in source-image pixels and is
    never serialised into JSON.
    """

    verdict: str
    score: float
    threshold: float
    recipe: str
    regions: list[Region] = field(default_factory=list)
    sentence: str = NORMAL_SENTENCE
    bank_version: int | None = None
    bundle_sha256: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # why, for ERROR verdicts
    anomaly_map: np.ndarray | None = None
    image_size: tuple[int, int] | None = None  # (H, W) of the inspected (ROI) image

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def normalized_score(self) -> float:
        if not np.isfinite(self.score) or self.threshold <= 0:
            return 1.0 if self.verdict != "OK" else 0.0
        return float(min(1.0, max(0.0, 0.5 * self.score / self.threshold)))

    @property
    def location(self) -> str | None:
        """Location word of the largest region, or ``None`` for an OK part."""
        return self.regions[0].location if self.regions and self.verdict == "NG" else None

    @classmethod
    def error(cls, recipe: str, reason: str, **extra: Any) -> Verdict:
        """The fail-safe answer: an explicit ERROR with its reason, never silence."""
        return cls(
            verdict="ERROR",
            score=float("nan"),
            threshold=float("nan"),
            recipe=recipe,
            sentence="The part could not be inspected.",
            reason=reason,
            **extra,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (no map); non-finite numbers become ``None``."""

        def num(v: float) -> float | None:
            return round(float(v), 6) if np.isfinite(v) else None

        return {
            "verdict": self.verdict,
            "score": num(self.score),
            "threshold": num(self.threshold),
            "normalized_score": num(self.normalized_score),
            "recipe": self.recipe,
            "regions": [r.to_json() for r in self.regions],
            "location": self.location,
            "sentence": self.sentence,
            "bank_version": self.bank_version,
            "bundle_sha256": self.bundle_sha256,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "reason": self.reason,
        }
