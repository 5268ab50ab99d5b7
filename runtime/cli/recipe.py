"""``anomalygpt-edge recipe versions`` / ``rollback`` (a recipe's kept versions, making one live again) and
``recipe propose`` / ``apply`` (a proposal from the archive's labels, offline).

One line of output each; an error (no such recipe, no older version, a damaged kept version) is
one line on stderr naming what is wrong (``cli.main``). A daemon running on the same store picks
a rollback from this command up by itself: its recipe watch (``runtime/line/recipe_watch.py``)
sees the new ``recipe.json`` within ``storage.recipe_watch_s`` (2 s by default, plus half a second
to settle), reloads the cameras using the recipe and lists the reload in its status's
``recipe_changes`` (``by: store (another process)``), as a rollback over MQTT (``cmd/recipe``
``rollback``) does at once. With ``recipe_watch_s: 0`` it takes effect at the daemon's next recipe
load (a ``switch`` or a restart).

``propose`` reads the labelled verdicts of a stopped daemon's archive (``<data>/archive``), prints
the before/after figures and keeps the proposal as ``<store>/<recipe>/proposal.json`` (where the
daemon finds it too); ``apply`` makes that pending proposal live in one crash-safe commit. The
store's writer lock keeps a commit beside a running daemon safe, and the daemon's recipe watch
reloads its cameras on the applied version the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.cli.archive import DEFAULT_ARCHIVE
from anomalygpt_edge.runtime.defaults import DEFAULT_STORE


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``recipe versions`` and ``recipe rollback``."""
    r = sub.add_parser("recipe", help="a recipe's kept versions and rollback; proposals from labelled verdicts")
    actions = r.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    v = actions.add_parser("versions", help="the live version and the kept ones, in one line")
    b = actions.add_parser("rollback", help="make the previous (or --to N) kept version live, crash-safely")
    for p in (v, b):
        p.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"recipe store (default {DEFAULT_STORE})")
        p.add_argument("--recipe", required=True, help="recipe name")
    b.add_argument("--to", type=int, default=None, metavar="N", help="bank version to make live (default: previous)")
    b.add_argument("--by", default=None, help="who rolls back (logged)")
    v.set_defaults(handler="anomalygpt_edge.runtime.cli.recipe:versions")
    b.set_defaults(handler="anomalygpt_edge.runtime.cli.recipe:rollback")
    offline = "reads the archive of a stopped daemon; a running one on the store reloads what is applied"
    pr = actions.add_parser("propose", help=f"a proposal from the archive's labels, before/after figures ({offline})")
    ap = actions.add_parser("apply", help=f"make the pending proposal live in one crash-safe commit ({offline})")
    for p in (pr, ap):
        p.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"recipe store (default {DEFAULT_STORE})")
        p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help=f"archive (default {DEFAULT_ARCHIVE})")
        p.add_argument("--recipe", required=True, help="recipe name")
        p.add_argument("--bundle", type=Path, default=None, help="engine bundle (default: the recipe's own)")
    pr.add_argument("--json", type=Path, default=None, metavar="F", help="also write the proposal as JSON to F")
    pr.add_argument("--by", default="cli", help="who proposes (kept with the proposal)")
    ap.add_argument("--by", required=True, help="who applies (recorded in the recipe's change record)")
    ap.add_argument("--reason", default=None, help="why (recorded; default: the proposal's summary)")
    pr.set_defaults(handler="anomalygpt_edge.runtime.cli.recipe:propose")
    ap.set_defaults(handler="anomalygpt_edge.runtime.cli.recipe:apply")


def _version(v: dict[str, Any]) -> str:
    if "error" in v:
        return f"v{v['bank_version']} (damaged: {v['error']})"
    threshold = f"threshold {v['threshold']:.4g}" if v["threshold"] is not None else "no threshold"
    who = f", by {v['by']}" if v.get("by") else ""
    why = f": {v['reason']}" if v.get("reason") else ""
    return f"v{v['bank_version']} (k {v['k']}, {v['defects']} defects, {threshold}, {v['updated_at']}{who}{why})"


