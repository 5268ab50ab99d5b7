"""``anomalygpt-edge recipe versions`` and ``recipe rollback``: a recipe's kept versions, and making one live again.

One line of output each; an error (no such recipe, no older version, a damaged kept version) is
one line on stderr naming what is wrong (``cli.main``). A running daemon picks a rollback up over
MQTT (``cmd/recipe`` ``rollback``), which reloads the cameras using the recipe; from this command
it takes effect at the daemon's next recipe load (a ``switch`` or a restart).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.defaults import DEFAULT_STORE


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``recipe versions`` and ``recipe rollback``."""
    r = sub.add_parser("recipe", help="a recipe's kept versions; roll back to one")
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
