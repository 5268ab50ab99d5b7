"""The line's drift watch: one :class:`~anomalygpt_edge.calibration.drift.DriftWatch` per camera's live recipe.

Fed from the verdict path (:class:`VerdictPublisher`, every published verdict, on the inspection
worker): O(1) amortised per part under one lock, no thread, and it never raises into the verdict
path. A camera's watch is rebuilt the first verdict after its inspector changed (a recipe switch,
a re-enrollment or a reload gives a new :class:`Inspector`): the watch compares the parts with the
goldens *of the recipe that judged them*, so the windows start empty then (the labels window
of a new version of the same recipe is kept: the line's defect share, which the watch's bands
allow for, did not change with the recipe; see ``calibration/drift.py``). A new watch costs
nothing up front: its bands are tabulated one window size at a time as the window fills.

Read by the status document (a ``drift`` object per camera, the plain-words ``warnings`` list), by
the heartbeat's ``drift`` source (Prometheus gauges per camera and recipe, see ``health.py``) and
by :meth:`Daemon.drift_states`. Labels (a technician's ``good`` / ``defect`` on an archived verdict)
reach the watch through :meth:`DriftWatches.on_label`.

The ``drift:`` config section (:class:`DriftConfig`) lives here, with the feature.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, model_validator

from anomalygpt_edge.calibration.drift import MAX_WINDOW, DriftSettings, DriftWatch
from anomalygpt_edge.runtime.values import Between, FieldError, Flag

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.inspection.verdict import Verdict
    from anomalygpt_edge.runtime.line.recipe_slots import RecipeSlots
    from anomalygpt_edge.runtime.recipes.inspector import Inspector

log = logging.getLogger(__name__)


class DriftConfig(BaseModel):
    """``drift:``: compare the scores of passed parts with the recipe's goldens over a rolling window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: Flag = True
    window_parts: Annotated[int, Between(2, MAX_WINDOW)] = 200  # the last this many parts (passed parts for the scores)
    # and, when set, only those of the last this many hours
    window_hours: Annotated[float, Between(0.001, 8760)] | None = None
    min_parts: Annotated[int, Between(1, MAX_WINDOW)] = 30  # no judgement before this many passed parts (or verdicts)

    @model_validator(mode="after")
    def min_parts_fit_the_window(self) -> DriftConfig:
        if self.min_parts > self.window_parts:
            raise FieldError(("min_parts",), f"must be at most window_parts ({self.window_parts})")
        return self

    def settings(self) -> DriftSettings:
        return DriftSettings(window_parts=self.window_parts, window_hours=self.window_hours, min_parts=self.min_parts)


def watch_for(inspector: Inspector, settings: DriftSettings) -> DriftWatch:
    """A watch on the inspector's recipe: its goldens' held-out scores, threshold and expected false rejects."""
    recipe = inspector.recipe
    golden = [s.score for s in recipe.samples if s.score is not None]
    expectation = (recipe.quality or {}).get("expectation") or {}
    expected = expectation.get("estimated_frr")
    if not isinstance(expected, (int, float)) or expected != expected:  # missing or NaN: the recipe's target
        expected = recipe.target_frr
    return DriftWatch(golden, inspector.threshold, float(expected), settings, name=recipe.name)


