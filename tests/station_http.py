"""A small HTTP client for the station tests: keeps the session cookie and CSRF token like a browser."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import urlsplit


class Response:
    """Status, headers and body of one answer."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One 'browser': the cookie from login is sent back; ``csrf`` is sent on POSTs when set."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None):
        u = urlsplit(base_url)
        self.host, self.port = u.hostname, u.port
        self.https = u.scheme == "https"
        self.ssl_context = ssl_context
        self.cookie: str | None = None
        self.csrf: str | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        csrf: bool = True,
    ) -> Response:
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=30, context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        h = dict(headers or {})
        if self.cookie:
            h.setdefault("Cookie", self.cookie)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if method == "POST" and csrf and self.csrf:
            h.setdefault("X-CSRF-Token", self.csrf)
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            resp = Response(r.status, r.headers, r.read())
        finally:
            conn.close()
        set_cookie = resp.headers.get("Set-Cookie")
        if set_cookie:
            self.cookie = set_cookie.split(";")[0]
        return resp

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body if body is not None else {}, **kw)

    def login(self, user: str, password: str) -> Response:
        r = self.post("/api/login", {"username": user, "password": password})
        if r.status == 200:
            self.csrf = r.json()["csrf"]
        return r
