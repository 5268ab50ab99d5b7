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
    "anomalygpt_edge.runtime.cli.parts",
    "anomalygpt_edge.runtime.cli.recipe",
    "anomalygpt_edge.runtime.cli.explain",
    "anomalygpt_edge.runtime.cli.archive",
    "anomalygpt_edge.runtime.cli.label",
    "anomalygpt_edge.runtime.cli.line",
    "anomalygpt_edge.runtime.cli.station",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalygpt-edge",
        description="AnomalyGPT Edge: export engine bundles, enroll golden parts, inspect, run the line daemon.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {anomalygpt_edge.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def is_expected_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error the product raises on purpose, with a message that names the file
    and what is wrong (any exception class of this package: BundleError, EngineError, RecipeError,
    ImageError, ConfigError, ...), or an OS error (missing file, permissions, disk full). Anything
    else is a bug and keeps its traceback."""
    if isinstance(exc, OSError):
        return True
    root = __name__.split(".")[0]  # "anomalygpt_edge"
    return any(
        cls.__module__ == root or cls.__module__.startswith(root + ".")
        for cls in type(exc).__mro__
        if issubclass(cls, Exception)
    )


def error_line(exc: BaseException) -> str:
    """One line for an expected error: the message, with an OS error's file name in front."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # messages that wrap or carry a traceback's newlines stay on one line


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code.

    An expected error (:func:`is_expected_error`) ends the command with one line on stderr and
    exit code 2; ``--debug`` shows its traceback instead. This is the one place that does it, so
    every subcommand gets the same treatment.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose or args.debug else logging.INFO,
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
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"anomalygpt-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_expected_error(exc):
            raise
        print(
            f"anomalygpt-edge {args.command}: error: {error_line(exc)} (--debug shows the traceback)", file=sys.stderr
        )
        return 2
