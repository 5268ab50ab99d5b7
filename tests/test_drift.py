"""The drift watch's statistics (calibration/drift.py): no false alarm on parts from the goldens'
own population, a flag within a bounded number of parts on a realistic shift, labels, the hours
window, and the bands' honesty for few goldens.

Scores are synthetic but shaped like real leave-one-out scores: positive and right-skewed
(log-normal, spread 25 %: the bsdata/magnetic-tile/deeppcb goldens of the default bundle have a
coefficient of variation of 15-20 %), 16 goldens, the threshold as the product's conservative
extrapolation sets it for 16 scores (max of the max and mean + 2.33 SD).
"""

from __future__ import annotations

import numpy as np
import pytest

from anomalygpt_edge.calibration.drift import DriftSettings, DriftWatch

K = 16
SPREAD = 0.25


def _threshold(golden: np.ndarray) -> float:
    sigma = max(float(golden.std(ddof=1)), 1.4826 * float(np.median(np.abs(golden - np.median(golden)))))
    return max(float(golden.max()), float(golden.mean()) + 2.33 * sigma)


def _recipe(seed: int) -> tuple[np.random.Generator, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    golden = rng.lognormal(0.0, SPREAD, K)
    return rng, golden, _threshold(golden)


def _feed(watch: DriftWatch, scores: np.ndarray, threshold: float, start: float = 0.0) -> int | None:
    """Feed scores as the line would judge them; the number of parts when the watch first flagged."""
    for i, s in enumerate(scores, 1):
        watch.observe(float(s), "OK" if s <= threshold else "NG", at=start + i)
        if watch.state(now=start + i).flagged:
            return i
    return None


@pytest.mark.parametrize("seed", range(40))
def test_no_alarm_in_a_thousand_parts_from_the_goldens_population(seed: int) -> None:
    rng, golden, threshold = _recipe(seed)
    watch = DriftWatch(golden, threshold, 0.01, name="bracket")
    first = _feed(watch, rng.lognormal(0.0, SPREAD, 1000), threshold)
    state = watch.state(now=1000.0)
    assert first is None, f"false alarm after {first} parts: {state.message}"
    assert state.message is None and 0 < state.passed_parts <= 200


def test_a_shift_of_two_golden_spreads_is_flagged_within_100_parts() -> None:
    flagged_at = []
    for seed in range(20):
        rng, golden, threshold = _recipe(100 + seed)
        watch = DriftWatch(golden, threshold, 0.01, name="bracket")
        first = _feed(watch, rng.lognormal(2 * SPREAD, SPREAD, 100), threshold)
        flagged_at.append(first)
    caught = [f for f in flagged_at if f is not None]
    assert len(caught) >= 18, flagged_at  # 2 SD: false rejects from 1 % to about 30 %
    assert max(caught) <= 100


def test_the_message_says_what_changed_and_the_expected_false_rejects() -> None:
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.4, 0.01, DriftSettings(min_parts=30), name="bracket")
    for i in range(40):  # good parts now score like the goldens' upper end, still under the threshold
        watch.observe(1.29 + 0.002 * (i % 5), "OK", at=float(i))
    state = watch.state(now=40.0)
    assert state.drifting and not state.reject_rate_high
    assert state.message is not None
    assert state.message.startswith("recipe bracket: good parts score higher than at enrollment")
    assert "expected false rejects now ≈" in state.message
    assert state.expected_false_reject is not None and state.enrolled_false_reject is not None
    assert state.expected_false_reject > 5 * state.enrolled_false_reject
    assert state.auc is not None and state.auc_band is not None and state.auc > state.auc_band


def test_no_judgement_before_min_parts() -> None:
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.4, 0.01, DriftSettings(min_parts=30))
    for i in range(29):
        watch.observe(1.35, "OK", at=float(i))
    assert not watch.state(now=29.0).flagged
    watch.observe(1.35, "OK", at=29.0)
    assert watch.state(now=30.0).drifting


def test_only_passed_parts_enter_the_score_window_and_errors_count_nowhere() -> None:
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.4, 0.01)
    for i in range(50):
        watch.observe(5.0, "NG", at=float(i))  # defective parts: far above, rejected
        watch.observe(1.15, "OK", at=float(i))
        watch.observe(None, "ERROR", at=float(i))
    state = watch.state(now=50.0)
    assert state.passed_parts == 50 and state.verdicts == 100
    assert state.share_above_p95 == 0.0 and not state.drifting
    assert state.reject_rate == pytest.approx(0.5)
    assert state.reject_rate_high  # half the parts rejected: more than 16 goldens allow good parts
    assert state.message is not None and "50 % of the last 100 parts were rejected" in state.message


def test_the_reject_band_allows_what_sixteen_goldens_cannot_rule_out() -> None:
    """A 16-golden recipe whose good parts are really rejected at 8 % (estimate 1 %) is not flagged."""
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.31, 0.01)
    for i in range(200):
        watch.observe(1.2, "NG" if i % 12 == 0 else "OK", at=float(i))
    state = watch.state(now=200.0)
    assert state.reject_rate == pytest.approx(17 / 200)
    assert not state.reject_rate_high
    assert state.reject_rate_band is not None and state.reject_rate_band > 0.3


def test_labels_give_false_rejects_and_escapes_and_flag_rejected_good_parts() -> None:
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.31, 0.01, DriftSettings(min_parts=10), name="bracket")
    for i in range(30):
        watch.observe_label("good", "OK" if i % 3 == 0 else "NG", at=float(i))  # 2 of 3 good parts rejected
        watch.observe_label("defect", "OK" if i % 5 == 0 else "NG", at=float(i))
    watch.observe_label("unsure", "NG")  # not a label: ignored
    state = watch.state(now=20.0)
    assert (state.labelled_good, state.labelled_defect) == (30, 30)
    assert state.labelled_frr == pytest.approx(2 / 3) and state.labelled_escape == pytest.approx(0.2)
    assert state.labelled_frr_high
    assert state.message is not None and "67 % of the 30 parts labelled good were rejected" in state.message


