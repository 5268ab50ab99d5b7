"""The recipe watch: a running daemon picks up what other processes commit to its cameras' recipes.

``recipe.json`` is the single commit point of a recipe (``recipes/store.py`` writes it atomically,
after the banks, under the per-recipe writer lock). A technician's ``recipe rollback``, ``recipe
apply``, ``calibrate --recipe X`` or ``enroll --recipe X`` beside the running daemon commits there;
without this watch the cameras would go on inspecting with the bank and threshold they loaded, a
fast and well-formed answer from a stale recipe.

Thread ``recipe-watch`` (supervised, never on the verdict path) looks every
``storage.recipe_watch_s`` at the stat of each used recipe's ``recipe.json`` (inode, modification
time, size: an atomic replace changes the inode) and compares it with the :class:`RecipeStamp` each
camera's recipe was loaded from. When it differs it loads the committed recipe under the writer
lock and reloads the cameras on it (:meth:`RecipeSlots.reload_users`) only if what is committed
differs from what they run (:func:`committed_identity`: bank and head with their sha256 records,
threshold, samples, settings; not when or by whom it was written), so a touch, or a rewrite of the
same content, only notes the new stat. A reload is listed in the status's ``recipe_changes``
(``action: reload``, ``by: store (another process)``) and logged in one line; a commit that makes
the recipe not live (a damaged file) leaves its cameras answering ERROR with the reason.

The daemon's own writers (MQTT enroll, rollback and apply, the station) reload the cameras
themselves right after their commit, and every load notes its stamp. So that such a commit is not
reloaded a second time, a recipe the daemon is loading or rolling back
(:meth:`RecipeSlots.reloading`) is left alone, and a changed stat is acted on only once it has
stayed unclaimed for :data:`SETTLE_S` (an own writer's reload follows its commit within
milliseconds; a foreign commit is picked up within ``recipe_watch_s`` plus that).

A check that fails (a store the daemon cannot read, a bug) is logged and reported to the daemon's
health (the status's ``last_error`` names the recipe), like a failing drift watch; the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from anomalygpt_edge.runtime.line.recipe_slots import CommitStat, RecipeSlots, RecipeStamp
from anomalygpt_edge.runtime.recipes.store import Recipe, RecipeError, now_iso

log = logging.getLogger(__name__)

#: Who a reload of a commit the daemon did not make is attributed to in ``recipe_changes``.
OTHER_WRITER = "store (another process)"
#: How long a changed ``recipe.json`` is left for the daemon's own writer to reload, at most.
SETTLE_S = 0.5
#: ``recipe.json`` keys that say when and by whom, not what: a commit differing only there is no change.
NOT_CONTENT = ("created_at", "updated_at", "change")


def committed_identity(recipe: Recipe | None) -> dict[str, Any] | None:
    """What a camera inspects with from ``recipe``: its ``recipe.json`` content but for the keys of
    :data:`NOT_CONTENT` (bank and head file with their sha256 records, version, threshold, samples,
    ROI and the other settings); None for a recipe that could not be read."""
    if recipe is None:
        return None
    data = recipe.to_json()
    for key in NOT_CONTENT:
        data.pop(key, None)
    return data


class RecipeWatch:
    """Reloads the cameras whose recipe another process committed anew (see the module's docstring)."""

    def __init__(
        self, slots: RecipeSlots, interval_s: float, on_error: Callable[[str, str | None], None] | None = None
    ):
        self.slots = slots
        self.interval_s = interval_s
        self.on_error = on_error  # the daemon's health.error: a failing check shows in the status
        #: Recipe -> the changed stat seen and left to settle, and when it was first seen (monotonic).
        self.pending: dict[str, tuple[CommitStat | None, float]] = {}
        self._failing: dict[str, str] = {}  # recipe -> its last failure, logged once with its trace
        self.looks = 0  # complete looks at every used recipe so far (tests wait on it)

    def run(self, stop: threading.Event) -> None:
        """Check every ``interval_s`` (sooner while a change settles) until ``stop`` is set."""
        while not stop.wait(min(SETTLE_S, self.interval_s) if self.pending else self.interval_s):
            self.check_all()

    def check_all(self) -> list[dict[str, Any]]:
        """Check each recipe a camera uses; the changes (reloads) made. Never raises."""
        recipes = self.slots.used_recipes()
        for gone in set(self.pending) - set(recipes):  # no camera on it any more (a switch)
            self.pending.pop(gone, None)
        changes = []
        for recipe in recipes:
            try:
                change = self.check(recipe)
            except Exception as exc:  # any failure: reported, and the next look tries again
                self._failed(recipe, exc)
                continue
            self._failing.pop(recipe, None)
            if change is not None:
                changes.append(change)
        self.looks += 1
        return changes

    def check(self, recipe: str) -> dict[str, Any] | None:
        """Reload ``recipe``'s cameras when another process committed a different recipe; the change made."""
        if not self._stale(recipe, self.slots.recipe_stat(recipe)) or self.slots.is_reloading(recipe):
            return None  # the usual look: one stat, no lock
        # Under the writer lock: no commit moves recipe.json (or collects its bank) while it loads.
        with self.slots.store.writer(recipe):
            stat = self.slots.recipe_stat(recipe)
            stale = self._stale(recipe, stat)
            if not stale or self.slots.is_reloading(recipe):
                return None
            if not self._settled(recipe, stat):
                return None
            try:
                committed, problem = self.slots.store.load(recipe), None
            except RecipeError as exc:  # damaged or removed: the reload leaves the cameras ERROR, saying why
                committed, problem = None, str(exc)
            identity = committed_identity(committed)
            if identity is not None and all(committed_identity(s.committed) == identity for s in stale.values()):
                self.slots.restamp(list(stale), stat)  # touched, or rewritten as it was: nothing to reload
                return None
            return self._reload(recipe, stale, committed, problem)

    def _settled(self, recipe: str, stat: CommitStat | None) -> bool:
        """Whether ``stat`` has stayed unclaimed for :data:`SETTLE_S` (then it is no longer pending)."""
        now = time.monotonic()
        seen = self.pending.get(recipe)
        if seen is None or seen[0] != stat:
            self.pending[recipe] = (stat, now)  # new: the daemon's own writer may be about to reload
            return False
        if now - seen[1] < SETTLE_S:
            return False
        del self.pending[recipe]
        return True

    def _stale(self, recipe: str, stat: CommitStat | None) -> dict[str, RecipeStamp]:
        """Camera -> stamp of each camera on ``recipe`` loaded from another ``recipe.json`` than ``stat``;
        a recipe that is no longer stale needs no settling."""
        stale = {c: s for c, s in self.slots.stamps_of(recipe).items() if s.stat != stat}
        if not stale:
            self.pending.pop(recipe, None)
        return stale

    def _reload(
        self, recipe: str, stale: dict[str, RecipeStamp], committed: Recipe | None, problem: str | None
    ) -> dict[str, Any]:
        """Record the change, reload every camera on ``recipe`` and announce it (as a rollback does)."""
        was = next((s.committed.bank_version for s in stale.values() if s.committed is not None), None)
        cameras = sorted(self.slots.stamps_of(recipe))
        threshold = committed.threshold if committed is not None else None
        change: dict[str, Any] = {
            "recipe": recipe,
            "action": "reload",
            "from": was,
            "to": committed.bank_version if committed is not None else None,
            "threshold": threshold.value if threshold is not None else None,
            "cameras": cameras,
            "by": OTHER_WRITER,
            "at": now_iso(),
        }
        if problem is not None:
            change["problem"] = problem
        self.slots.record_change(change)
        to = f"v{change['to']}" if problem is None else f"not inspecting ({problem})"
        log.warning("recipe %s committed by another process: v%s -> %s, reloading %s", recipe, was, to, cameras)
        self.slots.reload_users(recipe)  # reloads each camera on it (stamping it), then republishes the status
        return change

    def _failed(self, recipe: str, exc: Exception) -> None:
        """A failing check: logged (with its trace the first time), and reported to the daemon's health."""
        message = f"recipe watch: recipe {recipe}: check failed: {exc!r}"
        if self._failing.get(recipe) != message:
            log.exception("%s", message)
        self._failing[recipe] = message
        if self.on_error is not None:
            self.on_error(message, None)
