"""The station's Starlette application: the route table, the guard every API route passes, the
static pages, and the translation of errors into JSON answers.

Security model, in one place:

* Every ``/api`` route except login needs a session cookie (``HttpOnly; SameSite=Strict``) that
  maps to a server-side session; no session → 401.
* Every POST (all state changes are POSTs) also needs the session's CSRF token in the
  ``X-CSRF-Token`` header and, when the browser sends one, an ``Origin`` equal to this server;
  otherwise 403. Login itself needs a JSON body, which a cross-site form cannot send.
* Each route names the least role allowed (viewer < operator < technician < admin); a lower role
  → 403, before the body is read or the station called. Every read is a viewer's (admin's pages
  excepted); every POST but login and logout needs at least an operator.
* A POST body is bounded before it is read (Content-Length checked, then streamed up to it) and
  validated against the route's body model before any handler runs.
* Enrollment, recipe, label and user changes are written to the audit log under the route's own
  ``audit`` action, failures included.

:data:`ROUTES` is the single route table; the tests walk it to prove every mutating route is
guarded.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anomalygpt_edge.engines.preprocess import ImageError
from anomalygpt_edge.runtime.recipes.store import RecipeError
from anomalygpt_edge.runtime.web import http_bodies as b
from anomalygpt_edge.runtime.web import routes_enroll as enroll
from anomalygpt_edge.runtime.web import routes_history as history
from anomalygpt_edge.runtime.web import routes_learn as learn
from anomalygpt_edge.runtime.web import routes_session as session
from anomalygpt_edge.runtime.web import routes_station as station
from anomalygpt_edge.runtime.web.auth import AuthError, Session, csrf_ok, role_allows
from anomalygpt_edge.runtime.web.http_base import (
    COOKIE,
    MAX_JSON_BODY,
    MAX_UPLOAD_BODY,
    Context,
    HttpError,
    Route,
    StationState,
    answer,
    error_answer,
    json_answer,
    parse_json_object,
    read_body,
)
from anomalygpt_edge.runtime.web.station import NotFoundError, StationError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
_SEG = r"([A-Za-z0-9][A-Za-z0-9_.@-]{0,63})"
_SHA = "([0-9a-f]{64})"
_VID = "([0-9a-f-]{8,64})"
_UP = MAX_UPLOAD_BODY
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def _change(
    path: str, plan: Any, audit: str, body: type[b.Body], role: str = "technician", max_body: int = MAX_JSON_BODY
) -> Route:
    """A POST route that makes one audited change (the shared handler runs the route's plan)."""
    return Route("POST", path, role, enroll.changing(plan), audit, max_body, body)


def _learning(path: str, handler: Any, audit: str, body: type[b.Body]) -> Route:
    """A technician's audited POST on one recipe's proposal or versions (the recipe is in the path)."""
    return Route("POST", path, "technician", handler, audit, MAX_JSON_BODY, body)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/session", None, session.get_session),
    Route("POST", "/api/login", None, session.post_login, body=b.LoginBody),
    Route("POST", "/api/logout", "viewer", session.post_logout),
    Route("GET", "/api/cameras", "viewer", station.get_cameras),
    Route("GET", f"/api/cameras/{_SEG}/frame.jpg", "viewer", station.get_frame),
    Route("GET", f"/api/cameras/{_SEG}/live.mjpg", "viewer", station.get_live),
    Route("GET", f"/api/cameras/{_SEG}/overlay.jpg", "viewer", station.get_overlay),
    Route("GET", f"/api/cameras/{_SEG}/verdict", "viewer", station.get_last_verdict),
    Route("GET", "/api/recipes", "viewer", enroll.get_recipes),
    Route("GET", f"/api/recipes/{_SEG}", "viewer", enroll.get_recipe),
    Route("GET", f"/api/recipes/{_SEG}/samples/{_SHA}.png", "viewer", enroll.get_sample),
    Route("GET", f"/api/recipes/{_SEG}/defects/{_SHA}.png", "viewer", enroll.get_defect),
    Route("GET", f"/api/recipes/{_SEG}/defects/{_SHA}/mask.png", "viewer", enroll.get_defect_mask),
    _change("/api/enroll/start", enroll.enroll_start, "enroll.start", b.EnrollStartBody),
    _change("/api/enroll/capture", enroll.enroll_capture, "enroll.capture", b.RecipeCameraBody),
    _change("/api/enroll/upload", enroll.enroll_upload, "enroll.upload", b.EnrollUploadBody, max_body=_UP),
    _change("/api/enroll/remove", enroll.enroll_remove, "enroll.remove", b.SampleBody),
    _change("/api/enroll/finish", enroll.enroll_finish, "enroll.finish", b.EnrollFinishBody),
    # Labelled defective parts: uploads and painted masks travel as base64, like golden uploads.
    _change("/api/enroll/defect/upload", enroll.defect_upload, "enroll.defect.add", b.DefectUploadBody, max_body=_UP),
    _change("/api/enroll/defect/capture", enroll.defect_capture, "enroll.defect.add", b.DefectCaptureBody),
    _change("/api/enroll/defect/mark", enroll.defect_mark, "enroll.defect.add", b.DefectMarkBody, max_body=_UP),
    _change("/api/enroll/defect/remove", enroll.defect_remove, "enroll.defect.remove", b.DefectRemoveBody),
    _change("/api/recipes/assign", enroll.assign, "recipe.assign", b.AssignBody),
    _change("/api/recipes/delete", enroll.delete_recipe, "recipe.delete", b.RecipeBody, role="admin"),
    # The line learns (issue 14): proposals from labelled verdicts, versions, rollback (routes_learn.py).
    Route("GET", f"/api/recipes/{_SEG}/labelled", "viewer", learn.get_labelled),
    Route("GET", f"/api/recipes/{_SEG}/proposal", "viewer", learn.get_proposal),
    _learning(f"/api/recipes/{_SEG}/proposal", learn.post_proposal, "recipe.propose", b.ProposeBody),
    _learning(f"/api/recipes/{_SEG}/proposal/apply", learn.post_apply, "recipe.apply", b.ApplyProposalBody),
    _learning(f"/api/recipes/{_SEG}/proposal/discard", learn.post_discard, "recipe.discard", b.ProposeBody),
    Route("GET", f"/api/recipes/{_SEG}/versions", "viewer", learn.get_versions),
    _learning(f"/api/recipes/{_SEG}/rollback", learn.post_rollback, "recipe.rollback", b.RollbackBody),
    Route("GET", "/api/history", "viewer", history.get_history),
    Route("GET", "/api/history.csv", "viewer", history.get_history_csv),
    Route("GET", f"/api/history/{_VID}", "viewer", history.get_history_item),
    Route("GET", f"/api/history/{_VID}/(image|heatmap).jpg", "viewer", history.get_history_image),
    # Ask changes nothing stored, yet it is an operator's: it takes the one LLM the daemon also
    # explains NG verdicts with (seconds each, and it ends a follow-up conversation), so a screen
    # that only looks must not hold the line's explanations up.
    Route("POST", "/api/ask", "operator", history.post_ask, body=b.AskBody),
    Route("POST", f"/api/verdicts/{_VID}/label", "operator", history.post_label, "verdict.label", body=b.LabelBody),
    Route("GET", f"/api/verdicts/{_VID}/labels", "viewer", history.get_labels),
    Route("GET", "/api/system", "viewer", station.get_system),
    Route("GET", "/api/audit", "admin", station.get_audit),
    Route("GET", "/api/users", "admin", station.get_users),
    Route("POST", "/api/users", "admin", station.post_users, "user.{action}", body=b.UsersBody),
)


