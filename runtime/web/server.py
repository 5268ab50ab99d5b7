"""The technician station's HTTP server: standard library only, JSON API plus static pages.

Security model, in one place:

* Binds to 127.0.0.1 unless the configuration names another address (the line network).
* Every ``/api`` route except login needs a session cookie (``HttpOnly; SameSite=Strict``) that
  maps to a server-side session; no session → 401.
* Every POST (all state changes are POSTs) also needs the session's CSRF token in the
  ``X-CSRF-Token`` header and, when the browser sends one, an ``Origin`` equal to this server;
  otherwise 403. Login itself needs a JSON body, which a cross-site form cannot send.
* Each route names the least role allowed (operator < technician < admin); a lower role → 403.
* Enrollment, recipe and user changes are written to the audit log, failures included.

:data:`ROUTES` is the single route table; the tests walk it to prove every mutating route is
guarded.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import math
import mimetypes
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from anomalygpt_edge.engines.preprocess import ImageError
from anomalygpt_edge.runtime.delivery.archive import csv_cell
from anomalygpt_edge.runtime.recipes.store import RecipeError
from anomalygpt_edge.runtime.web.audit import AuditLog
from anomalygpt_edge.runtime.web.auth import (
    MAX_PASSWORD,
    AuthError,
    Session,
    Sessions,
    UserStore,
    csrf_ok,
    role_allows,
)
from anomalygpt_edge.runtime.web.station import DefectUpload, HistoryQuery, NotFoundError, Station, StationError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
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


@dataclass(frozen=True)
class WebConfig:
    """Where the station listens and keeps its users and audit log."""

    users_file: Path
    audit_log: Path
    bind: str = "127.0.0.1"
    port: int = 8080
    session_idle_s: float = 8 * 3600
    secure_cookie: bool = False  # set when a TLS-terminating proxy sits in front


class HttpError(Exception):
    """An error answer: status code and a message for the page."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Route:
    """One API route: method, path pattern, least role (None: public), handler method name, audit action."""

    method: str
    pattern: str
    role: str | None
    handler: str
    audit: str | None = None
    max_body: int = MAX_JSON_BODY

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + self.pattern + "$")


_SEG = r"([A-Za-z0-9][A-Za-z0-9_.@-]{0,63})"
ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/session", None, "get_session"),
    Route("POST", "/api/login", None, "post_login"),
    Route("POST", "/api/logout", "operator", "post_logout"),
    Route("GET", "/api/cameras", "operator", "get_cameras"),
    Route("GET", f"/api/cameras/{_SEG}/frame.jpg", "operator", "get_frame"),
    Route("GET", f"/api/cameras/{_SEG}/overlay.jpg", "operator", "get_overlay"),
    Route("GET", f"/api/cameras/{_SEG}/verdict", "operator", "get_last_verdict"),
    Route("GET", "/api/recipes", "operator", "get_recipes"),
    Route("GET", f"/api/recipes/{_SEG}", "operator", "get_recipe"),
    Route("GET", f"/api/recipes/{_SEG}/samples/([0-9a-f]{{64}}).png", "operator", "get_sample"),
    Route("GET", f"/api/recipes/{_SEG}/defects/([0-9a-f]{{64}}).png", "operator", "get_defect"),
    Route("GET", f"/api/recipes/{_SEG}/defects/([0-9a-f]{{64}})/mask.png", "operator", "get_defect_mask"),
    Route("POST", "/api/enroll/start", "technician", "post_enroll_start", "enroll.start"),
    Route("POST", "/api/enroll/capture", "technician", "post_enroll_capture", "enroll.capture"),
    Route("POST", "/api/enroll/upload", "technician", "post_enroll_upload", "enroll.upload", MAX_UPLOAD_BODY),
    Route("POST", "/api/enroll/remove", "technician", "post_enroll_remove", "enroll.remove"),
    Route("POST", "/api/enroll/finish", "technician", "post_enroll_finish", "enroll.finish"),
    # Labelled defective parts: uploads and painted masks travel as base64, like golden uploads.
    Route(
        "POST", "/api/enroll/defect/upload", "technician", "post_defect_upload", "enroll.defect.add", MAX_UPLOAD_BODY
    ),
    Route("POST", "/api/enroll/defect/capture", "technician", "post_defect_capture", "enroll.defect.add"),
    Route("POST", "/api/enroll/defect/mark", "technician", "post_defect_mark", "enroll.defect.add", MAX_UPLOAD_BODY),
    Route("POST", "/api/enroll/defect/remove", "technician", "post_defect_remove", "enroll.defect.remove"),
    Route("POST", "/api/recipes/assign", "technician", "post_assign", "recipe.assign"),
    Route("POST", "/api/recipes/delete", "admin", "post_delete_recipe", "recipe.delete"),
    Route("GET", "/api/history", "operator", "get_history"),
    Route("GET", "/api/history.csv", "operator", "get_history_csv"),
    Route("GET", "/api/history/([0-9a-f-]{8,64})", "operator", "get_history_item"),
    Route("GET", "/api/history/([0-9a-f-]{8,64})/(image|heatmap).jpg", "operator", "get_history_image"),
    Route("POST", "/api/ask", "operator", "post_ask"),
    Route("GET", "/api/system", "operator", "get_system"),
    Route("GET", "/api/audit", "admin", "get_audit"),
    Route("GET", "/api/users", "admin", "get_users"),
    Route("POST", "/api/users", "admin", "post_users", "user.change"),
)


