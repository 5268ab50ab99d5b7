"""``anomalygpt-edge web`` (the technician station) and ``anomalygpt-edge web-user`` (its users).

Parsers only at import time (no heavy imports); the handlers below import what they need.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.web.auth import ROLES  # standard library only: light enough for the parser

log = logging.getLogger(__name__)

DEFAULT_USERS = Path("data/web/users.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``web`` and ``web-user``."""
    w = sub.add_parser(
        "web",
        help="the technician station page with its daemon (alias: `run --config` with a station: section)",
        description="Runs the line daemon from its config (cameras, recipes, MQTT) and serves the station "
        "page for it, as `run --config` does for a config with a station: section (which this also reads: "
        "bind, port, tls, users). Binds to 127.0.0.1 unless --bind or station.bind names another address.",
    )
    w.add_argument("--config", type=Path, required=True, help="the daemon's YAML config (cameras, recipes, storage)")
    w.add_argument("--bind", help="address to listen on (default station.bind, else 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, help="default station.port, else 8080")
    w.add_argument("--users", type=Path, help="users file (default station.users, else <storage.data>/web/users.json)")
    w.add_argument("--audit", type=Path, help="audit log (default station.audit, else <storage.data>/web/audit.jsonl)")
    w.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="serve plain HTTP on an address other machines reach (isolated networks only; else give station.tls)",
    )
    w.add_argument(
        "--standalone",
        action="store_true",
        help="run the daemon without MQTT even if the config has an mqtt: section (a config without one "
        "always runs standalone)",
    )
    w.add_argument(
        "--llm", action="store_true", help="load the LLM (ask, NG explanations) even if the config's llm is off"
    )
    w.set_defaults(handler="anomalygpt_edge.runtime.cli.station:run_web")

    u = sub.add_parser("web-user", help="add, remove or list station users (password read from stdin)")
    acts = u.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("add", help="add a user or set its role and password; the password is read from stdin")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=ROLES, help="lowest first: " + " < ".join(ROLES))
    r = acts.add_parser("remove", help="remove a user")
    r.add_argument("name")
    acts.add_parser("list", help="list users and roles")
    for p in (a, r, acts.choices["list"]):
        p.add_argument("--users", type=Path, help=f"users file (default {DEFAULT_USERS}, or the --config one)")
        p.add_argument(
            "--config", type=Path, help="daemon config: its station.users, else <storage.data>/web/users.json"
        )
        p.set_defaults(handler="anomalygpt_edge.runtime.cli.station:run_web_user")


def _users_path(args: argparse.Namespace) -> Path:
    if args.users is not None:
        return args.users
    if getattr(args, "config", None) is not None:
        from anomalygpt_edge.runtime.line.config import load_config
        from anomalygpt_edge.runtime.line.station_config import StationConfig

        cfg = load_config(args.config)
        return (cfg.station or StationConfig()).users_file(cfg.storage.data)
    return DEFAULT_USERS


def read_password(stream=None) -> str:
    """The new password: from a terminal asked twice without echo, else the first line of stdin."""
    stream = stream or sys.stdin
    if stream.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the passwords differ")
        return first
    return stream.readline().rstrip("\r\n")


def run_web_user(args: argparse.Namespace) -> int:
    """Handler of ``web-user add|remove|list``."""
    from anomalygpt_edge.runtime.web.auth import AuthError, UserStore

    try:
        users = UserStore(_users_path(args))
        if args.action == "add":
            user = users.set(args.name, args.role, read_password())
            print(f"user {user.name}: role {user.role} ({users.path})")
        elif args.action == "remove":
            if not users.remove(args.name):
                print(f"error: no user '{args.name}' in {users.path}", file=sys.stderr)
                return 2
            print(f"user {args.name} removed")
        else:
            for u in users.users():
                print(f"{u.name}\t{u.role}")
    except (AuthError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def declares_mqtt(config_path: Path) -> bool:
    """Whether the config file has an ``mqtt:`` section (the parsed config fills in defaults)."""
    import yaml

    try:
        top = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError):
        return True  # load_config has read it already; when in doubt, keep the line's behaviour
    return isinstance(top, dict) and "mqtt" in top