def guard(route: Route, request: Request, sessions: Any) -> Session | None:
    """The request's session; 401 without one, 403 without the CSRF token / with a foreign Origin /
    below the route's role."""
    found = sessions.get(request.cookies.get(COOKIE))
    if route.role is None:
        if route.method == "POST":
            check_origin(request)
        return found
    if found is None:
        raise HttpError(401, "log in first")
    if route.method == "POST":
        check_origin(request)
        if not csrf_ok(found, request.headers.get("x-csrf-token")):
            raise HttpError(403, "missing or wrong CSRF token; reload the page")
    if not role_allows(found.role, route.role):
        raise HttpError(403, f"this needs the {route.role} role; you are {found.role}")
    return found


def check_origin(request: Request) -> None:
    """403 when a browser's ``Origin`` is not this server (non-browser clients send none)."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise HttpError(403, "cross-origin request refused")


class ApiRoute(BaseRoute):
    """One :class:`Route` of the table as a Starlette route: matched by its regex, then guarded,
    its body read and validated, and its handler run on a worker thread."""

    def __init__(self, route: Route, state: StationState):
        self.route = route
        self.state = state

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or not self.route.regex.match(scope["path"]):
            return Match.NONE, {}
        return (Match.FULL if scope["method"] == self.route.method else Match.PARTIAL), {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = Context(self.state, self.route, Request(scope, receive), body_read=scope["method"] != "POST")
        response = await self._respond(ctx)
        await response(scope, receive, send)

    async def _respond(self, ctx: Context) -> Response:
        route, request = self.route, ctx.request
        try:
            if request.method != route.method:
                raise HttpError(405, "method not allowed")
            m = route.regex.match(request.scope["path"])
            assert m is not None  # matches() said so
            ctx.session = guard(route, request, self.state.sessions)
            if route.method == "POST":
                raw = await read_body(request, route.max_body)
                ctx.body_read = True
                data = parse_json_object(raw, request.headers.get("content-type", ""))
                ctx.body = b.validate(route.body or b.EmptyBody, data)
            return await run_in_threadpool(route.handler, ctx, *m.groups())
        except HttpError as exc:
            return error_answer(exc, ctx.body_read)
        except NotFoundError as exc:
            return json_answer({"error": str(exc)}, 404)
        except (StationError, RecipeError, ImageError, AuthError) as exc:
            return json_answer({"error": str(exc)}, 400)
        except Exception as exc:  # noqa: BLE001 - one bad request must never take the station down
            log.exception("station request %s %s failed", request.method, request.url.path)
            return json_answer({"error": f"internal error: {type(exc).__name__}"}, 500)


class TitleCaseHeaders:
    """Send header names as ``Content-Type`` rather than Starlette's ``content-type``. Equal to
    HTTP, but the station's answers keep the spelling they always had: scripts on the line and
    the tests that read raw bytes match ``Connection: close`` as written."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def titled(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(title_case(k), v) for k, v in message.get("headers", [])]
            await send(message)

        await self.app(scope, receive, titled if scope["type"] == "http" else send)


