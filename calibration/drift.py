"""Drift watch: do the parts the line passes still score like the recipe's golden parts did?

A recipe's threshold was set on the leave-one-out (LOO) scores of its k golden parts. When the
parts, the light or the lens change, good parts start to score higher; the false-reject rate
climbs only once they cross the threshold. This module notices the shift first, from the scores
of the parts the line *passed*, and says so in plain words. Pure numpy/math, no clock of its own
beyond ``time.time()`` as the default timestamp; the daemon feeds it (``runtime/line/drift_watch.py``).

What is compared, and why:

* **Only passed (OK) parts** enter the score window, so the window is the good-part score
  distribution *truncated at the threshold*. The goldens are truncated the same way (a golden
  scoring above the threshold is left out of the reference), so under "no drift" both samples
  come from one distribution F truncated at t and are exchangeable. Defective parts (NG) never
  bias the window; parts the drift pushed over the threshold leave it, which caps the statistics
  but never fakes a drift.
* **Few goldens** (k = 16 is typical): their own sampling noise dominates. Every band below is
  computed from k, so it is honest about how little 16 scores say; a window of a thousand parts
  cannot shrink the part of the noise that comes from the goldens.
* LOO banks hold k-1 goldens, so LOO scores run slightly *high* against live scores of the
  k-shot bank: under no drift the window scores a little lower than the goldens. Both tests are
  one-sided (scores *higher*), so this makes them conservative, never alarming.

The two statistics, each with its band (re-evaluated after every part, so each uses a small
per-look error rate chosen for "no false alarm in 1,000 parts"; see ``BENCHMARKS.md``):

1. **Share above the goldens' 95th percentile.** The reference is the golden order statistic
   g_(r) with r = min(k', ceil(0.95 (k'+1))) of the k' truncated goldens (the maximum for
   k' < 19). Under no drift the chance p that a new part lands above g_(r) is Beta(k'-r+1, r)
   distributed (whatever F is), so the count above it among m window parts is
   Beta-binomial(m, k'-r+1, r): exact and distribution-free, with the goldens' uncertainty in it.
   Band: the share whose upper tail has probability ``alpha_share``. (Truncation only lowers the
   share under no drift: conservative.) Its expected value, (k'-r+1)/(k'+1), is what the message
   compares with.
2. **Mann-Whitney (AUC) of window vs goldens**: the share of (window part, golden) pairs in which
   the part scores higher; 0.5 under no drift, with the exact permutation variance
   (m+k'+1)/(12 m k'). Band: 0.5 + ``z_auc`` standard deviations. Sensitive to a shift of the
   whole distribution, where (1) sees only its upper tail.

``drifting`` is true once the window holds at least ``min_parts`` passed parts and either statistic
is above its band. Both are updated in O(1) (O(log k) for the rank) per part: each window entry
keeps its own count of goldens below it and whether it is above the reference, so adding and
evicting a part adjusts two running sums; each window size's band is tabulated the first time
the window reaches it (O(size) numpy work, once).

**Expected false rejects now** (the figure in the message): a location-shift model. The shift is
the median of the passed-part window minus the median of the truncated goldens (medians survive
the truncation while fewer than half of the good parts are rejected); the estimate is the normal
tail fit of the goldens (mean, σ = max(SD, 1.4826·MAD), as :func:`threshold.normal_tail_frr`)
shifted by it, read at the threshold. It is a model estimate, said as "≈", and it looks ahead
(parts not rejected yet count): the shift model keeps the goldens' spread, so a drift that also
narrows the scores is overstated (the daemon test's defocused parts: ≈ 39 % said, 1 of 16 rejected),
and once more than half of the good parts are rejected the passed-part median understates the
shift (bsdata's test replay: ≈ 4.7 % said while 66 % of its good parts are rejected; the
reject-rate flag says that one). Not capped at the observed reject rate on purpose: the point is to
say it before the rejects come.

The **reject rate** (NG among all OK/NG verdicts in the last ``window_parts`` verdicts; ERROR is
not a judgement and is left out) is tested against what the goldens allow, not against the
recipe's point estimate: the threshold sits above r_t of the k goldens, so under no drift a good
part's chance of rejection is at most Beta(k-r_t+1, r_t) distributed, and the band is the
Beta-binomial tail at ``alpha_rate`` (with k = 16 and the threshold above every golden, a good
part's false-reject rate can honestly be 10 %: a binomial test against the 1 % estimate would
alarm on such a recipe's own good parts). The count includes defective parts, so a flag says
"more rejects than good parts explain": drift, or a run of real defects. **Labelled** verdicts (a
technician said ``good`` or ``defect``) give the false-reject rate (NG among parts labelled good,
tested against the same band) and the escape rate (OK among parts labelled defect, reported).
The expected rate (``expected_reject_rate``, the recipe's estimate) is only quoted in the words.

**Labelled defects in the windows.** Both the passed-part window and the reject count assume the
parts are (nearly all) good. A line that passes many defects, or rejects many real ones (as a
recipe that has learnt from labelled defects does), breaks that: escaped defects score above the
goldens and real rejects are not false ones, and the watch would cry "drift" after every approved
change that made the recipe catch more (``bench learn``: deeppcb's passed window was about half
escaped defects, magnetic tile's test line is 47 % defective; the good parts themselves scored
like the new version's goldens, Mann-Whitney 0.40-0.61). So once the labels window holds at least
``MIN_LABELLED`` labels with a defect among them, the labels say how much may be defects: with π
the one-sided 95 % upper bound (exact binomial) of the labelled defect share, up to ``n * π`` of
the window's rejects are taken as real (the rest tested against the band of the goods left);
with s the same bound among the labelled OK verdicts, the score tests allow the escaped defects'
worst case (every one above the goldens): share count band + ``m * s``, pair-share band
``(1 - s) * band + s``. Upper bounds, so labels only ever make the watch quieter than the goods
alone would, never louder, and on a line with many defects the unlabelled statistics then say
little: the labelled goods' false rejects (tested at full strength) are the flag there. No labelled
defect, or fewer than ``MIN_LABELLED`` labels, changes nothing (bsdata's early flag, the control).
It assumes the labels are a fair sample of the verdicts (a technician labelling only rejects
inflates π and quiets the watch). A watch rebuilt for a new version of the same recipe keeps the
labels window (:meth:`DriftWatch.carry_labels`): the line's defects did not change with the recipe.

Windows: the last ``window_parts`` parts; with ``window_hours`` also only those of the last that
many hours (both limits apply, so the bands' tables stay bounded).
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from anomalygpt_edge.calibration.threshold import normal_tail_frr, rate_upper_bound

#: Quantile of the goldens whose exceedance share is watched.
REFERENCE_Q = 0.95
DEFECT_LABELS = frozenset({"defect"})
#: Largest window (parts): bands are tabulated per window size, lazily (see :class:`_Bands`).
MAX_WINDOW = 5000
#: Labelled verdicts of a kind (OK or NG) needed before their defect share adjusts the bands.
MIN_LABELLED = 10
#: Confidence of the labelled defect shares' upper bounds.
LABEL_CONFIDENCE = 0.95


@dataclass(frozen=True)
class DriftSettings:
    """How the watch looks: window size (parts, optionally hours), when it starts judging, error rates.

    The default error rates are per look (the watch judges after every part): ``alpha_share`` and
    ``alpha_rate`` one-sided tail probabilities, ``z_auc`` standard deviations (3.5 ≈ 2.3e-4).
    """

    window_parts: int = 200
    window_hours: float | None = None
    min_parts: int = 30
    alpha_share: float = 1e-4
    z_auc: float = 3.5
    alpha_rate: float = 1e-4

    def __post_init__(self) -> None:
        if not 2 <= self.window_parts <= MAX_WINDOW:
            raise ValueError(f"drift window_parts must be 2..{MAX_WINDOW}, got {self.window_parts}")
        if self.window_hours is not None and not 0 < self.window_hours <= 24 * 365:
            raise ValueError(f"drift window_hours must be in (0, 8760], got {self.window_hours}")
        if not 1 <= self.min_parts <= self.window_parts:
            raise ValueError(f"drift min_parts must be 1..window_parts, got {self.min_parts}")
        for name in ("alpha_share", "alpha_rate"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"drift {name} must be in (0, 0.5), got {getattr(self, name)}")
        if not 0 < self.z_auc < 10:
            raise ValueError(f"drift z_auc must be in (0, 10), got {self.z_auc}")


@dataclass(frozen=True)
class DriftState:
    """What the watch says now: flags, statistics with their bands, estimates, plain words."""

    drifting: bool
    reject_rate_high: bool
    labelled_frr_high: bool
    passed_parts: int
    goldens: int
    share_above_p95: float | None
    share_expected: float
    share_band: float | None
    auc: float | None
    auc_band: float | None
    expected_false_reject: float | None
    enrolled_false_reject: float | None
    verdicts: int
    reject_rate: float | None
    expected_reject_rate: float | None
    reject_rate_band: float | None
    labelled_good: int
    labelled_defect: int
    labelled_frr: float | None
    labelled_escape: float | None
    first_flag_part: int | None
    first_reject_flag_verdict: int | None
    message: str | None

    @property
    def flagged(self) -> bool:
        """Any of the three flags."""
        return self.drifting or self.reject_rate_high or self.labelled_frr_high

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _log_betabinom_pmf(m: int, a: float, b: float) -> np.ndarray:
    """log P(N = j) + const, j = 0..m, for N ~ Beta-binomial(m, a, b) (from the ratio of successive terms)."""
    j = np.arange(m, dtype=np.float64)
    ratio = np.log(m - j) - np.log(j + 1) + np.log(j + a) - np.log(m - j - 1 + b)
    return np.concatenate([[0.0], np.cumsum(ratio)])


def _upper_count(log_pmf: np.ndarray, alpha: float) -> int:
    """Smallest c with P(N >= c) <= alpha (N's log pmf given); len(pmf) when none is."""
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    tail = np.cumsum(pmf[::-1])[::-1]  # tail[c] = P(N >= c)
    ok = np.nonzero(tail <= alpha)[0]
    return int(ok[0]) if ok.size else len(pmf)


class _Bands:
    """For each size n, the smallest count c with P(N >= c) <= alpha, N ~ Beta-binomial(n, a, b).

    Tabulated lazily, each size once (O(n) numpy work the first time a window reaches size n), so a
    new watch costs nothing up front on the verdict path and a growing window pays one size per part.
    """

    def __init__(self, a: float, b: float, alpha: float):
        self.a, self.b, self.alpha = a, b, alpha
        self._counts: dict[int, int] = {0: 1}

    def __getitem__(self, n: int) -> int:
        count = self._counts.get(n)
        if count is None:
            count = self._counts[n] = _upper_count(_log_betabinom_pmf(n, self.a, self.b), self.alpha)
        return count


@functools.lru_cache(maxsize=4096)
def share_upper(k: int, n: int, confidence: float = LABEL_CONFIDENCE) -> float:
    """One-sided upper confidence bound of a share seen as ``k`` of ``n`` (exact binomial, Clopper-Pearson)."""
    return rate_upper_bound(k, n, confidence)


def _tail_frr(threshold: float, golden: np.ndarray, shift: float = 0.0) -> float | None:
    """:func:`threshold.normal_tail_frr` of the goldens' normal fit moved by ``shift`` (None below 3 goldens)."""
    if golden.size < 3:
        return None
    return normal_tail_frr(threshold - shift, golden)


class DriftWatch:
    """One recipe's drift watch; thread-safe (one lock, no thread), O(1) amortised per part."""

    def __init__(
        self,
        golden_scores: Sequence[float],
        threshold: float,
        expected_reject_rate: float | None,
        settings: DriftSettings | None = None,
        *,
        name: str = "recipe",
    ):
        self.settings = settings or DriftSettings()
        self.name = name
        self.threshold = float(threshold)
        g = np.asarray([float(s) for s in golden_scores if s is not None], np.float64)
        g = g[np.isfinite(g)]
        self._all_golden = g
        self.golden = np.sort(g[g <= self.threshold])  # truncated as the passed-part window is
        self.k = int(self.golden.size)
        self.expected_reject_rate = expected_reject_rate
        if self.k >= 2:
            self._r = min(self.k, math.ceil(REFERENCE_Q * (self.k + 1)))
            self.reference = float(self.golden[self._r - 1])
            a, b = self.k - self._r + 1, self._r
            self.share_expected = a / (a + b)
            self._share_bands: _Bands | None = _Bands(a, b, self.settings.alpha_share)
        else:  # nothing to compare with: the watch only counts
            self._r, self.reference, self.share_expected, self._share_bands = 0, math.inf, 0.0, None
        # The threshold sits above r_t of the k goldens: P(good part > threshold) <= Beta(k-r_t+1, r_t).
        r_t, k_all = int(np.sum(g <= self.threshold)), int(g.size)
        self._rate_bands = _Bands(k_all - r_t + 1, r_t, self.settings.alpha_rate) if r_t >= 1 else None
        self.rate_allowed = (k_all - r_t + 1) / (k_all + 1) if r_t >= 1 else None
        self._lock = threading.Lock()
        self._passed: deque[tuple[float, float, int, bool]] = deque()  # (at, score, goldens below, above ref)
        self._u = 0.0  # sum of goldens-below counts (Mann-Whitney U of the window)
        self._above = 0
        self._verdicts: deque[tuple[float, bool]] = deque()  # (at, rejected)
        self._rejects = 0
        self._labels: deque[tuple[float, bool, bool]] = deque()  # (at, labelled defect, rejected)
        self._label_counts = [0, 0, 0, 0]  # labelled OK, of them defect, labelled NG, of them defect
        self._parts_seen = 0
        self._verdicts_seen = 0
        self._first_flag: int | None = None  # passed parts seen when the score drift was first flagged
        self._first_rate_flag: int | None = None  # verdicts seen when the reject rate was first flagged

    # -- feeding ------------------------------------------------------------------------------
    def observe(self, score: float | None, verdict: str, at: float | None = None) -> None:
        """One verdict: an OK part's score joins the passed-part window; OK and NG count for the reject rate."""
        if verdict not in ("OK", "NG"):
            return
        now = time.time() if at is None else float(at)
        with self._lock:
            self._verdicts_seen += 1
            self._verdicts.append((now, verdict == "NG"))
            self._rejects += verdict == "NG"
            if len(self._verdicts) > self.settings.window_parts:
                self._rejects -= self._verdicts.popleft()[1]
            if verdict == "OK" and score is not None and math.isfinite(score) and self.k >= 2:
                below = bisect.bisect_left(self.golden, score) + 0.5 * (
                    bisect.bisect_right(self.golden, score) - bisect.bisect_left(self.golden, score)
                )
                above = score > self.reference
                self._passed.append((now, float(score), int(below * 2), above))  # 2×: ties count ½
                self._u += below
                self._above += above
                self._parts_seen += 1
                if len(self._passed) > self.settings.window_parts:
                    self._evict_passed()
            self._expire(now)
            if self._first_flag is None and self._score_drift()[0]:
                self._first_flag = self._parts_seen
            if self._first_rate_flag is None and self._rate_high(len(self._verdicts), self._rejects):
                self._first_rate_flag = self._verdicts_seen

    def observe_label(self, label: str, verdict: str, at: float | None = None) -> None:
        """A technician's label (``good`` / ``defect``) for a verdict (``OK`` / ``NG``)."""
        if verdict not in ("OK", "NG") or label not in ("good", "defect"):
            return
        now = time.time() if at is None else float(at)
        with self._lock:
            self._add_label((now, label in DEFECT_LABELS, verdict == "NG"))
            self._expire(now)

    def carry_labels(self, previous: DriftWatch) -> None:
        """Start with ``previous``'s labels window (a new version of the same recipe: same line, same defects)."""
        with previous._lock:
            labels = list(previous._labels)
        with self._lock:
            for item in labels:
                self._add_label(item)

    def _add_label(self, item: tuple[float, bool, bool]) -> None:
        self._labels.append(item)
        self._count_label(item, 1)
        if len(self._labels) > self.settings.window_parts:
            self._count_label(self._labels.popleft(), -1)

    def _count_label(self, item: tuple[float, bool, bool], sign: int) -> None:
        _, defect, rejected = item
        self._label_counts[2 * rejected] += sign
        self._label_counts[2 * rejected + 1] += sign * defect

    def _defect_share(self, passed: bool) -> float:
        """Upper bound of the labelled defect share among the labelled OK verdicts (``passed``) or among all
        labelled verdicts; 0 below MIN_LABELLED labels or with no labelled defect."""
        c = self._label_counts
        n, k = (c[0], c[1]) if passed else (c[0] + c[2], c[1] + c[3])
        return share_upper(k, n) if n >= MIN_LABELLED and k else 0.0

    def _real_rejects(self, n: int, rejects: int) -> float:
        """Of ``rejects`` in ``n`` verdicts, how many the labelled defect share can explain (its upper bound)."""
        return min(float(rejects), n * self._defect_share(passed=False))

    def _evict_passed(self) -> None:
        _, _, below2, above = self._passed.popleft()
        self._u -= below2 / 2
        self._above -= above

    def _expire(self, now: float) -> None:
        hours = self.settings.window_hours
        if hours is None:
            return
        cutoff = now - 3600.0 * hours
        while self._passed and self._passed[0][0] < cutoff:
            self._evict_passed()
        while self._verdicts and self._verdicts[0][0] < cutoff:
            self._rejects -= self._verdicts.popleft()[1]
        while self._labels and self._labels[0][0] < cutoff:
            self._count_label(self._labels.popleft(), -1)

    # -- judging ------------------------------------------------------------------------------
    def _score_drift(self) -> tuple[bool, float | None, float | None, float | None, float | None]:
        """(drifting, share, share band, auc, auc band) of the current window; lock held."""
        m = len(self._passed)
        if self._share_bands is None or m == 0:
            return False, None, None, None, None
        share = self._above / m
        share_band = self._share_bands[m] / m
        escaped = self._defect_share(passed=True)  # passed parts that may be defects (labels' bound)
        share_count = min(m + 1, self._share_bands[m] + math.ceil(m * escaped))
        share_band = share_count / m
        auc = self._u / (m * self.k)
        auc_band = 0.5 + self.settings.z_auc * math.sqrt((m + self.k + 1) / (12.0 * m * self.k))
        auc_band = (1 - escaped) * auc_band + escaped
        enough = m >= self.settings.min_parts
        drifting = enough and (self._above >= share_count or auc > auc_band)
        return drifting, share, share_band, auc, auc_band

    def _rate_high(self, n: int, rejects: int, labelled: bool = False) -> bool:
        """Is ``rejects`` of ``n`` above what the goldens allow good parts (the labelled defects' rejects out)?"""
        if self._rate_bands is None or n < self.settings.min_parts:
            return False
        if labelled:  # the labelled goods' own rejects: nothing to take out
            return bool(rejects >= self._rate_bands[n])
        real = self._real_rejects(n, rejects)
        goods = max(1, round(n - real))
        return bool(goods >= self.settings.min_parts and rejects - real >= self._rate_bands[goods])

    def _rate_band(self, n: int, rejects: int) -> float | None:
        """The reject share above which the reject-rate flag is raised now (labelled defects' rejects allowed for)."""
        if self._rate_bands is None or not n:
            return None
        real = self._real_rejects(n, rejects)
        return (self._rate_bands[max(1, round(n - real))] + real) / n

    def state(self, now: float | None = None) -> DriftState:
        """The statistics, bands, flags and plain words now (windows expired to ``now``)."""
        with self._lock:
            self._expire(time.time() if now is None else now)
            drifting, share, share_band, auc, auc_band = self._score_drift()
            scores = np.array([p[1] for p in self._passed], np.float64)
            n, rejects = len(self._verdicts), self._rejects
            good = [rej for _, defect, rej in self._labels if not defect]
            bad = [rej for _, defect, rej in self._labels if defect]
            first, first_rate = self._first_flag, self._first_rate_flag
            rate_high, rate_band = self._rate_high(n, rejects), self._rate_band(n, rejects)
        expected_now = None
        if scores.size and self.k >= 3:
            expected_now = _tail_frr(self.threshold, self.golden, float(np.median(scores) - np.median(self.golden)))
        state = DriftState(
            drifting=drifting,
            reject_rate_high=rate_high,
            labelled_frr_high=self._rate_high(len(good), sum(good), labelled=True),
            passed_parts=int(scores.size),
            goldens=self.k,
            share_above_p95=share,
            share_expected=self.share_expected,
            share_band=share_band,
            auc=auc,
            auc_band=auc_band,
            expected_false_reject=expected_now,
            enrolled_false_reject=_tail_frr(self.threshold, self.golden) if self.k >= 3 else None,
            verdicts=n,
            reject_rate=rejects / n if n else None,
            expected_reject_rate=self.expected_reject_rate,
            reject_rate_band=rate_band,
            labelled_good=len(good),
            labelled_defect=len(bad),
            labelled_frr=sum(good) / len(good) if good else None,
            labelled_escape=sum(not r for r in bad) / len(bad) if bad else None,
            first_flag_part=first,
            first_reject_flag_verdict=first_rate,
            message=None,
        )
        return _with_message(state, self.name)


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f} %" if x < 0.1 else f"{100 * x:.0f} %"


