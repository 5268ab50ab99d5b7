"""Camera, system and admin routes: live frames and verdicts, the system page, audit log, users."""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response, StreamingResponse

from anomalygpt_edge.runtime.web.http_base import SECURITY_HEADERS, Context, HttpError, answer, json_answer
from anomalygpt_edge.runtime.web.http_bodies import UsersBody
from anomalygpt_edge.runtime.web.live import BOUNDARY, mjpeg
from anomalygpt_edge.runtime.web.routes_history import query_limit
from anomalygpt_edge.runtime.web.station import NotFoundError


def get_cameras(ctx: Context) -> Response:
    return json_answer(ctx.station.cameras())


def get_frame(ctx: Context, camera: str) -> Response:
    return answer(200, ctx.station.latest_jpeg(camera), "image/jpeg")


def get_live(ctx: Context, camera: str) -> Response:
    """The camera's live view as MJPEG (see runtime/web/live.py): one stream per session and camera."""
    ctx.station.latest_frame(camera)  # an unknown camera, a watched folder: a JSON error, not an empty stream
    assert ctx.session is not None  # a route with a role: there is a session
    live = ctx.state.live
    stream = live.open(ctx.session.token, camera)
    if stream is None:
        raise HttpError(503, "too many live views open; close one", {"Retry-After": "5"})
    headers = {"Cache-Control": "no-store", **SECURITY_HEADERS}
    ctype = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
    token, sessions = ctx.session.token, ctx.state.sessions
    parts = mjpeg(ctx.station, camera, stream, live.max_fps, lambda: sessions.get(token) is not None)
    return StreamingResponse(parts, media_type=ctype, headers=headers)


def get_overlay(ctx: Context, camera: str) -> Response:
    """The heatmap overlay of the camera's last verdict (or of ``?id=``, while it is recent)."""
    vid = ctx.query.get("id")
    if vid is not None and not re.match(r"^[0-9a-f-]{8,64}$", vid):
        raise HttpError(400, "id must be a verdict id")
    data = ctx.station.last_overlay(camera, vid)
    if data is None:
        raise HttpError(404, f"camera {camera}: no overlay {'for verdict ' + vid if vid else 'yet'}")
    return answer(200, data, "image/jpeg")


def get_last_verdict(ctx: Context, camera: str) -> Response:
    return json_answer(ctx.station.last_verdict(camera))


def get_system(ctx: Context) -> Response:
    return json_answer(ctx.station.system())


def get_audit(ctx: Context) -> Response:
    return json_answer(ctx.state.audit.entries(query_limit(ctx.query, 200)))


def get_users(ctx: Context) -> Response:
    return json_answer([{"name": u.name, "role": u.role} for u in ctx.state.users.users()])


def post_users(ctx: Context) -> Response:
    """Set (add, new role or password) or remove a user; either ends that user's sessions at once."""
    body: UsersBody = ctx.body
    users, sessions = ctx.state.users, ctx.state.sessions

    def set_user() -> dict[str, Any]:
        assert body.role is not None and body.password is not None
        u = users.set(body.name, body.role, body.password)
        sessions.end_user(body.name)  # a new password or role takes effect everywhere at once
        return {"name": u.name, "role": u.role}

    def remove_user() -> dict[str, Any]:
        if not users.remove(body.name):
            raise NotFoundError(f"no user '{body.name}'")
        sessions.end_user(body.name)
        return {"removed": body.name}

    if body.action == "set":
        return json_answer(ctx.audited(body.name, set_user, new_role=body.role))
    return json_answer(ctx.audited(body.name, remove_user))
