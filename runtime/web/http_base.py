"""What every station route shares: the route record, the request context, error and answer types,
the bounded body reader and the JSON encoding that never sends NaN.

Handlers are plain (blocking) functions ``handler(ctx, *path_groups) -> Response``: the app runs
them on a worker thread, so a slow enrollment or a scrypt login never holds up the event loop.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from anomalygpt_edge.runtime.web.audit import AuditLog
from anomalygpt_edge.runtime.web.auth import Session, Sessions, UserStore
from anomalygpt_edge.runtime.web.live import LiveStreams

COOKIE = "agpt_session"
MAX_JSON_BODY = 256 * 1024
MAX_UPLOAD_BODY = 48 * 1024 * 1024  # base64 images: a few dozen camera frames per upload
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Only plain decimal digits: int() would accept "-1", "+5", "1_0" and spaces.
_LENGTH = re.compile(r"[0-9]{1,15}")


class HttpError(Exception):
    """An error answer: status code and a message for the page."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


Handler = Callable[..., Response]


@dataclass(frozen=True)
class Route:
    """One API route: method, path pattern (a regex), least role (None: public), handler, the audit
    action it writes, its body limit and body model.

    ``audit`` is the action written to the audit log, the only place the handler takes it from;
    ``{field}`` in it is filled from the validated body (``user.{action}``: ``user.set``).
    """

    method: str
    pattern: str
    role: str | None
    handler: Handler
    audit: str | None = None
    max_body: int = MAX_JSON_BODY
    body: type[BaseModel] | None = None

    @property
    def regex(self) -> re.Pattern[str]:
        return _compiled(self.pattern)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern not in _PATTERNS:
        _PATTERNS[pattern] = re.compile("^" + pattern + "$")
    return _PATTERNS[pattern]


@dataclass
class StationState:
    """What the routes reach: the station, users, sessions, audit log, static files, settings."""

    station: Any
    users: UserStore
    sessions: Sessions
    audit: AuditLog
    secure_cookie: bool = False
    static: dict[str, Path] = field(default_factory=dict)
    live: LiveStreams = field(default_factory=LiveStreams)  # the MJPEG live-view streams open now


@dataclass
class Context:
    """One request as a handler sees it: who asks (``session``), the validated ``body``, the query."""

    state: StationState
    route: Route
    request: Request
    session: Session | None = None
    body: Any = None
    body_read: bool = False

    @property
    def station(self) -> Any:
        return self.state.station

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, the last value of a repeated one."""
        return dict(self.request.query_params)

    @property
    def remote(self) -> str:
        client = self.request.client
        return client.host if client is not None else "-"

    def user(self) -> tuple[str, str]:
        """The logged-in user's name and role (routes with a role always have a session)."""
        assert self.session is not None
        return self.session.user, self.session.role

    def audit_action(self) -> str:
        """The route table's audit action, with ``{field}`` filled from the body."""
        action = self.route.audit
        if action is None:
            raise RuntimeError(f"route {self.route.pattern} has no audit action")
        fields = self.body.model_dump() if isinstance(self.body, BaseModel) else {}
        return action.format_map(fields) if "{" in action else action

    def audited(self, target: str | None, fn: Callable[[], Any], **details: Any) -> Any:
        """Run a change and record it (or its failure) in the audit log under the route's action."""
        user, role = self.user()
        action = self.audit_action()
        try:
            result = fn()
        except Exception as exc:
            self.state.audit.append(user, role, action, target, {"ok": False, "error": str(exc), **details})
            raise
        self.state.audit.append(user, role, action, target, {"ok": True, **details, **audit_summary(result)})
        return result


def audit_summary(result: Any) -> dict[str, Any]:
    """The few facts of an enrollment result worth keeping in the audit log."""
    if not isinstance(result, dict):
        return {}
    keys = ("live", "k", "defects", "bank_version", "added", "skipped")
    out = {k: result[k] for k in keys if k in result}
    if isinstance(result.get("head"), dict):
        out["head_mode"] = result["head"].get("mode")
    if isinstance(result.get("threshold"), dict):
        out["threshold"] = result["threshold"].get("value")
    if isinstance(result.get("quality"), dict):
        out["flagged"] = [f.get("name") for f in result["quality"].get("flagged", [])]
    return out


# --- answers --------------------------------------------------------------------------------------


def json_default(obj: Any) -> Any:
    """JSON for numpy values, sets, tuples and paths; anything else as text."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def json_bytes(data: Any) -> bytes:
    """``data`` as JSON; NaN/Infinity become null (a browser's JSON.parse refuses the whole answer)."""
    try:
        return json.dumps(data, default=json_default, allow_nan=False).encode()
    except ValueError:
        return json.dumps(finite(json.loads(json.dumps(data, default=json_default)))).encode()


def answer(status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> Response:
    """A complete answer with the station's security headers; never cached."""
    all_headers = {"Cache-Control": "no-store", **SECURITY_HEADERS, **(headers or {})}
    return Response(data, status_code=status, media_type=ctype, headers=all_headers)


def json_answer(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``data`` as a JSON answer."""
    return answer(status, json_bytes(data), "application/json", headers)


def error_answer(exc: HttpError, body_read: bool) -> Response:
    """The JSON error answer; says ``Connection: close`` while the request body is unread, since
    the rest of it would otherwise be taken for the next request."""
    headers = dict(exc.headers)
    if not body_read:
        headers["Connection"] = "close"
    return json_answer({"error": exc.message}, exc.status, headers)


# --- request bodies -------------------------------------------------------------------------------


def declared_length(request: Request, limit: int) -> int:
    """The body's declared length, refused before a byte of the body is read when it is missing
    or chunked (411), not plain decimal digits (400) or over ``limit`` (413)."""
    if request.headers.get("transfer-encoding"):
        raise HttpError(411, "send the body with a Content-Length (chunked request bodies are not accepted)")
    values = request.headers.getlist("content-length")
    if not values:
        raise HttpError(411, "Content-Length is required")
    if len(set(values)) != 1 or not _LENGTH.fullmatch(values[0]):
        raise HttpError(400, f"bad Content-Length {', '.join(values)[:40]!r}")
    length = int(values[0])
    if length > limit:
        raise HttpError(413, f"request body too large ({length} bytes, at most {limit})")
    return length


async def read_body(request: Request, limit: int) -> bytes:
    """The body, streamed and stopped at ``limit``; 400 when the peer stopped sending early."""
    length = declared_length(request, limit)
    chunks: list[bytes] = []
    got = 0
    try:
        async for chunk in request.stream():
            got += len(chunk)
            if got > length:  # more than declared: the framing cannot be trusted
                raise HttpError(400, f"request body longer than its Content-Length {length}")
            chunks.append(chunk)
    except ClientDisconnect:
        pass
    if got != length:
        raise HttpError(400, f"request body ended after {got} of {length} bytes")
    return b"".join(chunks)


def parse_json_object(raw: bytes, ctype: str) -> dict[str, Any]:
    """The JSON object a POST carries (415 for another content type: a cross-site form cannot send JSON)."""
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise HttpError(415, "send JSON (Content-Type: application/json)")
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HttpError(400, "malformed JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the JSON body must be an object")
    return data