class StationServer(ThreadingHTTPServer):
    """The HTTP server holding the station, users, sessions and audit log."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, station: Station, config: WebConfig):
        self.station = station
        self.config = config
        self.users = UserStore(config.users_file)
        self.sessions = Sessions(idle_timeout_s=config.session_idle_s)
        self.audit = AuditLog(config.audit_log)
        self.static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}
        self._thread: threading.Thread | None = None
        super().__init__((config.bind, config.port), StationHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StationServer:
        """Serve on a background thread (returns at once)."""
        self._thread = threading.Thread(target=self.serve_forever, name="station-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class StationHandler(BaseHTTPRequestHandler):
    """One request. HTTP/1.1 keep-alive; idle connections close after ``timeout`` seconds."""

    protocol_version = "HTTP/1.1"
    server_version = "AnomalyGPT-Edge-Station"
    sys_version = ""
    timeout = 30
    server: StationServer

    # -- plumbing ------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._send_json(405, {"error": "method not allowed"})

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.session: Session | None = None
        self._body_read = method != "POST"
        try:
            if not path.startswith("/api/"):
                if method != "GET":
                    raise HttpError(405, "method not allowed")
                self._static(path)
                return
            route, groups = self._route(method, path)
            self._guard(route)
            body = self._body(route) if method == "POST" else {}
            getattr(self, route.handler)(*groups, body=body) if method == "POST" else getattr(self, route.handler)(
                *groups
            )
        except HttpError as exc:
            headers = dict(exc.headers)
            if not self._body_read:  # an unread body would be taken for the next request: say we close
                headers["Connection"] = "close"
                self.close_connection = True
            self._send_json(exc.status, {"error": exc.message}, headers)
        except NotFoundError as exc:
            self._send_json(404, {"error": str(exc)})
        except (StationError, RecipeError, ImageError, AuthError) as exc:
            self._send_json(400, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one bad request must never take the station down
            log.exception("station request %s %s failed", method, path)
            self._send_json(500, {"error": f"internal error: {type(exc).__name__}"})

    def _route(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        allowed = False
        for route in ROUTES:
            m = route.regex.match(path)
            if m:
                if route.method == method:
                    return route, m.groups()
                allowed = True
        raise HttpError(405 if allowed else 404, "method not allowed" if allowed else f"no such endpoint {path}")

    def _cookie_token(self) -> str | None:
        raw = self.headers.get("Cookie")
        if not raw:
            return None
        try:
            jar = SimpleCookie(raw)
        except CookieError:
            return None
        morsel = jar.get(COOKIE)
        return morsel.value if morsel else None

    def _guard(self, route: Route) -> None:
        """401 without a session, 403 without the CSRF token / with a foreign Origin / below the role."""
        self.session = self.server.sessions.get(self._cookie_token())
        if route.role is None:
            if route.method == "POST":
                self._check_origin()
            return
        if self.session is None:
            raise HttpError(401, "log in first")
        if route.method == "POST":
            self._check_origin()
            if not csrf_ok(self.session, self.headers.get("X-CSRF-Token")):
                raise HttpError(403, "missing or wrong CSRF token; reload the page")
        if not role_allows(self.session.role, route.role):
            raise HttpError(403, f"this needs the {route.role} role; you are {self.session.role}")

    def _check_origin(self) -> None:
        origin = self.headers.get("Origin")
        if origin is None:
            return  # non-browser clients; browsers always send Origin on POST
        host = self.headers.get("Host", "")
        if urlsplit(origin).netloc != host:
            raise HttpError(403, "cross-origin request refused")

    def _content_length(self, route: Route) -> int:
        """The body's declared length, refused before a byte of the body is read when it is missing
        (411), not a plain decimal number or given twice (400), or over the route's limit (413).

        ``rfile.read(-1)`` would read until the peer closes, and ``int()`` accepts ``-1``,
        ``+5``, ``1_0`` and spaces: only digits pass here.
        """
        values = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "send the body with a Content-Length (chunked request bodies are not accepted)")
        if not values:
            raise HttpError(411, "Content-Length is required")
        if len(set(values)) != 1 or not re.fullmatch(r"[0-9]{1,15}", values[0]):
            raise HttpError(400, f"bad Content-Length {', '.join(values)[:40]!r}")
        length = int(values[0])
        if length > route.max_body:
            raise HttpError(413, f"request body too large ({length} bytes, at most {route.max_body})")
        return length

    def _body(self, route: Route) -> dict[str, Any]:
        length = self._content_length(route)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:  # the peer closed early: nothing more will come on this connection
            self.close_connection = True
            raise HttpError(400, f"request body ended after {len(raw)} of {length} bytes")
        self._body_read = True
        if ctype != "application/json":
            raise HttpError(415, "send JSON (Content-Type: application/json)")
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HttpError(400, "malformed JSON") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the JSON body must be an object")
        return data

    def _headers(self, status: int, ctype: str, length: int | None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send_bytes(self, status: int, data: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self._headers(status, ctype, len(data), extra)
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        try:
            body = json.dumps(data, default=_json_default, allow_nan=False).encode()
        except ValueError:  # NaN/Infinity is not JSON: browsers refuse the whole answer; send null
            body = json.dumps(_finite(json.loads(json.dumps(data, default=_json_default)))).encode()
        try:
            self._send_bytes(status, body, "application/json", extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _static(self, path: str) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        file = self.server.static.get(name) if "/" not in name else None  # a fixed set: no path traversal
        if file is None:
            raise HttpError(404, f"no such page {path}")
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        self._send_bytes(200, file.read_bytes(), ctype)

    def _user(self) -> tuple[str, str]:
        assert self.session is not None
        return self.session.user, self.session.role

    def _audited(self, action: str, target: str | None, fn: Callable[[], Any], **details: Any) -> Any:
        """Run a change and record it (or its failure) in the audit log with who did it."""
        user, role = self._user()
        try:
            result = fn()
        except Exception as exc:
            self.server.audit.append(user, role, action, target, {"ok": False, "error": str(exc), **details})
            raise
        summary = _audit_summary(result)
        self.server.audit.append(user, role, action, target, {"ok": True, **details, **summary})
        return result

    # -- session -------------------------------------------------------------------------------
    def get_session(self) -> None:
        s = self.session
        if s is None:
            self._send_json(200, {"authenticated": False})
        else:
            self._send_json(200, {"authenticated": True, "user": s.user, "role": s.role, "csrf": s.csrf})

    def post_login(self, body: dict[str, Any]) -> None:
        name, password = body.get("username"), body.get("password")
        if not isinstance(name, str) or not isinstance(password, str):
            raise HttpError(400, "username and password are required")
        sessions = self.server.sessions
        remote = self.client_address[0]
        if len(name) > 64 or len(password) > MAX_PASSWORD:  # never valid; keeps throttle keys and scrypt input small
            raise HttpError(400, "username or password too long")
        real = self.server.users.get(name) is not None
        wait, why = sessions.throttle.retry_after(remote, name, real)
        if wait > 0:
            # Refused without checking the password: the delay grows with every failure, capped.
            seconds = math.ceil(wait)
            who = "from this address" if why == "address" else "for this user name"
            raise HttpError(
                429, f"too many failed logins {who}; try again in {seconds} s", {"Retry-After": str(seconds)}
            )
        user = self.server.users.authenticate(name, password)
        if user is None:
            sessions.throttle.failed(remote, name, real)
            self.server.audit.append(name, "-", "session.login", None, {"ok": False, "remote": remote})
            raise HttpError(401, "wrong user name or password")
        sessions.throttle.succeeded(remote, name)
        if self.session is not None:
            sessions.end(self.session.token)
        s = sessions.create(user)
        self.server.audit.append(user.name, user.role, "session.login", None, {"ok": True, "remote": remote})
        cookie = f"{COOKIE}={s.token}; Path=/; HttpOnly; SameSite=Strict" + (
            "; Secure" if self.server.config.secure_cookie else ""
        )
        self._send_json(200, {"user": s.user, "role": s.role, "csrf": s.csrf}, {"Set-Cookie": cookie})

    def post_logout(self, body: dict[str, Any]) -> None:
        assert self.session is not None
        self.server.sessions.end(self.session.token)
        cookie = f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        self._send_json(200, {"ok": True}, {"Set-Cookie": cookie})

    # -- cameras -------------------------------------------------------------------------------
    def get_cameras(self) -> None:
        self._send_json(200, self.server.station.cameras())

    def get_frame(self, camera: str) -> None:
        self._send_bytes(200, self.server.station.latest_jpeg(camera), "image/jpeg")

    def get_overlay(self, camera: str) -> None:
        vid = self.query.get("id")
        if vid is not None and not re.match(r"^[0-9a-f-]{8,64}$", vid):
            raise HttpError(400, "id must be a verdict id")
        data = self.server.station.last_overlay(camera, vid)
        if data is None:
            raise HttpError(404, f"camera {camera}: no overlay {'for verdict ' + vid if vid else 'yet'}")
        self._send_bytes(200, data, "image/jpeg")

    def get_last_verdict(self, camera: str) -> None:
        self._send_json(200, self.server.station.last_verdict(camera))

    # -- recipes and enrollment ------------------------------------------------------------------
    def get_recipes(self) -> None:
        self._send_json(200, self.server.station.recipes())

    def get_recipe(self, name: str) -> None:
        self._send_json(200, self.server.station.recipe(name))

    def get_sample(self, name: str, sha: str) -> None:
        self._send_bytes(200, self.server.station.sample_png(name, sha), "image/png")

    def get_defect(self, name: str, sha: str) -> None:
        self._send_bytes(200, self.server.station.defect_png(name, sha), "image/png")

    def get_defect_mask(self, name: str, sha: str) -> None:
        self._send_bytes(200, self.server.station.defect_png(name, sha, mask=True), "image/png")

    def post_enroll_start(self, body: dict[str, Any]) -> None:
        recipe = _str(body, "recipe")
        camera = _str(body, "camera", optional=True)
        roi = _roi(body.get("roi"))
        settings: dict[str, Any] = {}
        if body.get("target_frr") is not None:
            settings["target_frr"] = _num(body, "target_frr", 1e-6, 0.5)
        if body.get("augment"):
            aug = body["augment"]
            if not isinstance(aug, list) or not all(isinstance(a, str) for a in aug):
                raise HttpError(400, "augment must be a list of names")
            settings["augment"] = tuple(aug)
        st = self.server.station
        result = self._audited(
            "enroll.start", recipe, lambda: st.enroll_start(recipe, camera, roi, **settings), camera=camera, roi=roi
        )
        self._send_json(200, result)

    def post_enroll_capture(self, body: dict[str, Any]) -> None:
        recipe, camera = _str(body, "recipe"), _str(body, "camera")
        st = self.server.station
        result = self._audited("enroll.capture", recipe, lambda: st.enroll_capture(recipe, camera), camera=camera)
        self._send_json(200, result)

    def post_enroll_upload(self, body: dict[str, Any]) -> None:
        recipe = _str(body, "recipe")
        files = body.get("files")
        if not isinstance(files, list) or not files:
            raise HttpError(400, "files must be a non-empty list of {name, data (base64)}")
        decoded = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("data"), str):
                raise HttpError(400, "each file needs a name and base64 data")
            data = f["data"].split(",", 1)[1] if f["data"].startswith("data:") else f["data"]
            try:
                decoded.append((f["name"], base64.b64decode(data, validate=True)))
            except (binascii.Error, ValueError):
                raise HttpError(400, f"{f['name']}: data is not base64") from None
        st = self.server.station
        names = [n for n, _ in decoded]
        result = self._audited("enroll.upload", recipe, lambda: st.enroll_upload(recipe, decoded), files=names)
        self._send_json(200, result)

    def post_defect_upload(self, body: dict[str, Any]) -> None:
        recipe = _str(body, "recipe")
        files = body.get("files")
        if not isinstance(files, list) or not files:
            raise HttpError(400, "files must be a non-empty list of {name, data (base64), mask?, defect_type?}")
        uploads = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("data"), str):
                raise HttpError(400, "each file needs a name and base64 data")
            mask = None if f.get("mask") is None else _b64(f, "mask", f"{f['name']} mask")
            uploads.append(DefectUpload(f["name"], _b64(f, "data", f["name"]), mask, _defect_type(f)))
        st = self.server.station
        names = [u.name for u in uploads]
        masked = [u.name for u in uploads if u.mask is not None]
        result = self._audited(
            "enroll.defect.add", recipe, lambda: st.enroll_defect_upload(recipe, uploads), files=names, masked=masked
        )
        self._send_json(200, result)

    def post_defect_capture(self, body: dict[str, Any]) -> None:
        recipe, camera = _str(body, "recipe"), _str(body, "camera")
        defect_type = _defect_type(body)
        st = self.server.station
        result = self._audited(
            "enroll.defect.add",
            recipe,
            lambda: st.enroll_defect_capture(recipe, camera, defect_type),
            camera=camera,
            defect_type=defect_type,
        )
        self._send_json(200, result)

    def post_defect_mark(self, body: dict[str, Any]) -> None:
        recipe, sample = _str(body, "recipe"), _str(body, "sample", pattern=r"^[^/\\]{1,200}$")
        mask = None if body.get("mask") is None else _b64(body, "mask", f"{sample} mask")
        defect_type = _defect_type(body)
        st = self.server.station
        result = self._audited(
            "enroll.defect.add",
            recipe,
            lambda: st.enroll_defect_mark(recipe, sample, mask, defect_type),
            from_sample=sample,
            masked=mask is not None,
            defect_type=defect_type,
        )
        self._send_json(200, result)

    def post_defect_remove(self, body: dict[str, Any]) -> None:
        recipe, defect = _str(body, "recipe"), _str(body, "defect", pattern=r"^[^/\\]{1,200}$")
        st = self.server.station
        result = self._audited(
            "enroll.defect.remove", recipe, lambda: st.enroll_defect_remove(recipe, defect), defect=defect
        )
        self._send_json(200, result)

    def post_enroll_remove(self, body: dict[str, Any]) -> None:
        recipe, sample = _str(body, "recipe"), _str(body, "sample", pattern=r"^[^/\\]{1,200}$")
        st = self.server.station
        result = self._audited("enroll.remove", recipe, lambda: st.enroll_remove(recipe, sample), sample=sample)
        self._send_json(200, result)

    def post_enroll_finish(self, body: dict[str, Any]) -> None:
        recipe = _str(body, "recipe")
        camera = _str(body, "camera", optional=True)
        accept = body.get("accept_flagged", False)
        if not isinstance(accept, bool):
            raise HttpError(400, "accept_flagged must be true or false")
        st = self.server.station
        result = self._audited(
            "enroll.finish",
            recipe,
            lambda: st.enroll_finish(recipe, camera, accept),
            camera=camera,
            accept_flagged=accept,
        )
        self._send_json(200, result)

    def post_assign(self, body: dict[str, Any]) -> None:
        camera = _str(body, "camera")
        recipe = _str(body, "recipe", optional=True)
        st = self.server.station
        self._send_json(200, self._audited("recipe.assign", recipe, lambda: st.assign(camera, recipe), camera=camera))

    def post_delete_recipe(self, body: dict[str, Any]) -> None:
        recipe = _str(body, "recipe")
        st = self.server.station
        self._audited("recipe.delete", recipe, lambda: st.delete_recipe(recipe))
        self._send_json(200, {"deleted": recipe})

    # -- history ---------------------------------------------------------------------------------
    def _history_query(self) -> HistoryQuery:
        q = self.query

        def when(key: str) -> float | None:
            v = q.get(key)
            if not v:
                return None
            try:
                return float(v)
            except ValueError:
                pass
            try:
                import datetime as dt

                moment = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=dt.timezone.utc)
                return moment.timestamp()
            except ValueError:
                raise HttpError(400, f"{key}: not a time (ISO-8601 or epoch seconds): {v!r}") from None

        try:
            limit = max(1, min(int(q.get("limit", "100")), 5000))
        except ValueError:
            raise HttpError(400, "limit must be a number") from None
        return HistoryQuery(
            camera=q.get("camera") or None,
            recipe=q.get("recipe") or None,
            ng_only=q.get("ng") in ("1", "true", "yes"),
            since=when("since"),
            until=when("until"),
            limit=limit,
        )

    def get_history(self) -> None:
        self._send_json(200, self.server.station.history(self._history_query()))

    def get_history_csv(self) -> None:
        rows = self.server.station.history(self._history_query())
        buf = io.StringIO()
        cols = [
            "id",
            "captured_at",
            "camera",
            "recipe",
            "verdict",
            "score",
            "threshold",
            "normalized_score",
            "location",
            "regions",
            "sentence",
            "explanation",
            "frame_seq",
            "latency_ms",
            "reason",
        ]
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            values = {
                **r,
                "regions": len(r.get("regions") or []),
                "latency_ms": (r.get("latency_ms") or {}).get("total"),
            }
            w.writerow([csv_cell(values.get(c)) for c in cols])
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self._send_bytes(
            200,
            buf.getvalue().encode(),
            "text/csv; charset=utf-8",
            {"Content-Disposition": f'attachment; filename="verdicts-{stamp}.csv"'},
        )

    def get_history_item(self, vid: str) -> None:
        self._send_json(200, self.server.station.history_item(vid))

    def get_history_image(self, vid: str, kind: str) -> None:
        self._send_bytes(200, self.server.station.history_image(vid, kind), "image/jpeg")

    # -- ask: streamed answer --------------------------------------------------------------------
    def post_ask(self, body: dict[str, Any]) -> None:
        vid = _str(body, "verdict_id", pattern=r"^[0-9a-f-]{8,64}$")
        question = body.get("question", "")
        if not isinstance(question, str) or len(question) > 1000:
            raise HttpError(400, "question must be text of at most 1000 characters")
        conversation = _str(body, "conversation", optional=True, pattern=r"^[A-Za-z0-9_-]{1,64}$") or "default"
        assert self.session is not None
        # The conversation belongs to this login: another session cannot continue it.
        key = f"{self.session.token[:16]}:{conversation}"
        station = self.server.station
        station.history_item(vid)  # 404 before any streaming starts
        # Streamed as chunked NDJSON: {"t": piece} lines, then {"done": {...}} or {"error": ...}.
        self._headers(200, "application/x-ndjson", None, {"Transfer-Encoding": "chunked"})

        def chunk(obj: dict[str, Any]) -> None:
            data = (json.dumps(obj, default=_json_default) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            result = station.ask(key, vid, question, lambda piece: chunk({"t": piece}))
            chunk({"done": result})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            log.warning("ask failed: %s", exc)
            chunk({"error": str(exc)})
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- system and admin ------------------------------------------------------------------------
    def get_system(self) -> None:
        self._send_json(200, self.server.station.system())

    def get_audit(self) -> None:
        try:
            limit = max(1, min(int(self.query.get("limit", "200")), 5000))
        except ValueError:
            raise HttpError(400, "limit must be a number") from None
        self._send_json(200, self.server.audit.entries(limit))

    def get_users(self) -> None:
        self._send_json(200, [{"name": u.name, "role": u.role} for u in self.server.users.users()])

    def post_users(self, body: dict[str, Any]) -> None:
        action = body.get("action")
        name = _str(body, "name")
        users, sessions = self.server.users, self.server.sessions
        if action == "set":
            role, password = _str(body, "role"), body.get("password")
            if not isinstance(password, str):
                raise HttpError(400, "password is required")

            def change() -> dict[str, Any]:
                u = users.set(name, role, password)
                sessions.end_user(name)  # a new password or role takes effect everywhere at once
                return {"name": u.name, "role": u.role}

            self._send_json(200, self._audited("user.set", name, change, new_role=role))
        elif action == "remove":

            def remove() -> dict[str, Any]:
                if not users.remove(name):
                    raise NotFoundError(f"no user '{name}'")
                sessions.end_user(name)
                return {"removed": name}

            self._send_json(200, self._audited("user.remove", name, remove))
        else:
            raise HttpError(400, "action must be 'set' or 'remove'")


# --- helpers --------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _str(
    body: dict[str, Any], key: str, optional: bool = False, pattern: str = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
) -> Any:
    v = body.get(key)
    if v is None or v == "":
        if optional:
            return None
        raise HttpError(400, f"'{key}' is required")
    if not isinstance(v, str) or not re.match(pattern, v):
        raise HttpError(400, f"'{key}' is not valid: {str(v)[:80]!r}")
    return v


def _b64(obj: dict[str, Any], key: str, label: str) -> bytes:
    """``obj[key]`` as bytes: base64, or a ``data:`` URL as a browser's FileReader/canvas gives it."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise HttpError(400, f"{label}: {key} must be base64 text")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{label}: {key} is not base64") from None


def _defect_type(obj: dict[str, Any]) -> str | None:
    """The optional ``defect_type``: letters, digits, space, ``_.-``, at most 64 characters."""
    return _str(obj, "defect_type", optional=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_ .-]{0,63}$")


def _num(body: dict[str, Any], key: str, low: float, high: float) -> float:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < high:
        raise HttpError(400, f"'{key}' must be a number in [{low}, {high})")
    return float(v)


def _roi(v: Any) -> tuple[int, int, int, int] | None:
    if v is None:
        return None
    if (
        not isinstance(v, list)
        or len(v) != 4
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        or v[0] < 0
        or v[1] < 0
        or v[2] < 8
        or v[3] < 8
    ):
        raise HttpError(400, "roi must be [x, y, w, h] in whole pixels, at least 8x8")
    return (v[0], v[1], v[2], v[3])


def _audit_summary(result: Any) -> dict[str, Any]:
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
