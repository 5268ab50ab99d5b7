"""Automatic OK/NG threshold from golden-sample scores, with no hand-set knob.

The technician gives good parts only, so the threshold is set on the distribution of *normal*
scores (leave-one-out / k-fold scores of the golden samples against banks of the others), for a
stated target false-reject rate α. An F1-optimal threshold is never fitted on good-only data: it
collapses to the lowest score and every part reads NG (anomalib #2433).

Rule, in order:

1. **Distribution-free** (enough samples): with n normal scores, the r-th smallest is a threshold
   whose false-reject rate is ≤ α with 95 % confidence when P(Binomial(n, 1-α) ≤ r-1) ≥ 0.95.
   The smallest such r exists once n ≥ ln(0.05)/ln(1-α) (59 scores for 5 %, 299 for 1 %).
2. **Conservative extrapolation** (too few samples; reported as a warning): fit a normal tail to
   the scores with a robust spread σ = max(sample std, 1.4826·MAD) and take
   ``max(max score, mean + z·σ)`` with z = max(z_{1-α}, 2). With fewer than 3 scores the spread
   cannot be estimated; σ is then taken as 25 % of the mean score (stated in the warning).
3. **Labelled refinement** (``calibrate``): known-bad parts never move the threshold above what
   the good parts require; they are used to report escapes and, when extra known-good parts are
   given, those join the normal scores.

Leave-one-out banks hold k-1 golden samples, one fewer than the live bank, so their scores run
slightly high: the threshold errs towards rejecting, which is the fail-safe side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95
DEFAULT_TARGET_FRR = 0.01
MIN_Z = 2.0
SMALL_SAMPLE_CV = 0.25
#: Golden scores whose spread (SD) exceeds this share of their median are called too varied.
VARIED_CV = 0.35
#: An expected escape rate above this gets the plain "choose" sentence.
ESCAPE_WARN = 0.10


@dataclass(frozen=True)
class Threshold:
    """A decision threshold with the statistics that justify it."""

    value: float
    method: str
    target_frr: float
    n_scores: int
    required_n: int
    supported: bool
    frr_upper_bound_95: float
    stats: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Threshold:
        return cls(**data)

    def explain(self) -> str:
        """Plain words for technicians: what false-reject rate to expect and how sure it is."""
        pct = 100 * self.target_frr
        if self.supported:
            return (
                f"Threshold {self.value:.4g} from {self.n_scores} golden-sample scores: with 95% confidence "
                f"fewer than {pct:g}% of good parts will be rejected."
            )
        return (
            f"Threshold {self.value:.4g} from only {self.n_scores} golden-sample scores: {self.required_n} are "
            f"needed to guarantee fewer than {pct:g}% false rejects with 95% confidence, so a conservative "
            f"extrapolated threshold is used. Enroll more good parts to firm it up."
        )


def required_samples(target_frr: float, confidence: float = CONFIDENCE) -> int:
    """Normal scores needed before the max score bounds the false-reject rate at ``target_frr``."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - target_frr))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (n can be thousands)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(v - m) for v in logs))