def test_the_hours_window_forgets_parts_older_than_it() -> None:
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.4, 0.01, DriftSettings(window_parts=500, window_hours=1.0, min_parts=30))
    for i in range(60):  # drifted parts, one a minute
        watch.observe(1.35, "OK", at=60.0 * i)
    assert watch.state(now=3600.0).drifting
    for i in range(60, 120):  # then good ones: the drifted hour slides out
        watch.observe(1.15, "OK", at=60.0 * i)
    late = watch.state(now=60.0 * 120)
    assert late.passed_parts == 60 and not late.drifting
    empty = watch.state(now=60.0 * 120 + 7200)
    assert empty.passed_parts == 0 and empty.verdicts == 0 and not empty.flagged


def test_the_parts_window_keeps_only_the_last_parts() -> None:
    golden = np.linspace(1.0, 1.3, K)
    watch = DriftWatch(golden, 1.4, 0.01, DriftSettings(window_parts=50, min_parts=30))
    for i in range(100):
        watch.observe(1.35, "OK", at=float(i))
    assert watch.state(now=100.0).drifting
    for i in range(100, 150):
        watch.observe(1.1, "OK", at=float(i))
    state = watch.state(now=150.0)
    assert state.passed_parts == 50 and not state.drifting
    assert state.first_flag_part == 30  # the first look that could judge


def test_goldens_above_the_threshold_are_left_out_as_the_window_truncates_parts() -> None:
    golden = [*np.linspace(1.0, 1.3, 15), 9.0]  # one golden the threshold rejects
    watch = DriftWatch(golden, 1.4, 0.01)
    assert watch.k == 15 and watch.reference <= 1.4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window_parts": 1}, "window_parts must be 2"),
        ({"window_hours": 0.0}, "window_hours must be in"),
        ({"min_parts": 300}, "min_parts must be 1..window_parts"),
        ({"alpha_share": 0.7}, "alpha_share must be in"),
    ],
)
def test_bad_settings_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftSettings(**settings)


def _defect_heavy_line(watch: DriftWatch, rng: np.random.Generator, threshold: float, labels: bool) -> int | None:
    """1,000 parts, 45 % defects scoring above the goldens (a third of them under the threshold: escapes), the
    goods from the goldens' own population; every 10th part labelled with its truth when ``labels``."""
    for i in range(1, 1001):
        defect = rng.random() < 0.45
        escape = rng.random() < 1 / 3
        s = float(rng.uniform(0.85 * threshold, threshold) if escape else rng.uniform(threshold, 3 * threshold))
        s = s if defect else float(rng.lognormal(0.0, SPREAD))
        verdict = "OK" if s <= threshold else "NG"
        watch.observe(s, verdict, at=float(i))
        if labels and i % 10 == 0:
            watch.observe_label("defect" if defect else "good", verdict, at=float(i))
        if watch.state(now=float(i)).flagged:
            return i
    return None


@pytest.mark.parametrize("seed", range(10))
def test_labelled_defects_explain_the_rejects_and_escapes_of_a_defect_heavy_line(seed: int) -> None:
    golden = np.random.default_rng(300 + seed).lognormal(0.0, SPREAD, 40)  # a recipe grown by applied labels
    threshold = _threshold(golden)
    unlabelled = _defect_heavy_line(DriftWatch(golden, threshold, 0.01), np.random.default_rng(seed), threshold, False)
    assert unlabelled is not None  # without labels the watch cannot tell the defects from a drift: it flags
    watch = DriftWatch(golden, threshold, 0.01, name="bracket")
    for i in range(30):  # a watch that holds the line's labels (carry_labels: a version after an apply) stays quiet
        defect = i % 2 == 0
        watch.observe_label("defect" if defect else "good", "NG" if defect and i % 6 else "OK", at=0.0)
    first = _defect_heavy_line(watch, np.random.default_rng(seed), threshold, True)
    assert first is None, f"false alarm after {first} parts: {watch.state(now=1000.0).message}"


def test_labelled_defects_do_not_hide_goods_that_drift() -> None:
    flagged_at = []
    for seed in range(10):
        rng, golden, threshold = _recipe(400 + seed)
        watch = DriftWatch(golden, threshold, 0.01, name="bracket")
        for i in range(40):  # a line with 5 % labelled defects, all rejected, and labelled goods passed
            watch.observe_label("defect" if i % 20 == 0 else "good", "NG" if i % 20 == 0 else "OK", at=0.0)
        flagged_at.append(_feed(watch, rng.lognormal(2 * SPREAD, SPREAD, 100), threshold))
    caught = [f for f in flagged_at if f is not None]
    assert len(caught) >= 9, flagged_at


def test_a_new_version_of_the_recipe_keeps_the_labels_window() -> None:
    _, golden, threshold = _recipe(7)
    old = DriftWatch(golden, threshold, 0.01, name="bracket")
    for i in range(12):
        old.observe_label("defect" if i % 3 == 0 else "good", "NG" if i % 3 == 0 else "OK", at=float(i))
    new = DriftWatch(golden * 1.1, threshold * 1.1, 0.01, name="bracket")
    new.carry_labels(old)
    state = new.state(now=12.0)
    assert (state.labelled_good, state.labelled_defect) == (8, 4)
    assert state.labelled_escape == 0.0 and state.labelled_frr == 0.0