def versions(args: argparse.Namespace) -> int:
    """Run ``recipe versions``."""
    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    listed = RecipeStore(args.store).versions(args.recipe)
    live = next(v for v in listed if v["live"])
    kept = [_version(v) for v in listed if not v["live"]]
    print(f"recipe {args.recipe}: live {_version(live)}; kept: {', '.join(kept) or 'none'}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    """Run ``recipe rollback``."""
    import logging

    from anomalygpt_edge.runtime.recipes.store import RecipeStore

    store = RecipeStore(args.store)
    was = store.load(args.recipe).bank_version
    live = store.rollback(args.recipe, args.to)
    logging.getLogger(__name__).info(
        "recipe %s rolled back v%d -> v%d by %s", args.recipe, was, live.bank_version, args.by
    )
    threshold = f"threshold {live.threshold.value:.4g}" if live.threshold else "no threshold: not live"
    print(f"recipe {args.recipe}: v{live.bank_version} live again (k {len(live.samples)}, {threshold}); was v{was}")
    return 0


def _learning(args: argparse.Namespace) -> tuple[Any, Any]:
    """(enroller, open archive) for ``propose`` / ``apply``."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.cli.archive import _open
    from anomalygpt_edge.runtime.recipes.enrollment import Enroller
    from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore

    store = RecipeStore(args.store)
    if not store.exists(args.recipe):
        raise RecipeError(f"unknown recipe '{args.recipe}'; recipes: {', '.join(store.names()) or 'none'}")
    bundle = args.bundle or Path(store.load(args.recipe).bundle_path)
    return Enroller(store, EngineBundle.open(bundle)), _open(args.archive)


def _rate(fig: dict[str, Any], kind: str) -> str:
    n = fig["n_good" if kind == "false_reject" else "n_defect"]
    if not n:
        return "-"
    count = fig["false_rejects" if kind == "false_reject" else "escapes"]
    return f"{count}/{n} (95% upper {100 * fig[f'{kind}_upper_95']:.0f}%)"


def proposal_table(p: Any) -> str:
    """The proposal's before/after figures and lists, as the CLI prints them."""
    rows = [
        ("", "before", "after"),
        ("threshold", f"{p.threshold_before:.4g}", f"{p.threshold_after:.4g}"),
        ("false rejects", _rate(p.before, "false_reject"), _rate(p.after, "false_reject")),
        ("escapes", _rate(p.before, "escape"), _rate(p.after, "escape")),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"recipe {p.recipe}: proposal on bank version {p.base_bank_version}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    lines.append(f"  goldens to add: {len(p.add_goldens)}; defects to add: {len(p.add_defects)}")
    lines += [f"  refused {name}: {why}" for name, why in p.refused_goldens.items()]
    lines += [f"  - {note}" for note in p.notes]
    return "\n".join(lines)


def propose(args: argparse.Namespace) -> int:
    """Run ``recipe propose``."""
    import json

    from anomalygpt_edge.runtime.line import proposals as desk
    from anomalygpt_edge.runtime.recipes.proposal import propose as compute
    from anomalygpt_edge.runtime.recipes.store import RecipeError, now_iso

    enroller, archive = _learning(args)
    try:
        gathered = desk.gather(archive, args.recipe)
    finally:
        archive.close()
    if not gathered.parts:
        raise RecipeError(f"recipe {args.recipe}: no labelled verdict with a kept image ({gathered.total} labelled)")
    proposal = compute(enroller, args.recipe, gathered.parts)
    proposal.notes += gathered.notes()
    desk.save_pending(enroller.store, desk.Pending(proposal, gathered.labels, args.by, now_iso()))
    if args.json is not None:
        args.json.write_text(json.dumps(proposal.to_json(), indent=1))
    print(proposal_table(proposal))
    return 0


def apply(args: argparse.Namespace) -> int:
    """Run ``recipe apply``."""
    from anomalygpt_edge.runtime.line import proposals as desk
    from anomalygpt_edge.runtime.recipes.store import RecipeError

    enroller, archive = _learning(args)
    try:
        pending = desk.load_pending(enroller.store, args.recipe)
        if pending is None:
            raise RecipeError(f"recipe {args.recipe}: no pending proposal; run 'recipe propose' first")
        gathered = desk.gather(archive, args.recipe)
    finally:
        archive.close()
    p = pending.proposal
    reason = args.reason or f"proposal from {len(pending.labels)} labels ({len(p.add_goldens)} goldens added)"
    committed = desk.apply_pending(enroller, pending, gathered, args.by, reason)
    desk.drop_pending(enroller.store, args.recipe)
    threshold = committed.threshold.value if committed.threshold else float("nan")
    print(
        f"recipe {args.recipe}: v{committed.bank_version} live (was v{p.base_bank_version}; "
        f"{len(p.add_goldens)} goldens, {len(p.add_defects)} defects added; threshold {threshold:.4g})"
    )
    return 0
