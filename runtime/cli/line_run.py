"""``anomalygpt-edge run --config FILE``: validate the config, then run the daemon until SIGTERM/SIGINT,
serving the technician station beside it when the config has a ``station:`` section (one service).

A start-up failure is one line on stderr naming the config file and what is wrong (exit code 2);
``--debug`` adds the traceback. Damaged spool or archive files do not get here: they are moved
aside and reported by the daemon itself (runtime/delivery/spool.py, runtime/delivery/archive.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from typing import Any

from anomalygpt_edge.runtime.line.config import ConfigError, DaemonConfig, load_config


def _fail(args: argparse.Namespace, exc: BaseException, what: str = "") -> int:
    """One clear line (the traceback too with ``--debug``); exit code 2."""
    if getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc) or type(exc).__name__
    prefix = f"{args.config}: " if str(args.config) not in text else ""
    print(f"error: {prefix}{what}{text}".replace("\n", " "), file=sys.stderr)
    return 2


def _first_run(args: argparse.Namespace, config: DaemonConfig) -> int:
    """Export the default bundle before the daemon starts if a recipe binding uses its empty location; 0 if done."""
    from anomalygpt_edge.export.first_run import DefaultBundleError
    from anomalygpt_edge.runtime.cli import first_run

    try:
        for path in sorted({str(config.bundle_for(binding)) for binding in config.recipes}):
            first_run.ready(path)
    except DefaultBundleError as exc:  # a runtime-only device: the line names the export command
        return _fail(args, exc)
    return 0


def run_with_station(daemon: Any) -> None:
    """The daemon and its technician station in one service (the config's ``station:`` section),
    until SIGTERM/SIGINT. ``OSError`` (and ``ssl.SSLError``) when the page cannot listen."""
    from anomalygpt_edge.runtime.cli.station import open_server, web_config
    from anomalygpt_edge.runtime.web.daemon_station import DaemonStation

    stopping = daemon.supervisor.stopping
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    # The station listens to the daemon before it starts: its history holds the very first verdicts.
    station = DaemonStation(daemon)
    server = None
    try:
        daemon.start()
        server = open_server(station, web_config(daemon.config)).start()
        # A station thread that dies must show in the status, not leave the page silently gone.
        daemon.health.watch_thread("station-http", lambda: server.thread if server is not None else None)
        while not stopping.wait(1.0):
            pass
    finally:
        if server is not None:
            server.stop()
        station.stop()
        daemon.stop()


def run(args: argparse.Namespace) -> int:
    """Validate ``--config``, then run the daemon; 0 on a clean stop, 2 when it cannot start."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(args, exc)
    if args.check:
        print(f"{args.config}: OK ({len(config.cameras)} cameras, {len(config.recipes)} recipes)")
        return 0
    from anomalygpt_edge.engines.base import EngineError
    from anomalygpt_edge.runtime.delivery.archive import ArchiveError
    from anomalygpt_edge.runtime.delivery.spool import SpoolError
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.recipes.store import RecipeError

    failed = _first_run(args, config)
    if failed:
        return failed
    try:
        if config.station is None:
            Daemon(config).run_forever()
        else:
            run_with_station(Daemon(config))
    except (EngineError, SpoolError, ArchiveError, RecipeError) as exc:
        # A bundle missing or damaged, storage.data on a read-only or missing mount, a spool
        # locked by another daemon …: each message names its file; no traceback without --debug.
        return _fail(args, exc)
    except OSError as exc:  # a folder that cannot be created, a port that cannot be bound …
        return _fail(args, exc, f"{exc.filename}: " if exc.filename and str(exc.filename) not in str(exc) else "")
    return 0