def _with_message(s: DriftState, name: str) -> DriftState:
    """The state with its plain words (None when nothing is flagged)."""
    words: list[str] = []
    if s.drifting:
        why = (
            f"{_pct(s.share_above_p95)} of the last {s.passed_parts} passed parts score above the goldens' "
            f"95th percentile, {_pct(s.share_expected)} expected"
            if s.share_band is not None and s.share_above_p95 is not None and s.share_above_p95 >= s.share_band
            else f"the last {s.passed_parts} passed parts outscore the goldens in {_pct(s.auc)} of pairs, 50 % expected"
        )
        words.append(
            f"recipe {name}: good parts score higher than at enrollment ({why}); expected false rejects now "
            f"≈ {_pct(s.expected_false_reject)} (≈ {_pct(s.enrolled_false_reject)} at enrollment)"
        )
    if s.reject_rate_high:
        words.append(
            f"recipe {name}: {_pct(s.reject_rate)} of the last {s.verdicts} parts were rejected, more than "
            f"{s.goldens} goldens allow for good parts (about {_pct(s.expected_reject_rate)} expected): good parts "
            f"score higher than at enrollment, or more parts are defective"
        )
    if s.labelled_frr_high:
        words.append(
            f"recipe {name}: {_pct(s.labelled_frr)} of the {s.labelled_good} parts labelled good were rejected "
            f"(about {_pct(s.expected_reject_rate)} expected): good parts score higher than at enrollment"
        )
    return replace(s, message="; ".join(words)) if words else s
