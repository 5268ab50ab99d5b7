"""The technician station's HTTP server: Starlette served by uvicorn on a background thread.

:class:`StationServer` is what the CLI and the tests start and stop in-process; the application
(route table, guard, error answers) is in :mod:`~anomalygpt_edge.runtime.web.app`, the routes in
``routes_*.py``, the request bodies in :mod:`~anomalygpt_edge.runtime.web.http_bodies`.

Binds to 127.0.0.1 unless the configuration names another address (the line network).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalygpt_edge.runtime.line.station_config import is_loopback
from anomalygpt_edge.runtime.web.app import ROUTES, STATIC_DIR, build_app, static_files
from anomalygpt_edge.runtime.web.audit import AuditLog
from anomalygpt_edge.runtime.web.auth import Sessions, UserStore
from anomalygpt_edge.runtime.web.http_base import (
    COOKIE,
    MAX_JSON_BODY,
    MAX_UPLOAD_BODY,
    SECURITY_HEADERS,
    HttpError,
    Route,
    StationState,
)
from anomalygpt_edge.runtime.web.http_uvicorn import ServerThread
from anomalygpt_edge.runtime.web.live import LiveStreams

__all__ = [
    "COOKIE",
    "MAX_JSON_BODY",
    "MAX_UPLOAD_BODY",
    "ROUTES",
    "SECURITY_HEADERS",
    "STATIC_DIR",
    "HttpError",
    "Route",
    "StationServer",
    "WebConfig",
]


@dataclass(frozen=True)
class WebConfig:
    """Where the station listens and keeps its users and audit log."""

    users_file: Path
    audit_log: Path
    bind: str = "127.0.0.1"
    port: int = 8080
    session_idle_s: float = 8 * 3600
    secure_cookie: bool = False  # set when a TLS-terminating proxy sits in front (implied by tls_cert)
    tls_cert: Path | None = None  # HTTPS: certificate chain (PEM) ...
    tls_key: Path | None = None  # ... and its private key
    allow_plain_http: bool = False  # plain HTTP on an address other machines reach (isolated networks only)
    live_max_fps: float = 8.0  # the MJPEG live view's frame-rate cap per stream

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("station TLS needs both the certificate and its key")
        if self.tls_cert is None and not self.allow_plain_http and not is_loopback(self.bind):
            raise ValueError(
                f"the station would serve plain HTTP on {self.bind}, reachable from other machines: "
                "give it a TLS certificate and key, or allow plain HTTP explicitly (isolated networks only)"
            )

    @property
    def tls(self) -> tuple[Path, Path] | None:
        """(certificate, key) when the station speaks HTTPS."""
        return (self.tls_cert, self.tls_key) if self.tls_cert is not None and self.tls_key is not None else None


class StationServer:
    """The HTTP server holding the station, users, sessions and audit log.

    The socket is bound here (``OSError`` when the address is taken; ``port=0`` picks a free
    one); :meth:`start` serves on thread ``station-http``; :meth:`stop` ends it cleanly.
    """

    def __init__(self, station: Any, config: WebConfig):
        self.station = station
        self.config = config
        self.state = StationState(
            station=station,
            users=UserStore(config.users_file),
            sessions=Sessions(idle_timeout_s=config.session_idle_s),
            audit=AuditLog(config.audit_log),
            secure_cookie=config.secure_cookie or config.tls is not None,
            static=static_files(),
            live=LiveStreams(max_fps=config.live_max_fps),
        )
        self._server = ServerThread(build_app(self.state), config.bind, config.port, config.tls)

    @property
    def users(self) -> UserStore:
        return self.state.users

    @property
    def sessions(self) -> Sessions:
        return self.state.sessions

    @property
    def audit(self) -> AuditLog:
        return self.state.audit

    @property
    def server_address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        return self._server.address

    @property
    def url(self) -> str:
        host, port = self.server_address
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.config.tls else 'http'}://{host}:{port}"

    @property
    def thread(self) -> threading.Thread | None:
        """The serving thread ``station-http`` (for liveness checks); None before :meth:`start`."""
        return self._server.thread

    def start(self) -> StationServer:
        """Serve on a background thread (returns once connections are accepted)."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving: live streams end, running requests get a few seconds to finish, then the socket closes."""
        self.state.live.close()
        self._server.stop()
