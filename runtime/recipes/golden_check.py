"""The golden set checked against itself: each golden part scored as the live recipe would score a
new good part (leave-one-out against the others' bank, k-fold above ``LOO_MAX``; or the zero-shot
text map), and the quality check that flags outliers and golden sets too spread to decide on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime.inspection.head_training import ScoredPart
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
from anomalygpt_edge.runtime.recipes.store import USES_TEXT, Recipe, text_features_for

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


def golden_parts(
    pipeline: VisionPipeline, bundle: EngineBundle, recipe: Recipe, feats: list[dict[str, np.ndarray]]
) -> tuple[list[ScoredPart], str]:
    """Each golden sample scored as the live recipe would score a new good part, unsmoothed.

    Bank source: each sample against a bank of the others (leave-one-out, k-fold above LOO_MAX).
    Text source: each sample's zero-shot text-decoder map (no bank is involved).
    """
    k = len(feats)
    names = pipeline.layer_names
    text = text_features_for(recipe, bundle) if recipe.source in USES_TEXT else None
    if recipe.source == "text":
        assert text is not None, "every source in USES_TEXT has text features"
        query = {n: np.stack([f[n][0] for f in feats]) for n in names}
        maps = pipeline.text_maps(query, text, smooth=False)
        empty = np.zeros(0, np.float32)
        return [ScoredPart(m, empty, empty) for m in maps], "zero-shot text decoder"
    if k < 2:
        return [], "none: a single golden sample cannot be checked against others"
    folds = [[i] for i in range(k)] if k <= LOO_MAX else [list(range(f, k, KFOLD)) for f in range(KFOLD)]
    parts: list[ScoredPart | None] = [None] * k
    rng = np.random.default_rng(0)
    for held in folds:
        rest = [feats[i] for i in range(k) if i not in held]
        bank = {n: np.concatenate([r[n].reshape(-1, r[n].shape[-1]) for r in rest]) for n in names}
        m = next(iter(bank.values())).shape[0]
        if m > recipe.bank_budget:  # random subsample for speed: scores run high, i.e. conservative
            idx = np.sort(rng.choice(m, recipe.bank_budget, replace=False))
            bank = {n: v[idx] for n, v in bank.items()}
        # Score the un-augmented view of each held-out sample (its first feature row).
        query = {n: np.stack([feats[i][n][0] for i in held]) for n in names}
        raw, patch_scores = pipeline.bank_raw(query, bank)
        if text is not None:  # text+bank: the held-out part's map as the live recipe computes it
            raw = 0.5 * (raw + pipeline.text_maps(query, text, smooth=False))
        for j, i in enumerate(held):
            all_views = {n: feats[i][n] for n in pipeline.feature_names}
            parts[i] = ScoredPart(raw[j], patch_scores[j], pipeline.patches(all_views))
    return [p for p in parts if p is not None], "leave-one-out" if k <= LOO_MAX else f"{KFOLD}-fold"


def part_score(pipeline: VisionPipeline, part: ScoredPart) -> float:
    """A scored golden part's image score, smoothed as inspection smooths it."""
    return pipeline.image_score(pipeline.smooth(part.raw_map[None])[0])


def quality_report(recipe: Recipe, scores: dict[str, float]) -> QualityReport:
    """The quality check on given leave-one-out scores (bank only: a defect head never hides an outlier)."""
    k = len(recipe.samples)
    report = QualityReport(scores=scores)
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
