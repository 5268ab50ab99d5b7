"""Detection metrics in numpy: AUROC (ties averaged), ROC/PR curves and AUPRO (MVTec AD's PRO up to 30 % FPR)."""

from __future__ import annotations

import cv2
import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    _, first, counts = np.unique(sorted_x, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) as the threshold sweeps down the scores."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    order = np.argsort(-s, kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(y[order])])
    fp = np.concatenate([[0], np.cumsum(~y[order])])
    return fp / max(1, (~y).sum()), tp / max(1, y.sum())


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) as the threshold sweeps down the scores."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    order = np.argsort(-s, kind="mergesort")
    tp = np.cumsum(y[order])
    fp = np.cumsum(~y[order])
    return tp / max(1, y.sum()), tp / np.maximum(1, tp + fp)


def aupro(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float = 0.3, steps: int = 301) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr`` (Bergmann et al., MVTec AD).

    Each connected ground-truth region counts equally, so small defects weigh as much as large ones.
    """
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    regions = []
    for m, k in zip(maps, masks):
        if not k.any():
            continue
        n, labels = cv2.connectedComponents(k.astype(np.uint8), connectivity=8)
        regions += [np.sort(m[labels == i]) for i in range(1, n)]
    if not regions or normal.size == 0:
        return float("nan")
    normal = np.sort(normal)
    # The grid runs one step past max_fpr, so the curve is read there between two real points.
    grid = np.linspace(0.0, max_fpr, steps)
    grid = np.append(grid, min(1.0, max_fpr + (grid[1] - grid[0] if steps > 1 else max_fpr)))
    values = np.unique(np.quantile(normal, 1.0 - grid))
    # Each threshold twice: flagging pixels above it, and flagging it too. Where normal pixels tie at
    # a threshold the false-positive rate jumps across the tie; the two points keep the curve exact
    # at both ends of the jump (read at the nominal rate, PRO came from too far left).
    fpr_above = 1.0 - np.searchsorted(normal, values, side="right") / normal.size
    fpr_from = 1.0 - np.searchsorted(normal, values, side="left") / normal.size
    pro_above = np.mean([1.0 - np.searchsorted(r, values, side="right") / r.size for r in regions], axis=0)
    pro_from = np.mean([1.0 - np.searchsorted(r, values, side="left") / r.size for r in regions], axis=0)
    fpr = np.concatenate([[0.0], fpr_above, fpr_from, [1.0]])
    pro = np.concatenate([[0.0], pro_above, pro_from, [1.0]])
    order = np.lexsort((pro, fpr))
    fpr, pro = fpr[order], pro[order]
    end = np.interp(max_fpr, fpr, pro)  # the curve read at max_fpr (between the points around it)
    keep = fpr < max_fpr
    fpr, pro = np.append(fpr[keep], max_fpr), np.append(pro[keep], end)
    return float(np.trapezoid(pro, fpr) / max_fpr)
