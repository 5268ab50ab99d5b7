"""Runtime subcommands (no torch): enroll, inspect, evaluate, bench, run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the runtime subcommands."""