class DriftWatches:
    """Camera -> the drift watch of its live recipe; thread-safe."""

    def __init__(
        self, config: DriftConfig, slots: RecipeSlots, on_error: Callable[[str, str | None], None] | None = None
    ):
        self.config = config
        self.on_error = on_error  # the daemon's health.error: a failing watch shows in the status
        self.settings = config.settings()
        self.slots = slots
        self._lock = threading.Lock()
        self._watches: dict[str, tuple[Inspector, DriftWatch]] = {}

    def _watch(self, camera: str) -> DriftWatch | None:
        """The camera's watch for its current inspector (rebuilt when that changed); None when not live."""
        inspector = self.slots.current(camera)[0]
        if inspector is None:
            return None
        with self._lock:
            held = self._watches.get(camera)
            if held is not None and held[0] is inspector:
                return held[1]
        watch = watch_for(inspector, self.settings)
        if held is not None and held[1].name == watch.name:  # a new version of the same recipe: same line
            watch.carry_labels(held[1])
        with self._lock:
            self._watches[camera] = (inspector, watch)
        return watch

    def observe(self, camera: str, verdict: Verdict, at: float | None = None) -> None:
        """One published verdict of ``camera`` (never raises: this is the verdict path)."""
        if not self.config.enabled or verdict.verdict not in ("OK", "NG"):
            return
        try:
            watch = self._watch(camera)
            if watch is not None and watch.name == verdict.recipe:
                watch.observe(verdict.score, verdict.verdict, at)
        except Exception as exc:
            log.exception("camera %s: drift watch failed", camera)
            if self.on_error is not None:
                self.on_error(f"camera {camera}: drift watch failed: {exc!r}", camera)

    def on_label(self, camera_or_recipe: str, label: str, verdict: str, at: float | None = None) -> int:
        """A technician's label for a verdict, given to the watches of that camera or recipe; how many took it."""
        watches = [w for cam, w in self._live().items() if camera_or_recipe in (cam, w.name)]
        for watch in watches:
            watch.observe_label(label, verdict, at)
        return len(watches)

    def states(self) -> dict[str, dict[str, Any]]:
        """Camera -> ``{"recipe": name, **DriftState}`` for every camera whose live recipe has judged a part."""
        if not self.config.enabled:
            return {}
        return {cam: {"recipe": w.name, **w.state().to_json()} for cam, w in sorted(self._live().items())}

    def _live(self) -> dict[str, DriftWatch]:
        """Camera -> its watch, for the cameras whose inspector is still the one the watch was built for.

        A watch whose inspector was replaced (switch, re-enrollment) judged the previous recipe: it
        is neither shown nor labelled; the camera's next verdict starts the new one.
        """
        with self._lock:
            held = dict(self._watches)
        return {cam: w for cam, (insp, w) in held.items() if self.slots.current(cam)[0] is insp}

    def warnings(self, states: dict[str, dict[str, Any]] | None = None) -> list[str]:
        """The plain words of every flagged watch, naming the camera."""
        states = self.states() if states is None else states
        return [f"camera {cam}: {s['message']}" for cam, s in states.items() if s.get("message")]


#: The drift watch's figures in /metrics (the heartbeat's ``drift`` source: camera -> state), as
#: gauges ``anomalygpt_edge_<suffix>`` labelled ``camera`` and ``recipe``: suffix, state key, help.
DRIFT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("drift_flag", "drifting", "1 when passed parts score higher than the recipe's goldens allow"),
    ("drift_reject_rate_flag", "reject_rate_high", "1 when more parts are rejected than the goldens allow"),
    ("drift_labelled_frr_flag", "labelled_frr_high", "1 when more parts labelled good are rejected than expected"),
    ("drift_share_above_p95", "share_above_p95", "share of passed parts above the goldens' 95th percentile"),
    ("drift_share_band", "share_band", "the share above which the drift watch flags"),
    ("drift_auc", "auc", "share of (passed part, golden) pairs in which the part scores higher"),
    ("drift_auc_band", "auc_band", "the pair share above which the drift watch flags"),
    ("drift_passed_parts", "passed_parts", "passed parts in the drift window"),
    ("expected_false_reject_rate", "expected_false_reject", "false-reject rate expected now (model estimate)"),
    ("drift_reject_rate", "reject_rate", "share of the window's parts rejected"),
    ("drift_labelled_frr", "labelled_frr", "share of parts labelled good that were rejected"),
    ("drift_labelled_escape", "labelled_escape", "share of parts labelled defect that were passed"),
)


def drift_families(drift: Any) -> list[Metric]:
    """The drift states as Prometheus gauges per camera and recipe; a figure that is None is left out."""
    if not isinstance(drift, Mapping):
        return []
    out: list[Metric] = []
    for suffix, key, text in DRIFT_GAUGES:
        family = GaugeMetricFamily(f"anomalygpt_edge_{suffix}", text, labels=["camera", "recipe"])
        for camera, state in sorted(drift.items()):
            value = state.get(key) if isinstance(state, Mapping) else None
            if isinstance(value, (bool, int, float)) and value == value:
                family.add_metric([str(camera), str(state.get("recipe", ""))], float(value))
        out.append(family)
    return out
