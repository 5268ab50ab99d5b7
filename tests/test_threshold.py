"""The automatic threshold: distribution-free when the golden set supports the target, conservative otherwise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomalygpt_edge.calibration.threshold import (
    fit_threshold,
    frr_upper_bound,
    refine_with_labels,
    required_samples,
)


@pytest.mark.parametrize(("target", "needed"), [(0.10, 29), (0.05, 59), (0.01, 299)])
def test_required_samples_match_the_95_percent_rule(target: float, needed: int) -> None:
    assert required_samples(target) == needed


def test_exactly_enough_scores_use_the_maximum_as_threshold() -> None:
    scores = np.linspace(0.1, 0.4, 59)
    t = fit_threshold(scores, 0.05)
    assert t.supported and t.method == "order-statistic" and t.value == pytest.approx(0.4)
    assert t.frr_upper_bound_95 <= 0.05 + 1e-6 and not t.warnings


def test_many_scores_use_a_lower_order_statistic_with_a_valid_bound() -> None:
    scores = np.random.default_rng(0).gamma(4.0, 0.05, 3000)
    t = fit_threshold(scores, 0.01)
    assert t.supported and t.value < scores.max()
    assert t.frr_upper_bound_95 <= 0.01 + 1e-6
    assert 0.003 < float((scores > t.value).mean()) < 0.01  # empirical FRR below the target, not wastefully low


def test_threshold_bounds_hold_on_fresh_normal_scores() -> None:
    # Simulation: thresholds fitted on 299 normals keep fresh normals' reject rate under 1% in >= 95% of runs.
    rng = np.random.default_rng(1)
    ok = 0
    for _ in range(200):
        t = fit_threshold(rng.normal(size=299), 0.01)
        ok += (1 - 0.5 * (1 + math.erf(t.value / math.sqrt(2)))) <= 0.01
    assert ok >= 0.93 * 200


def test_too_few_scores_warn_and_never_go_below_the_worst_golden_score() -> None:
    t = fit_threshold([0.30, 0.32, 0.31, 0.29, 0.45], 0.01)
    assert not t.supported and t.method == "normal-extrapolation"
    assert t.value >= 0.45 and "only 5 golden-sample scores; 299 are needed" in t.warnings[0]
    assert t.frr_upper_bound_95 == pytest.approx(frr_upper_bound(5, 5))


def test_two_scores_assume_a_stated_spread() -> None:
    t = fit_threshold([0.2, 0.22], 0.01)
    assert t.value > 0.22 and any("spread assumed" in w for w in t.warnings)


@pytest.mark.parametrize(
    ("scores", "target", "message"),
    [([], 0.01, "no golden-sample scores"), ([0.1, float("nan")], 0.01, "NaN"), ([0.1, 0.2], 0.7, "must be in")],
)
def test_unusable_inputs_are_refused_clearly(scores: list[float], target: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_threshold(scores, target)


def test_good_only_data_never_collapses_to_an_everything_ng_threshold() -> None:
    # anomalib #2433: an F1-fitted threshold on good-only data sits at the minimum score.
    scores = np.random.default_rng(2).uniform(0.2, 0.3, 40)
    t = fit_threshold(scores, 0.05)
    assert t.value >= scores.max()


def test_labelled_parts_report_escapes_and_extra_good_parts_refine_the_threshold() -> None:
    golden = np.random.default_rng(3).uniform(0.2, 0.3, 10)
    base = fit_threshold(golden, 0.05)
    good = np.random.default_rng(4).uniform(0.2, 0.3, 60)
    bad = np.array([0.25, 0.6, 0.7, 0.8])
    refined, report = refine_with_labels(base, golden, good, bad)
    assert refined.n_scores == 70 and refined.supported and refined.method.endswith("+labelled")
    assert refined.value <= base.value
    assert report["escape_rate"] == pytest.approx(0.25) and report["labelled_bad"] == 4


def test_expectations_offer_a_looser_target_only_when_it_lowers_the_escapes() -> None:
    from anomalygpt_edge.calibration.threshold import expectations

    golden = np.random.default_rng(0).normal(1.0, 0.2, 16)
    threshold = fit_threshold(golden, 0.01)
    near = expectations(threshold, golden, np.array([1.3, 1.35, 1.4, 1.45, 2, 2, 2, 2]), 16)
    assert near["expected_escape"] == 0.25
    assert "either 1% false rejects and about 25% escapes, or 5% and about 0%" in near["explained"]
    hidden = expectations(threshold, golden, np.array([0.5, 0.6, 0.7, 0.8, 2, 2, 2, 2]), 16)
    assert "would not stop these escapes" in hidden["explained"] and "either" not in hidden["explained"]
    few = expectations(fit_threshold(golden[:2], 0.01), golden[:2], np.array([]), 2)
    assert few["estimated_frr"] is None and "cannot estimate" in few["explained"]  # strict JSON, plain words
