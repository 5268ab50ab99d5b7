"""The ``anomalygpt-edge`` command line: one subcommand per job, dispatched lazily.

Each area of the product declares its subcommands in its own ``add_parser`` (no heavy imports);
a subcommand names its implementation as ``"module:function"`` in ``handler``, imported only when
that subcommand runs, so the runtime commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import anomalygpt_edge

#: Modules that contribute subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "anomalygpt_edge.export.cli",
    "anomalygpt_edge.runtime.cli",
    "anomalygpt_edge.runtime.llm_cli",
    "anomalygpt_edge.runtime.archive_cli",
    "anomalygpt_edge.runtime.daemon_cli",
    "anomalygpt_edge.runtime.web.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalygpt-edge",
        description="AnomalyGPT Edge: export engine bundles, enroll golden parts, inspect, run the line daemon.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {anomalygpt_edge.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module_name, func_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "onnx"):
            parser.exit(2, f"anomalygpt-edge {args.command}: needs {exc.name}; install the [export] extra\n")
        raise
    return int(handler(args) or 0)
