"""The product's detection metrics (runtime/evaluation/accuracy.py) against scikit-learn as the oracle.

AUROC, pixel AUROC and the ROC/PR curves must equal sklearn's on random cases, ties, all-equal
scores and the smallest sets. AUPRO has no sklearn function, so it is checked against a direct
reference built from sklearn's ``roc_curve`` (every distinct threshold, exact false-positive rates)
and the per-region overlap at each of those thresholds, integrated up to the FPR limit.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from anomalygpt_edge.runtime.evaluation.accuracy import aupro, auroc, pr_curve, roc_curve

# Derandomized: a failure in CI shows the same example when rerun; no example database on disk.
ORACLE = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@st.composite
def scored_labels(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Scores with both classes present: sometimes a few distinct values (heavy ties), sometimes floats."""
    n = draw(st.integers(min_value=2, max_value=60))
    labels = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < len(y)))
    if draw(st.booleans()):
        element = st.integers(min_value=0, max_value=3).map(float)  # four values: ties everywhere
    else:
        element = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
    scores = draw(st.lists(element, min_size=n, max_size=n))
    return np.asarray(scores, np.float64), np.asarray(labels, bool)


@ORACLE
@given(scored_labels())
def test_auroc_equals_sklearn_on_random_scores_with_ties(case: tuple[np.ndarray, np.ndarray]) -> None:
    scores, labels = case
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_equals_sklearn_on_every_two_and_three_element_case() -> None:
    # The smallest sets, exhaustively: every labelling with both classes, every order and tie pattern.
    for n in (2, 3):
        for labels in itertools.product([False, True], repeat=n):
            if not 0 < sum(labels) < n:
                continue
            for scores in itertools.product([0.0, 1.0, 2.0], repeat=n):
                y, s = np.asarray(labels), np.asarray(scores)
                assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12), (labels, scores)


@pytest.mark.parametrize("n", [2, 7, 1000])
def test_auroc_of_all_equal_scores_is_one_half_as_in_sklearn(n: int) -> None:
    labels = np.arange(n) % 2 == 0
    scores = np.full(n, 0.25, np.float32)
    assert auroc(scores, labels) == 0.5 == roc_auc_score(labels, scores)


@pytest.mark.parametrize("labels", [[True, True, True], [False, False], [False]])
def test_auroc_without_both_classes_is_nan(labels: list[bool]) -> None:
    # sklearn refuses these (undefined); the product reports nan so a summary can say "n/a".
    assert np.isnan(auroc(np.linspace(0, 1, len(labels)), np.asarray(labels)))


@pytest.mark.parametrize("seed", range(8))
def test_pixel_auroc_over_quantized_maps_equals_sklearn(seed: int) -> None:
    # The evaluation's pixel AUROC: every pixel of every map against its mask, concatenated.
    # Maps quantized to 16 levels so thousands of pixels tie.
    maps, masks = random_maps(np.random.default_rng(seed), n_images=4, size=24)
    maps = [np.round(m * 15) / 15 for m in maps]
    if not any(k.any() for k in masks):
        masks[0][3:6, 3:6] = True
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([k.ravel() for k in masks])
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@ORACLE
@given(scored_labels())
def test_roc_and_pr_curves_pass_through_sklearn_points(case: tuple[np.ndarray, np.ndarray]) -> None:
    # The product's curves have one point per score (ties in sort order); at the end of each tie
    # group, i.e. after every score >= a threshold, they must be sklearn's point for that threshold.
    scores, labels = case
    fpr, tpr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    for f, t, threshold in zip(sk_fpr, sk_tpr, sk_thr):
        k = int((scores >= threshold).sum())
        assert (fpr[k], tpr[k]) == pytest.approx((f, t), abs=1e-12)
    recall, precision = pr_curve(scores, labels)
    sk_prec, sk_rec, pr_thr = precision_recall_curve(labels, scores)
    for p, r, threshold in zip(sk_prec, sk_rec, pr_thr):  # sklearn's last point (1, 0) has no threshold
        k = int((scores >= threshold).sum()) - 1
        assert (recall[k], precision[k]) == pytest.approx((r, p), abs=1e-12)


# --- AUPRO ------------------------------------------------------------------------------------


