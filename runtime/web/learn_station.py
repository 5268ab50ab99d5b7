"""The station's side of "the line learns" (issue 14): proposals from labels, recipe versions, rollback.

:class:`LearnMixin` is mixed into :class:`~anomalygpt_edge.runtime.web.daemon_station.DaemonStation`
and works on the line daemon's own parts, so the page does what MQTT ``cmd/recipe propose|apply|
discard|rollback`` does:

* proposals: the daemon's proposal desk (``Daemon.proposals``, ``runtime/line/proposals.py``)
  computes one from the recipe's labelled verdicts in the archive (seconds: the HTTP handler runs on
  a worker thread, never the event loop), keeps it pending, applies it in one crash-safe recipe
  commit (a new bank version; the cameras on the recipe reload it) or drops it;
* a pending proposal computed on a bank version that is no longer live is **stale**: applying it
  is refused with :class:`StaleProposalError` (the page answers 409 with the line) and nothing changes;
* versions and rollback: the recipe store's kept versions, and ``RecipeSlots.rollback`` (reloads
  the cameras using the recipe and records the change in the status' ``recipe_changes``).
"""

from __future__ import annotations

import threading
from typing import Any

from anomalygpt_edge.runtime.recipes.store import RecipeError
from anomalygpt_edge.runtime.web.station_protocol import NotFoundError, StaleProposalError, StationError

#: At most this many labelled verdicts are counted for the page (the archive keeps more).
MAX_COUNTED_LABELS = 100_000


class LearnMixin:
    """Proposals, versions and rollback over the line daemon (needs ``self.daemon`` and ``self.store``)."""

    daemon: Any
    store: Any
    _learn_lock = threading.Lock()  # one proposal computed or applied at a time in this process

    # -- helpers -------------------------------------------------------------------------------------
    def _known(self, recipe: str) -> None:
        if not self.store.exists(recipe):
            names = ", ".join(self.store.names()) or "none"
            raise NotFoundError(f"no recipe '{recipe}' (recipes: {names})")

    def _desk(self) -> Any:
        desk = getattr(self.daemon, "proposals", None)
        if desk is None:
            raise StationError("this line daemon computes no proposals (it keeps no verdict archive)")
        return desk

    def _live_version(self, recipe: str) -> int:
        return int(self.store.load(recipe).bank_version)

    def _proposal_json(self, recipe: str, proposal: Any) -> dict[str, Any]:
        """The proposal as the page shows it: its own fields, the live version and whether it is stale."""
        data: dict[str, Any] = dict(proposal.to_json()) if hasattr(proposal, "to_json") else dict(proposal)
        live = self._live_version(recipe)
        data["live_bank_version"] = live
        data["stale"] = int(data.get("base_bank_version", -1)) != live
        return data

    def _stale(self, recipe: str, base: int) -> StaleProposalError | None:
        live = self._live_version(recipe)
        if base == live:
            return None
        return StaleProposalError(
            f"recipe {recipe}: the proposal was computed on bank version {base}, the live one is {live} "
            "(the recipe changed since): propose again"
        )

    # -- labels and proposals ------------------------------------------------------------------------
    def labelled_counts(self, recipe: str) -> dict[str, Any]:
        """The recipe's labelled verdicts (the latest label of each), as the Learn page counts them."""
        self._known(recipe)
        writer = self.daemon.archive
        if writer is None:
            raise StationError("labels are kept in the line daemon's archive, and this daemon keeps none")
        rows = writer.archive.labelled(recipe=recipe)[:MAX_COUNTED_LABELS]
        good = [r for r in rows if r.label == "good"]
        defect = [r for r in rows if r.label == "defect"]
        return {
            "recipe": recipe,
            "good": len(good),
            "defect": len(defect),
            "false_rejects": sum(r.verdict == "NG" for r in good),  # labelled good, rejected by the line
            "escapes": sum(r.verdict == "OK" for r in defect),  # labelled defect, passed by the line
            "without_image": sum(r.image_path is None for r in rows),  # cannot be re-scored
            "bank_version": self._live_version(recipe),
        }

    def propose(self, recipe: str, by: str) -> dict[str, Any]:
        """Compute the recipe's proposal from its labelled verdicts; it replaces any pending one."""
        self._known(recipe)
        desk = self._desk()
        with self._learn_lock:
            try:
                proposal = desk.propose(recipe, by)
            except RecipeError as exc:
                raise StationError(str(exc)) from None
        return self._proposal_json(recipe, proposal)

    def proposal(self, recipe: str) -> dict[str, Any]:
        self._known(recipe)
        pending = self._desk().pending(recipe)
        if pending is None:
            raise NotFoundError(f"recipe {recipe} has no pending proposal: label some verdicts, then Propose")
        return self._proposal_json(recipe, pending)

    def apply_proposal(
        self, recipe: str, by: str, reason: str | None = None, base_bank_version: int | None = None
    ) -> dict[str, Any]:
        """Apply the pending proposal (one recipe commit); stale or not the one the page showed: refused."""
        self._known(recipe)
        desk = self._desk()
        with self._learn_lock:
            pending = desk.pending(recipe)
            if pending is None:
                raise NotFoundError(f"recipe {recipe} has no pending proposal to apply: propose first")
            base = int(pending.base_bank_version)
            if base_bank_version is not None and base_bank_version != base:
                raise StaleProposalError(
                    f"recipe {recipe}: the proposal on this page was computed on bank version {base_bank_version}, "
                    f"the pending one on {base}: look at it again before applying"
                )
            stale = self._stale(recipe, base)
            if stale is not None:
                raise stale
            try:
                change = desk.apply(recipe, by, reason or f"proposal applied on the station by {by}")
            except RecipeError as exc:
                # The recipe moved between the check and the commit, or the labels it used changed since.
                stale = self._stale(recipe, base) or (StaleProposalError(str(exc)) if "stale" in str(exc) else None)
                raise (stale or StationError(str(exc))) from None
        out = dict(change) if isinstance(change, dict) else {"result": change}
        out.setdefault("recipe", recipe)
        out["bank_version"] = self._live_version(recipe)
        out["base_bank_version"] = base
        return out

    def discard_proposal(self, recipe: str, by: str) -> dict[str, Any]:
        self._known(recipe)
        desk = self._desk()
        with self._learn_lock:
            if desk.pending(recipe) is None:
                raise NotFoundError(f"recipe {recipe} has no pending proposal to discard")
            desk.discard(recipe, by)
        return {"recipe": recipe, "discarded": True}

    # -- versions and rollback -----------------------------------------------------------------------
    def recipe_versions(self, recipe: str) -> list[dict[str, Any]]:
        self._known(recipe)
        return list(self.store.versions(recipe))

    def rollback_recipe(self, recipe: str, version: int | None, by: str) -> dict[str, Any]:
        """Make a kept version live (the one the live version replaced when ``version`` is None)."""
        self._known(recipe)
        with self._learn_lock:
            try:
                change = self.daemon.slots.rollback(recipe, version, by)
            except RecipeError as exc:
                raise StationError(str(exc)) from None
        return {**change, "bank_version": change.get("to")}
