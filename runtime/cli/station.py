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

log = logging.getLogger(__name__)

DEFAULT_USERS = Path("data/web/users.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``web`` and ``web-user``."""
    w = sub.add_parser(
        "web",
        help="serve the technician station web page (live view, enrollment, history, ask, system)",
        description="Runs the line daemon from its config (cameras, recipes, MQTT) and serves the station "
        "page for it. Binds to 127.0.0.1 unless --bind names another address.",
    )
    w.add_argument("--config", type=Path, required=True, help="the daemon's YAML config (cameras, recipes, storage)")
    w.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8080)
    w.add_argument("--users", type=Path, help="users file (default <storage.data>/web/users.json)")
    w.add_argument("--audit", type=Path, help="audit log (default <storage.data>/web/audit.jsonl)")
    w.add_argument(
        "--standalone",
        action="store_true",
        help="run the station's own cameras and inspection instead of the line daemon (no MQTT)",
    )
    w.add_argument("--inspect-fps", type=float, default=5.0, help="--standalone: inspections/s per camera")
    w.add_argument("--llm", action="store_true", help="--standalone: load the LLM for ask and NG explanations")
    w.set_defaults(handler="anomalygpt_edge.runtime.cli.station:run_web")

    u = sub.add_parser("web-user", help="add, remove or list station users (password read from stdin)")
    acts = u.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("add", help="add a user or set its role and password; the password is read from stdin")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=("operator", "technician", "admin"))
    r = acts.add_parser("remove", help="remove a user")
    r.add_argument("name")
    acts.add_parser("list", help="list users and roles")
    for p in (a, r, acts.choices["list"]):
        p.add_argument("--users", type=Path, help=f"users file (default {DEFAULT_USERS}, or the --config one)")
        p.add_argument("--config", type=Path, help="daemon config: the users file is <storage.data>/web/users.json")
        p.set_defaults(handler="anomalygpt_edge.runtime.cli.station:run_web_user")


def _users_path(args: argparse.Namespace) -> Path:
    if args.users is not None:
        return args.users
    if getattr(args, "config", None) is not None:
        from anomalygpt_edge.runtime.line.config import load_config

        return load_config(args.config).storage.data / "web" / "users.json"
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


def build_station(config_path: Path, inspect_fps: float = 5.0, llm: bool = False):
    """A started :class:`LocalStation` for a daemon config file (cameras, recipe bindings, storage)."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.web.station import CameraSpec, LocalStation

    cfg = load_config(config_path)
    # Uploads and the station's folder cameras read images through preprocess: the config's limit.
    from anomalygpt_edge.engines.preprocess import set_max_image_pixels

    set_max_image_pixels(cfg.limits.max_image_pixels)
    cameras = [CameraSpec(c.name, c.type, c.source, c.fps or 10.0, c.loop) for c in cfg.cameras.values()]
    bindings = {b.camera: b.recipe for b in cfg.recipes}
    factory = None
    if llm or cfg.llm.enabled:
        from anomalygpt_edge.runtime.explain.explainer import Explainer

        def factory():  # loaded on first use: the page is usable before the model is
            if cfg.llm.model is not None:
                from anomalygpt_edge.engines.llm import create_llm

                return Explainer(create_llm(cfg.llm.model, n_ctx=2048, n_threads=cfg.llm.threads))
            return Explainer.default(n_threads=cfg.llm.threads)

    station = LocalStation(
        RecipeStore(cfg.storage.store),
        EngineBundle.open(cfg.engines.bundle, backend=cfg.engines.backend),
        cameras,
        bindings,
        inspect_fps=inspect_fps,
        explainer_factory=factory,
        explain_ng=factory is not None,
    )
    return cfg, station.start()


def run_web(args: argparse.Namespace) -> int:
    """Handler of ``anomalygpt-edge web``: the line daemon plus the station page, until SIGINT/SIGTERM.

    ``--standalone`` runs the station's own cameras and inspection instead (no MQTT), for a bench.
    """
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.web.server import StationServer, WebConfig

    daemon = None
    try:
        cfg = load_config(args.config)
        if args.standalone:
            cfg, station = build_station(args.config, args.inspect_fps, args.llm)
        else:
            from anomalygpt_edge.runtime.line.daemon import Daemon
            from anomalygpt_edge.runtime.web.daemon_station import DaemonStation

            daemon = Daemon(cfg).start()
            station = DaemonStation(daemon)
    except Exception as exc:  # noqa: BLE001 - config/bundle errors end with a message, not a traceback
        if daemon is not None:
            daemon.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    web_dir = cfg.storage.data / "web"
    config = WebConfig(
        users_file=args.users or web_dir / "users.json",
        audit_log=args.audit or web_dir / "audit.jsonl",
        bind=args.bind,
        port=args.port,
    )
    try:
        server = StationServer(station, config)
    except OSError as exc:
        station.stop()
        if daemon is not None:
            daemon.stop()
        print(f"error: cannot listen on {args.bind}:{args.port}: {exc}", file=sys.stderr)
        return 2
    if not config.users_file.exists():
        log.warning(
            "no users yet: add one with `anomalygpt-edge web-user add NAME --role admin --users %s`", config.users_file
        )
    print(f"station: {server.url}/", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    done.wait()
    server.stop()
    station.stop()
    if daemon is not None:
        daemon.stop()
    return 0