def _with_llm(cfg: Any) -> Any:
    """``cfg`` with the LLM enabled (frozen dataclass or pydantic model)."""
    if hasattr(cfg.llm, "model_copy"):
        return cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"enabled": True})})
    from dataclasses import replace

    return replace(cfg, llm=replace(cfg.llm, enabled=True))


def build_station(config_path: Path, *, standalone: bool = False, llm: bool = False) -> tuple[Any, Any, Any]:
    """The line daemon for a config file, started, and the station over it: ``(config, daemon, station)``.

    With an ``mqtt:`` section (and not ``standalone``) the daemon talks to its broker as on the
    line; otherwise it runs with a :class:`NullLink`: the same cameras, inspection, verdict ids,
    archive and explanations, published nowhere.
    """
    from anomalygpt_edge.runtime.delivery.null_link import NullLink
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.web.daemon_station import DaemonStation

    cfg = load_config(config_path)
    if llm:
        cfg = _with_llm(cfg)
    on_line = not standalone and getattr(cfg, "mqtt", None) is not None and declares_mqtt(config_path)
    daemon = Daemon(cfg, link=None if on_line else NullLink(cfg.device_id))
    # The station listens before the daemon starts: its history holds the very first verdicts too.
    station = DaemonStation(daemon)
    try:
        daemon.start()
    except BaseException:
        station.stop()
        daemon.stop()
        raise
    return cfg, daemon, station


def web_config(cfg: Any, **cli: Any) -> Any:
    """The station server's settings: ``cli`` values that are given, else the config's ``station:``
    section, else the defaults (127.0.0.1:8080, users and audit log under ``<storage.data>/web``)."""
    from anomalygpt_edge.runtime.line.station_config import StationConfig
    from anomalygpt_edge.runtime.web.server import WebConfig

    section = getattr(cfg, "station", None) or StationConfig()
    data = cfg.storage.data
    tls = section.tls
    return WebConfig(
        users_file=cli.get("users") or section.users_file(data),
        audit_log=cli.get("audit") or section.audit_log(data),
        bind=cli.get("bind") or section.bind,
        port=cli["port"] if cli.get("port") is not None else section.port,
        session_idle_s=section.session_idle_s,
        tls_cert=tls.cert if tls is not None else None,
        tls_key=tls.key if tls is not None else None,
        allow_plain_http=bool(cli.get("allow_plain_http")) or section.allow_plain_http,
        live_max_fps=section.live_max_fps,
    )


def open_server(station: Any, config: Any) -> Any:
    """The station's server, bound (not yet serving), and the one line saying where it is."""
    from anomalygpt_edge.runtime.web.server import StationServer

    server = StationServer(station, config)
    if not config.users_file.exists():
        log.warning(
            "no users yet: add one with `anomalygpt-edge web-user add NAME --role admin --users %s`", config.users_file
        )
    print(f"station: {server.url}/", flush=True)
    return server


def run_web(args: argparse.Namespace) -> int:
    """Handler of ``anomalygpt-edge web``: the line daemon plus the station page, until SIGINT/SIGTERM.

    Without an ``mqtt:`` section in the config, or with ``--standalone``, the daemon runs with a
    null link (no broker), for a bench.
    """
    print("note: `anomalygpt-edge run --config` serves this page when the config has a station: section", flush=True)
    try:
        cfg, daemon, station = build_station(args.config, standalone=args.standalone, llm=args.llm)
    except Exception as exc:  # noqa: BLE001 - config/bundle errors end with a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        config = web_config(cfg, users=args.users, audit=args.audit, bind=args.bind, port=args.port,
                            allow_plain_http=args.allow_plain_http)  # fmt: skip
        server = open_server(station, config)
    except (OSError, ValueError) as exc:
        station.stop()
        daemon.stop()
        print(f"error: station: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    done.wait()
    server.stop()
    station.stop()
    daemon.stop()
    return 0
