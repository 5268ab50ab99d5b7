"""Station users, roles, password hashing and server-side sessions with CSRF tokens.

Roles are ordered: ``operator`` (view the line, history, ask) < ``technician`` (also enroll and
change recipes) < ``admin`` (also configuration and users). A higher role may do everything a
lower one may.

Passwords are hashed with scrypt (memory-hard, in the standard library) and a random per-user
salt; the parameters are stored with each hash so they can be raised later without breaking old
users. Sessions live only in server memory: the cookie carries a random token, nothing else, so a
restart logs everyone out, which is acceptable for a line-side station.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalygpt_edge.engines.integrity import atomic_write_bytes

ROLES = ("operator", "technician", "admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: scrypt cost: 2**14 x 8 x 1 needs 16 MiB and ~50 ms on a small CPU: slow for guessing, fine for a login.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD = 8
#: A shift: idle sessions end after this long; any session ends after MAX_AGE_S.
IDLE_TIMEOUT_S = 8 * 3600
MAX_AGE_S = 12 * 3600
#: Failed logins per user name within the window before further attempts are refused for a while.
MAX_FAILURES, FAILURE_WINDOW_S, LOCKOUT_S = 5, 300.0, 60.0


class AuthError(ValueError):
    """A user-management request that cannot be done (bad name, role or password); says why."""


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (roles are ordered operator < technician < admin)."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """scrypt hash record ``{algo, n, r, p, salt, hash}`` (hex) of ``password`` with a fresh 16-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32
    )
    return {"algo": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(), "hash": digest.hex()}


def verify_password(password: str, record: dict[str, Any]) -> bool:
    """Constant-time check of ``password`` against a record from :func:`hash_password`."""
    if record.get("algo") != "scrypt":
        return False
    try:
        digest = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(record["salt"]),
            n=int(record["n"]),
            r=int(record["r"]),
            p=int(record["p"]),
            maxmem=64 * 1024 * 1024,
            dklen=32,
        )
        return hmac.compare_digest(digest, bytes.fromhex(record["hash"]))
    except (KeyError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class User:
    """A station user as the web layer sees it (never the hash)."""

    name: str
    role: str


class UserStore:
    """The users file: JSON ``{"format": 1, "users": {name: {role, algo, n, r, p, salt, hash, ...}}}``.

    Written crash-safely and readable by its owner only (mode 0600). Re-read when it changes on
    disk, so ``anomalygpt-edge web-user add`` takes effect without restarting the station.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}
        self._mtime: float | None = None
        # A fixed dummy hash: unknown users cost the same scrypt time as known ones (no user probing).
        self._dummy = hash_password("unused", salt=b"\0" * 16)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._cache, self._mtime = {}, None
            return self._cache
        if mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise AuthError(f"{self.path}: unreadable users file: {exc}") from exc
            if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("users"), dict):
                raise AuthError(f"{self.path}: not a users file (expected format 1 with a 'users' object)")
            self._cache, self._mtime = data["users"], mtime
        return self._cache

    def users(self) -> list[User]:
        """Every user, by name."""
        with self._lock:
            return [User(n, u["role"]) for n, u in sorted(self._load().items())]

    def get(self, name: str) -> User | None:
        with self._lock:
            u = self._load().get(name)
            return User(name, u["role"]) if u else None

    def set(self, name: str, role: str, password: str) -> User:
        """Add a user or replace its role and password."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise AuthError(f"user name {name!r} is invalid: letters, digits, '_.@-', at most 64 characters")
        if role not in ROLES:
            raise AuthError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(password, str) or len(password) < MIN_PASSWORD:
            raise AuthError(f"password must be at least {MIN_PASSWORD} characters")
        record = {
            "role": role,
            **hash_password(password),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self._lock:
            users = dict(self._load())
            users[name] = record
            self._write(users)
        return User(name, role)

    def remove(self, name: str) -> bool:
        """Delete a user; False if there was none."""
        with self._lock:
            users = dict(self._load())
            if users.pop(name, None) is None:
                return False
            self._write(users)
            return True

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        atomic_write_bytes(self.path, (json.dumps({"format": 1, "users": users}, indent=2) + "\n").encode())
        os.chmod(self.path, 0o600)
        self._cache, self._mtime = users, self.path.stat().st_mtime_ns

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if ``password`` is right, else None (same cost whether or not the user exists)."""
        with self._lock:
            record = self._load().get(name) if isinstance(name, str) else None
        ok = verify_password(password if isinstance(password, str) else "", record or self._dummy)
        return User(name, record["role"]) if ok and record else None


@dataclass
class Session:
    """One logged-in browser: the cookie token maps to this, held only in server memory."""

    token: str
    user: str
    role: str
    csrf: str
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Server-side sessions with idle and absolute expiry, and per-user login throttling."""

    def __init__(self, idle_timeout_s: float = IDLE_TIMEOUT_S, max_age_s: float = MAX_AGE_S):
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def create(self, user: User) -> Session:
        """A new session with fresh random cookie and CSRF tokens (never reused after login: no fixation)."""
        s = Session(secrets.token_urlsafe(32), user.name, user.role, secrets.token_urlsafe(32))
        with self._lock:
            self._sessions[s.token] = s
            self._failures.pop(user.name, None)
        return s

    def get(self, token: str | None) -> Session | None:
        """The live session for a cookie token, refreshing its idle timer; None if unknown or expired."""
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            s = self._sessions.get(token)
            if s is None:
                return None
            if now - s.last_seen > self.idle_timeout_s or now - s.created > self.max_age_s:
                del self._sessions[token]
                return None
            s.last_seen = now
            return s

    def end(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)

    def end_user(self, name: str) -> int:
        """Log a user out everywhere (after removal or a role change); returns how many sessions ended."""
        with self._lock:
            gone = [t for t, s in self._sessions.items() if s.user == name]
            for t in gone:
                del self._sessions[t]
            return len(gone)

    def locked_out(self, name: str) -> bool:
        """Whether logins for ``name`` are refused for now after too many recent failures."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(name, []) if now - t < FAILURE_WINDOW_S]
            self._failures[name] = recent
            return len(recent) >= MAX_FAILURES and now - recent[-1] < LOCKOUT_S

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures.setdefault(name, []).append(time.monotonic())
            if len(self._failures) > 10_000:  # bound memory against floods of made-up names
                self._failures.clear()


def csrf_ok(session: Session, header_value: str | None) -> bool:
    """Constant-time comparison of the request's CSRF header with the session's token."""
    return bool(header_value) and hmac.compare_digest(session.csrf.encode(), str(header_value).encode())