def title_case(name: bytes) -> bytes:
    """``x-frame-options`` → ``X-Frame-Options``."""
    return b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))


def static_files() -> dict[str, Path]:
    """The page's files by name: a fixed set, so no request path can reach another file."""
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}


def build_app(state: StationState) -> ASGIApp:
    """The station as an ASGI application."""

    def page(request: Request) -> Response:
        path = request.url.path
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        file = state.static.get(name) if "/" not in name else None
        if file is None:
            raise HttpError(404, f"no such page {path}")
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return answer(200, file.read_bytes(), ctype)

    def no_endpoint(request: Request) -> Response:
        # Reached for a path no route has, or one whose routes take another method.
        if any(r.regex.match(request.url.path) for r in ROUTES):
            raise HttpError(405, "method not allowed")
        raise HttpError(404, f"no such endpoint {request.url.path}")

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HttpError):
            return error_answer(exc, request.method not in ("POST", "PUT", "PATCH"))
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = "method not allowed" if status == 405 else str(getattr(exc, "detail", "error"))
        return error_answer(HttpError(status, message), request.method not in ("POST", "PUT", "PATCH"))

    routes: list[BaseRoute] = [ApiRoute(r, state) for r in ROUTES]
    routes.append(StarletteRoute("/api/{rest:path}", no_endpoint, methods=_ALL_METHODS))
    routes.append(StarletteRoute("/{path:path}", page, methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, HttpError: http_error})
    return TitleCaseHeaders(app)
