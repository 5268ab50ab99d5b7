""" "The line learns" routes (issue 14): proposals from labelled verdicts, recipe versions, rollback.

* ``POST /api/recipes/<name>/proposal`` computes a proposal from the recipe's labelled verdicts
  (seconds: like every handler it runs on a worker thread, not the event loop; the page says
  "computing…"), audited ``recipe.propose``;
* ``GET /api/recipes/<name>/proposal``: the pending one (404 with the reason when there is none),
  with ``stale`` when the recipe changed since it was computed;
* ``POST /api/recipes/<name>/proposal/apply``: one crash-safe recipe commit with a new bank version,
  audited ``recipe.apply``; a stale proposal is refused with 409 and nothing changes;
* ``POST /api/recipes/<name>/proposal/discard``, audited ``recipe.discard``;
* ``GET /api/recipes/<name>/versions``, ``GET /api/recipes/<name>/labelled`` (counts for the page);
* ``POST /api/recipes/<name>/rollback`` ``{version?}``, audited ``recipe.rollback``.

Every change needs the technician role (the route table says so) and is audited, failures too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from anomalygpt_edge.runtime.web.http_base import Context, HttpError, json_answer
from anomalygpt_edge.runtime.web.http_bodies import ApplyProposalBody, RollbackBody
from anomalygpt_edge.runtime.web.station_protocol import StaleProposalError


def _audited(
    ctx: Context,
    recipe: str,
    run: Callable[[], Any],
    summary: Callable[[Any], dict[str, Any]] | None = None,
    **details: Any,
) -> Response:
    """Run one change on ``recipe`` and write it (or its failure) to the audit log under the route's
    action, with ``summary(result)`` added (what was proposed, which version went live); a stale
    proposal is answered 409, after the audit recorded it."""
    user, role = ctx.user()
    action = ctx.audit_action()
    try:
        result = run()
    except Exception as exc:
        ctx.state.audit.append(user, role, action, recipe, {"ok": False, "error": str(exc), **details})
        if isinstance(exc, StaleProposalError):
            raise HttpError(409, str(exc)) from None
        raise
    extra = summary(result) if summary is not None else _versions(result)
    ctx.state.audit.append(user, role, action, recipe, {"ok": True, **details, **extra})
    return json_answer(result)


def _versions(result: Any) -> dict[str, Any]:
    """The bank versions an apply or rollback moved between."""
    if not isinstance(result, dict):
        return {}
    keys = ("from", "to", "bank_version", "base_bank_version", "threshold")
    return {k: result[k] for k in keys if k in result and not isinstance(result[k], (dict, list))}


def _proposed(proposal: Any) -> dict[str, Any]:
    """What the audit log keeps of a proposal: its base, sizes and thresholds."""
    if not isinstance(proposal, dict):
        return {}
    keys = ("base_bank_version", "threshold_before", "threshold_after", "retrain_head")
    out = {k: proposal[k] for k in keys if k in proposal}
    for key in ("add_goldens", "add_defects", "refused_goldens"):
        if isinstance(proposal.get(key), (list, dict)):
            out[key] = len(proposal[key])
    return out


def post_proposal(ctx: Context, name: str) -> Response:
    """Compute (and keep pending) a proposal from the recipe's labelled verdicts."""
    user, _role = ctx.user()
    return _audited(ctx, name, lambda: ctx.station.propose(name, user), _proposed)


def get_proposal(ctx: Context, name: str) -> Response:
    return json_answer(ctx.station.proposal(name))


def post_apply(ctx: Context, name: str) -> Response:
    """Apply the pending proposal: one recipe commit, a new bank version, the old one kept."""
    body: ApplyProposalBody = ctx.body
    user, _role = ctx.user()
    run = lambda: ctx.station.apply_proposal(name, user, body.reason, body.base_bank_version)  # noqa: E731
    return _audited(ctx, name, run, reason=body.reason, base_bank_version=body.base_bank_version)


def post_discard(ctx: Context, name: str) -> Response:
    user, _role = ctx.user()
    return _audited(ctx, name, lambda: ctx.station.discard_proposal(name, user))


def get_versions(ctx: Context, name: str) -> Response:
    return json_answer(ctx.station.recipe_versions(name))


def get_labelled(ctx: Context, name: str) -> Response:
    return json_answer(ctx.station.labelled_counts(name))


def post_rollback(ctx: Context, name: str) -> Response:
    """Make a kept version live again (the previous one unless ``version`` names another)."""
    body: RollbackBody = ctx.body
    user, _role = ctx.user()
    return _audited(ctx, name, lambda: ctx.station.rollback_recipe(name, body.version, user), version=body.version)