def random_maps(rng: np.random.Generator, n_images: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noise maps with 0-3 rectangular defects each (sizes 1 to 30 px, some touching), each image's
    defects lifted by its own random amount so regions differ in how well they are found."""
    maps, masks = [], []
    for _ in range(n_images):
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            mask[y : y + h, x : x + w] = True
        lift = rng.random() * 1.5
        maps.append((rng.random((size, size)) + mask * lift * rng.random((size, size))).astype(np.float32))
        masks.append(mask)
    return maps, masks


def reference_aupro(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """MVTec AD's AUPRO computed directly: at every distinct threshold t (from sklearn's roc_curve,
    pixels with score >= t flagged), the FPR over all defect-free pixels and the mean over connected
    defect regions (8-connectivity) of the flagged fraction; the curve through those points,
    linear between them, integrated from 0 to ``max_fpr`` and divided by ``max_fpr``."""
    regions = []
    for m, k in zip(maps, masks):
        n, labels = cv2.connectedComponents(k.astype(np.uint8), connectivity=8)
        regions += [m[labels == i] for i in range(1, n)]
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    defect = np.concatenate(regions)
    y = np.r_[np.zeros(normal.size, bool), np.ones(defect.size, bool)]
    fpr, _, thresholds = sk_roc_curve(y, np.r_[normal, defect], drop_intermediate=False)
    pro = np.array([np.mean([(r >= t).mean() for r in regions]) for t in thresholds])
    end = np.interp(max_fpr, fpr, pro)  # fpr is non-decreasing; the first point is (0, 0)
    keep = fpr < max_fpr
    return float(np.trapezoid(np.r_[pro[keep], end], np.r_[fpr[keep], max_fpr]) / max_fpr)


@pytest.mark.parametrize("seed", range(16))
def test_aupro_matches_the_direct_reference_on_continuous_maps(seed: int) -> None:
    maps, masks = random_maps(np.random.default_rng(seed), n_images=6, size=32)
    if not any(k.any() for k in masks):
        masks[0][3:6, 3:6] = True
    n_normal = sum(int((~k).sum()) for k in masks)
    # The product samples the curve at 301 FPRs (trapezoid error at most half a step of a monotone
    # curve: 0.5 / 300) and takes thresholds as interpolated quantiles of the normal pixels (each
    # sample off by under 2/N in FPR, at most 2/N of PRO per unit FPR: 2 / (N * max_fpr)).
    tolerance = 0.5 / 300 + 2 / (n_normal * 0.3)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=tolerance)


def test_aupro_weighs_each_region_equally_not_each_pixel() -> None:
    # One large region found perfectly, one single-pixel region missed entirely: per-region
    # overlap is 1/2 at every threshold, whatever the pixel counts.
    rng = np.random.default_rng(1)
    m = rng.random((40, 40)) * 0.5
    k = np.zeros((40, 40), bool)
    k[5:25, 5:25] = True
    m[5:25, 5:25] = 2.0
    k[35, 35] = True
    m[35, 35] = -1.0
    assert aupro([m], [k]) == pytest.approx(0.5, abs=1e-9)
    assert reference_aupro([m], [k]) == pytest.approx(0.5, abs=1e-9)


def test_aupro_joins_diagonal_neighbours_into_one_region() -> None:
    # 8-connectivity, as MVTec AD: a missed pixel touching a found square only at its corner is
    # part of that region (PRO 25/26), not a region of its own (which would give 1/2).
    m = np.random.default_rng(2).random((20, 20)) * 0.5
    k = np.zeros((20, 20), bool)
    k[5:10, 5:10] = True
    m[5:10, 5:10] = 2.0
    k[10, 10] = True
    m[10, 10] = -1.0
    assert aupro([m], [k]) == pytest.approx(25 / 26, abs=1e-9)
    assert reference_aupro([m], [k]) == pytest.approx(25 / 26, abs=1e-9)


def test_aupro_without_defect_regions_is_nan() -> None:
    m = np.random.default_rng(0).random((8, 8))
    assert np.isnan(aupro([m], [np.zeros((8, 8), bool)]))


def test_aupro_matches_the_direct_reference_when_scores_tie() -> None:
    flat = np.full((8, 8), 0.5)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    assert aupro([flat], [mask]) == pytest.approx(reference_aupro([flat], [mask]), abs=1e-6)
