"""``anomalygpt-edge run --config FILE``: validate the config, then run the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import sys

from anomalygpt_edge.runtime.config import ConfigError, load_config


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK ({len(config.cameras)} cameras, {len(config.recipes)} recipes)")
        return 0
    from anomalygpt_edge.engines.base import EngineError
    from anomalygpt_edge.runtime.daemon import Daemon

    try:
        Daemon(config).run_forever()
    except EngineError as exc:  # bundle missing or damaged: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
