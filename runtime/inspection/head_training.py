"""Cross-fitted training of a recipe's defect head, and the golden/defect scores it implies.

Every score used to set or judge the threshold must come from a model that did not see that part:
golden parts are scored against banks of the *other* goldens (leave-one-out, done by enrollment),
and here additionally by a head trained *without* them; labelled defects by a head trained without
them. The folds are shared: fold ``f`` holds out every ``F``-th golden and defect part, trains on the
rest, and scores the held-out ones. The head that goes live is trained on everything, with the
fusion statistics of the held-out golden patches (a good part it has not seen).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from anomalygpt_edge.runtime.inspection.defect_head import (
    L2,
    DefectHead,
    LabelledDefect,
    fit_logistic,
    linear_logits,
    robust_stats,
    training_rows,
)
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline, upsample_aligned

MAX_FOLDS = 4


@dataclass
class ScoredPart:
    """A part's raw (unsmoothed) bank map (H, W), bank patch scores (N,), and its patch features (A, N, C)."""

    raw_map: np.ndarray
    patch_scores: np.ndarray
    patches: np.ndarray


@dataclass
class HeadFit:
    """The live head and the held-out image scores of every golden and defect part under it."""

    head: DefectHead
    golden_scores: np.ndarray
    defect_scores: np.ndarray
    defects_held_out: bool  # False with a single labelled defect: its score is in-sample (optimistic)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def _train(
    golden: Sequence[ScoredPart],
    defects: Sequence[ScoredPart],
    labels: Sequence[LabelledDefect],
    grid: tuple[int, int],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, str]:
    x, y, mode = training_rows(
        [g.patches for g in golden], labels, [d.patch_scores for d in defects], grid, np.random.default_rng(seed)
    )
    mean, scale, weight, bias = fit_logistic(x, y)
    return mean, scale, weight, bias, mode


def fit_head(
    pipeline: VisionPipeline,
    golden: Sequence[ScoredPart],
    defects: Sequence[ScoredPart],
    labels: Sequence[LabelledDefect],
    seed: int = 0,
) -> HeadFit:
    """Train the head with cross-fitting; return it with every part's held-out fused image score."""
    t0 = time.perf_counter()
    grid = pipeline.grid
    k, n_def = len(golden), len(defects)
    folds = max(1, min(MAX_FOLDS, k))
    # Held-out logits by part index: every golden part falls in one fold; defects only with two or more.
    golden_logits: dict[int, np.ndarray] = {}
    defect_logits: dict[int, np.ndarray] = {}
    held_out_defects = n_def >= 2
    for f in range(folds):
        g_hold = [i for i in range(k) if i % folds == f]
        d_hold = [j for j in range(n_def) if j % folds == f] if held_out_defects else []
        g_train = [golden[i] for i in range(k) if i not in g_hold]
        d_train = [j for j in range(n_def) if j not in d_hold]
        params = _train(g_train, [defects[j] for j in d_train], [labels[j] for j in d_train], grid, seed + f)[:4]
        for i in g_hold:
            golden_logits[i] = linear_logits(*params, golden[i].patches[0])
        for j in d_hold:
            defect_logits[j] = linear_logits(*params, defects[j].patches[0])
    mean, scale, weight, bias, mode = _train(golden, defects, labels, grid, seed)
    for j in range(n_def):
        if j not in defect_logits:  # a single labelled defect: no model without it can score it
            defect_logits[j] = linear_logits(mean, scale, weight, bias, defects[j].patches[0])

    # Fusion statistics at the image level: the z-scores of each map are scaled by how much the
    # *image scores* (map maxima) of held-out good parts vary, so each source weighs by how well it
    # separates whole parts. Measured against patch-level statistics over the three shared sets
    # (BENCHMARKS.md, "Variants tried"): equal on magnetic tile and deeppcb, +0.06 on bsdata.
    def image_level(raw: np.ndarray) -> float:
        return pipeline.image_score(pipeline.smooth(raw[None])[0])

    bank_mu, bank_sd = robust_stats(np.array([image_level(g.raw_map) for g in golden]))
    head_images = [
        image_level(upsample_aligned(golden_logits[i].reshape(1, *grid), g.raw_map.shape)[0])
        for i, g in enumerate(golden)
    ]
    head_mu, head_sd = robust_stats(np.array(head_images))
    head = DefectHead(
        mean, scale, weight, bias, bank_mu, bank_sd, head_mu, head_sd, mode,
        meta={"golden": k, "defects": n_def, "folds": folds, "l2": L2},
    )  # fmt: skip

    def fused_score(part: ScoredPart, logits: np.ndarray) -> float:
        head_map = upsample_aligned(logits.reshape(1, *grid), part.raw_map.shape)[0]
        return pipeline.image_score(pipeline.smooth(head.fuse(part.raw_map, head_map)[None])[0])

    golden_scores = np.array([fused_score(g, golden_logits[i]) for i, g in enumerate(golden)])
    defect_scores = np.array([fused_score(d, defect_logits[j]) for j, d in enumerate(defects)])
    seconds = time.perf_counter() - t0
    head.meta["train_seconds"] = round(seconds, 3)
    return HeadFit(head, golden_scores, defect_scores, held_out_defects, seconds, {"mode": mode, "folds": folds})