def rate_upper_bound(failures: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper confidence bound of a rate seen as ``failures`` in ``n`` (exact binomial, Clopper-Pearson)."""
    if n <= 0 or failures >= n:
        return 1.0
    lo, hi = failures / n, 1.0
    for _ in range(60):  # P(Binom(n, p) <= failures) falls as p grows
        mid = (lo + hi) / 2
        if binom_cdf(failures, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def robust_sigma(scores: np.ndarray, floor: float = 0.0) -> float:
    """The spread of a normal fit to scores: max(sample SD, 1.4826·MAD), at least ``floor`` (needs ≥ 2 scores)."""
    s = np.asarray(scores, np.float64)
    mad = float(np.median(np.abs(s - np.median(s))))
    return max(float(s.std(ddof=1)), 1.4826 * mad, floor)


def frr_upper_bound(n: int, rank: int, confidence: float = CONFIDENCE) -> float:
    """95 % upper bound on the false-reject rate of the ``rank``-th smallest of n normal scores."""
    if n == 0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on α: P(Binom(n, 1-α) <= rank-1) is increasing in α
        mid = (lo + hi) / 2
        if binom_cdf(rank - 1, n, 1 - mid) >= confidence:
            hi = mid
        else:
            lo = mid
    return hi


def _stats(scores: np.ndarray) -> dict[str, float]:
    if scores.size == 0:
        return {}
    return {
        "min": float(scores.min()),
        "median": float(np.median(scores)),
        "mean": float(scores.mean()),
        "std": float(scores.std(ddof=1)) if scores.size > 1 else 0.0,
        "max": float(scores.max()),
    }


def fit_threshold(scores: np.ndarray | list[float], target_frr: float = DEFAULT_TARGET_FRR) -> Threshold:
    """Threshold for normal ``scores`` at ``target_frr`` by the rule in this module's docstring."""
    if not 0 < target_frr < 0.5:
        raise ValueError(f"target false-reject rate must be in (0, 0.5), got {target_frr}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no golden-sample scores: enroll at least two good parts to derive a threshold")
    if not np.all(np.isfinite(s)):
        raise ValueError("golden-sample scores contain NaN or infinity")
    n = int(s.size)
    need = required_samples(target_frr)
    stats = _stats(s)
    if n >= need:
        rank = next(r for r in range(1, n + 1) if binom_cdf(r - 1, n, 1 - target_frr) >= CONFIDENCE)
        return Threshold(
            float(s[rank - 1]), "order-statistic", target_frr, n, need, True, frr_upper_bound(n, rank), stats
        )
    warnings = [
        f"only {n} golden-sample scores; {need} are needed to support a {100 * target_frr:g}% false-reject "
        f"rate with 95% confidence: using the conservative extrapolated threshold"
    ]
    mean = float(s.mean())
    if n >= 3:
        sigma = robust_sigma(s)
    else:
        sigma = SMALL_SAMPLE_CV * abs(mean)
        warnings.append(f"fewer than 3 scores: spread assumed to be {100 * SMALL_SAMPLE_CV:g}% of the mean")
    z = max(NormalDist().inv_cdf(1 - target_frr), MIN_Z)
    value = max(float(s[-1]), mean + z * sigma)
    return Threshold(value, "normal-extrapolation", target_frr, n, need, False, frr_upper_bound(n, n), stats, warnings)


def refine_with_labels(
    threshold: Threshold, golden_scores: np.ndarray, good_scores: np.ndarray, bad_scores: np.ndarray
) -> tuple[Threshold, dict[str, float]]:
    """Refit with extra known-good scores; report escapes and false rejects on the labelled parts."""
    normal = np.concatenate([np.asarray(golden_scores, float), np.asarray(good_scores, float)])
    refit = fit_threshold(normal, threshold.target_frr)
    refit = Threshold(**{**refit.to_json(), "method": refit.method + "+labelled"})
    bad = np.asarray(bad_scores, float)
    good = np.asarray(good_scores, float)
    report = {
        "labelled_good": int(good.size),
        "labelled_bad": int(bad.size),
        "escape_rate": float((bad <= refit.value).mean()) if bad.size else float("nan"),
        "false_reject_rate": float((good > refit.value).mean()) if good.size else float("nan"),
        "threshold_before": threshold.value,
        "threshold_after": refit.value,
    }
    return refit, report


#: False-reject targets offered when labelled defects show what each would cost in escapes.
OPERATING_POINTS = (0.01, 0.02, 0.05, 0.10)


def normal_tail_frr(threshold: float, scores: np.ndarray) -> float:
    """False-reject rate a normal fit of the golden scores predicts at ``threshold`` (a model estimate)."""
    s = np.asarray(scores, np.float64)
    if s.size < 3:
        return float("nan")
    return float(1.0 - NormalDist(float(s.mean()), robust_sigma(s, 1e-12)).cdf(threshold))


def variety_warning(bank_scores: np.ndarray, k: int) -> str | None:
    """A warning when leave-one-out bank scores (distances, not z-scores) spread widely for ``k`` shots."""
    s = np.asarray(bank_scores, np.float64)
    if s.size < 4 or np.median(s) <= 0:
        return None
    med = float(np.median(s))
    cv = robust_sigma(s) / med
    if cv <= VARIED_CV:
        return None
    return (
        f"the golden parts vary a lot (leave-one-out score spread {100 * cv:.0f}% of the median): {k} shots "
        "may not cover normal variation; enroll more good parts, and check lighting, ROI and part pose"
    )


def _defect_expectations(
    threshold: Threshold, g: np.ndarray, d: np.ndarray, spread: float
) -> tuple[dict[str, Any], list[str]]:
    """Escape rates of the labelled defects at this threshold and at each operating point, and the words."""
    points = []
    for target in OPERATING_POINTS:
        # The normal model's point for each target, without fit_threshold's floor at the highest
        # golden score: with few goldens that floor makes every target collapse onto one threshold.
        t = float(g.mean()) + NormalDist().inv_cdf(1 - target) * spread
        points.append({"target_frr": target, "threshold": t, "expected_escape": float((d <= t).mean())})
    escape = float((d <= threshold.value).mean())
    figures = {
        "labelled_defects": int(d.size),
        "expected_escape": escape,
        "defect_margin_sd": float((np.median(d) - threshold.value) / spread),
        "operating_points": points,
    }
    words = [
        f"Of {d.size} labelled defects, {100 * escape:.0f}% would pass at this threshold "
        f"(target {100 * threshold.target_frr:g}% false rejects)."
    ]
    looser = [p for p in points if p["target_frr"] > threshold.target_frr + 1e-12]
    if escape > ESCAPE_WARN and looser:
        # The least false rejects that buy the fewest escapes: the first looser target at the minimum.
        alt = min(looser, key=lambda p: (round(p["expected_escape"], 6), p["target_frr"]))
        if alt["expected_escape"] < escape:
            words.append(
                f"With these parts the two cannot both be met: either {100 * threshold.target_frr:g}% false "
                f"rejects and about {100 * escape:.0f}% escapes, or {100 * alt['target_frr']:g}% and about "
                f"{100 * alt['expected_escape']:.0f}%; choose with the recipe's target false-reject rate, "
                "or enroll more labelled defects."
            )
        else:
            words.append(
                f"Accepting up to {100 * looser[-1]['target_frr']:g}% false rejects would not stop these "
                "escapes: the missed defects score like good parts; enroll more labelled defects of their "
                "kind, or use a stronger encoder."
            )
    return figures, words


def expectations(
    threshold: Threshold,
    golden_scores: np.ndarray,
    defect_scores: np.ndarray,
    k: int,
    warnings: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """What the product expects of this recipe on the line, in figures and plain words.

    From the held-out golden scores: the false-reject rate a normal fit predicts at the threshold,
    the distribution-free 95 % bound, and the margin between the threshold and the typical good
    part; ``warnings`` (e.g. :func:`variety_warning`) joined into the words. From labelled defects
    (held-out scores): the expected escape rate at this threshold and at each of
    :data:`OPERATING_POINTS`, and plain words when no threshold meets both targets.
    """
    g = np.asarray(golden_scores, np.float64)
    d = np.asarray(defect_scores, np.float64)
    med = float(np.median(g))
    mad = 1.4826 * float(np.median(np.abs(g - med)))
    spread = max(float(g.std(ddof=1)) if g.size > 1 else 0.0, mad, 1e-12)
    out: dict[str, Any] = {
        "golden_parts": k,
        "estimated_frr": normal_tail_frr(threshold.value, g),
        "frr_upper_bound_95": threshold.frr_upper_bound_95,
        "margin_sd": float((threshold.value - med) / spread),
        "warnings": list(warnings),
    }
    estimate = (
        f"about {100 * out['estimated_frr']:.1f}% false rejects (model estimate from {g.size} golden scores; "
        if math.isfinite(out["estimated_frr"])
        else f"false rejects that {g.size} golden scores cannot estimate ("
    )
    words = [
        f"Expect {estimate}at most {100 * threshold.frr_upper_bound_95:.0f}% with 95% confidence); the threshold "
        f"sits {out['margin_sd']:.1f} SDs above the typical good part."
    ]
    words += [f"Warning: {w}." for w in warnings]
    if d.size:
        defects, defect_words = _defect_expectations(threshold, g, d, spread)
        out.update(defects)
        words += defect_words
    out["explained"] = " ".join(words)
    # NaN (too few goldens for a model estimate) travels as null: strict JSON has no NaN.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
