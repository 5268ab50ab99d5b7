"""The technician station's settings (the config's ``station:`` section): where the page listens,
its TLS certificate, its users file, and whether plain HTTP may leave this machine.

Declared in the line's room, not the web's: the line's config joins it in
(``runtime/line/config.py``) and the line may not import the web room; ``run --config`` (the CLI
room) hands it to the station server.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, model_validator

from anomalygpt_edge.runtime.values import Between, ConfigPath, ExistingPath, FieldError, Flag, Text

__all__ = ["StationConfig", "StationTlsConfig", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to the line network
        return False


class StationTlsConfig(BaseModel):
    """The station's HTTPS certificate (chain, PEM) and its private key, as files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: ExistingPath
    key: ExistingPath


class StationConfig(BaseModel):
    """``station:``: serve the technician page beside the daemon (``run --config``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bind: Text = "127.0.0.1"  # this machine only; the line network needs tls (or allow_plain_http)
    port: Annotated[int, Between(0, 65535)] = 8080  # 0 picks a free port (tests)
    tls: StationTlsConfig | None = None
    users: ConfigPath | None = None  # default <storage.data>/web/users.json
    audit: ConfigPath | None = None  # default <storage.data>/web/audit.jsonl
    # Passwords and session cookies in clear text on the line network: only on an isolated one.
    allow_plain_http: Flag = False
    session_idle_s: Annotated[float, Between(60, 7 * 86400)] = 8 * 3600.0
    # the MJPEG live view sends at most this many frames per second
    live_max_fps: Annotated[float, Between(0.5, 60)] = 8.0

    @model_validator(mode="after")
    def plain_http_stays_on_this_machine(self) -> StationConfig:
        """Refuse plain HTTP on an address other machines reach, unless the config opts in."""
        if self.tls is None and not self.allow_plain_http and not is_loopback(self.bind):
            raise FieldError(
                ("bind",),
                f"{self.bind} is reachable from other machines: give station.tls (cert and key) "
                "or set station.allow_plain_http: true on an isolated network",
            )
        return self

    def users_file(self, data: Path) -> Path:
        """The users file: the configured one, else ``<data>/web/users.json``."""
        return self.users or data / "web" / "users.json"

    def audit_log(self, data: Path) -> Path:
        """The audit log: the configured one, else ``<data>/web/audit.jsonl``."""
        return self.audit or data / "web" / "audit.jsonl"
