"""Session routes: who is logged in, login (throttled per address and per user name), logout."""

from __future__ import annotations

import math

from starlette.responses import Response

from anomalygpt_edge.runtime.web.auth import MAX_PASSWORD
from anomalygpt_edge.runtime.web.http_base import COOKIE, Context, HttpError, json_answer
from anomalygpt_edge.runtime.web.http_bodies import LoginBody


def get_session(ctx: Context) -> Response:
    """Whether this browser is logged in, and as whom (with the CSRF token the page must send)."""
    s = ctx.session
    if s is None:
        return json_answer({"authenticated": False})
    return json_answer({"authenticated": True, "user": s.user, "role": s.role, "csrf": s.csrf})


def post_login(ctx: Context) -> Response:
    """A new session for a right user name and password; failures slow down the next attempt."""
    body: LoginBody = ctx.body
    name, password = body.username, body.password
    sessions, remote = ctx.state.sessions, ctx.remote
    if len(name) > 64 or len(password) > MAX_PASSWORD:  # never valid; keeps throttle keys and scrypt input small
        raise HttpError(400, "username or password too long")
    real = ctx.state.users.get(name) is not None
    wait, why = sessions.throttle.retry_after(remote, name, real)
    if wait > 0:
        # Refused without checking the password: the delay grows with every failure, capped.
        seconds = math.ceil(wait)
        who = "from this address" if why == "address" else "for this user name"
        raise HttpError(429, f"too many failed logins {who}; try again in {seconds} s", {"Retry-After": str(seconds)})
    user = ctx.state.users.authenticate(name, password)
    if user is None:
        sessions.throttle.failed(remote, name, real)
        ctx.state.audit.append(name, "-", "session.login", None, {"ok": False, "remote": remote})
        raise HttpError(401, "wrong user name or password")
    sessions.throttle.succeeded(remote, name)
    if ctx.session is not None:
        sessions.end(ctx.session.token)
    s = sessions.create(user)
    ctx.state.audit.append(user.name, user.role, "session.login", None, {"ok": True, "remote": remote})
    cookie = f"{COOKIE}={s.token}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if ctx.state.secure_cookie else "")
    return json_answer({"user": s.user, "role": s.role, "csrf": s.csrf}, headers={"Set-Cookie": cookie})


def post_logout(ctx: Context) -> Response:
    """End this session; the cookie is cleared too."""
    assert ctx.session is not None
    ctx.state.sessions.end(ctx.session.token)
    cookie = f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
    return json_answer({"ok": True}, headers={"Set-Cookie": cookie})
