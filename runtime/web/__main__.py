"""``python -m anomalygpt_edge.runtime.web web|web-user ...``: the station's commands on their own.

The same parsers and handlers as ``anomalygpt-edge web`` / ``anomalygpt-edge web-user`` once the
main command line lists ``anomalygpt_edge.runtime.web.cli`` among its command modules.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from anomalygpt_edge.runtime.web.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen station command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m anomalygpt_edge.runtime.web")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module, func = args.handler.split(":")
    return int(getattr(importlib.import_module(module), func)(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
