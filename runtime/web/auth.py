"""Station users, roles, password hashing and server-side sessions with CSRF tokens.

Roles are ordered: ``viewer`` (look only: live view, history and its CSV, system, the learn
figures; for a screen in an office or the quality lab) < ``operator`` (also label verdicts and
ask the model) < ``technician`` (also enroll and change recipes) < ``admin`` (also configuration
and users). A higher role may do everything a lower one may.

Passwords are hashed with scrypt (memory-hard, in the standard library) and a random per-user
salt; the parameters are stored with each hash so they can be raised later without breaking old
users. Sessions live only in server memory: the cookie carries a random token, nothing else, so a
restart logs everyone out, which is acceptable for a line-side station.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalygpt_edge.atomic_files import atomic_write_bytes

#: Lowest first: a role may do what every role before it may.
ROLES = ("viewer", "operator", "technician", "admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: scrypt cost: 2**14 x 8 x 1 needs 16 MiB and ~50 ms on a small CPU: slow for guessing, fine for a login.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD, MAX_PASSWORD = 8, 1024  # the login refuses longer ones before hashing them
#: A shift: idle sessions end after this long; any session ends after MAX_AGE_S.
IDLE_TIMEOUT_S = 8 * 3600
MAX_AGE_S = 12 * 3600
#: Login throttling (see :class:`LoginThrottle`): this many failures are free, then each further
#: attempt waits BASE_DELAY_S, doubling per failure up to MAX_DELAY_S; failures are forgotten
#: FAILURE_MEMORY_S after the last one.
FREE_FAILURES, BASE_DELAY_S, MAX_DELAY_S, FAILURE_MEMORY_S = 5, 1.0, 60.0, 900.0
#: Bounds of the throttle's tables (least recently used entries go first).
MAX_TRACKED_ADDRESSES, MAX_TRACKED_NAMES, KNOWN_ADDRESSES_PER_USER = 4096, 4096, 8


class AuthError(ValueError):
    """A user-management request that cannot be done (bad name, role or password); says why."""


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (ordered viewer < operator < technician < admin)."""
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
        if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise AuthError(f"password must be at least {MIN_PASSWORD} and at most {MAX_PASSWORD} characters")
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


@dataclass
class _Backoff:
    """Recent failures of one address or one name, and the wait they impose."""

    failures: int = 0
    last: float = 0.0
    known: list[str] = field(default_factory=list)  # users only: addresses they logged in from

    def forget_if_stale(self, now: float) -> None:
        if self.failures and now - self.last > FAILURE_MEMORY_S:
            self.failures = 0

    def wait(self, now: float) -> float:
        """Seconds before the next attempt may be checked (0: now)."""
        self.forget_if_stale(now)
        if self.failures < FREE_FAILURES:
            return 0.0
        doublings = min(self.failures - FREE_FAILURES, 32)  # past the cap anyway; 2.0**n overflows
        delay = min(BASE_DELAY_S * 2.0**doublings, MAX_DELAY_S)
        return max(0.0, self.last + delay - now)

    def fail(self, now: float) -> None:
        self.forget_if_stale(now)
        self.failures += 1
        self.last = now


def address_key(address: str) -> str:
    """The throttling bucket of a client address: the address, or its /64 for IPv6 (one host
    usually holds a whole /64, so per-address buckets would be free to multiply)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # a dual-stack socket's view of an IPv4 client
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    """Failed-login throttling per client address and per user name, with a growing delay.

    * **Per address**: after :data:`FREE_FAILURES` failures from an address (any names), each
      further attempt from it must wait a delay that doubles per failure, up to
      :data:`MAX_DELAY_S`. Spraying names from one address is slowed like guessing one.
    * **Per name**: the same for failures against one name from any address (a distributed
      guess), except from addresses the user has logged in from before: another client's
      failures never lock the real user out at their own station, and elsewhere they only delay
      (at most :data:`MAX_DELAY_S`), never lock.
    * **Bounded without being clearable**: addresses and names live in LRU tables. Names of real
      users have a table of their own (as many entries as there are users), so a flood of made-up
      names can only evict made-up names, and a flood from one address is one entry. Made-up names
      are throttled like real ones, so a 429 does not tell which names exist.

    A refused attempt does not check the password and does not count as a failure.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._addresses: collections.OrderedDict[str, _Backoff] = collections.OrderedDict()
        self._users: collections.OrderedDict[str, _Backoff] = collections.OrderedDict()
        self._others: collections.OrderedDict[str, _Backoff] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _entry(table: collections.OrderedDict[str, _Backoff], key: str, limit: int, create: bool) -> _Backoff | None:
        entry = table.get(key)
        if entry is None:
            if not create:
                return None
            entry = table[key] = _Backoff()
            while len(table) > limit:
                table.popitem(last=False)
        table.move_to_end(key)
        return entry

    def _name_table(self, real_user: bool) -> collections.OrderedDict[str, _Backoff]:
        return self._users if real_user else self._others

    def retry_after(self, address: str, name: str, real_user: bool) -> tuple[float, str | None]:
        """(seconds to wait, ``"address"`` or ``"user"``) before an attempt for ``name`` from
        ``address`` may be checked; (0, None) when it may be checked now."""
        now = self._clock()
        key = address_key(address)
        with self._lock:
            by_address = self._entry(self._addresses, key, MAX_TRACKED_ADDRESSES, create=False)
            wait = by_address.wait(now) if by_address else 0.0
            if wait > 0:
                return wait, "address"
            by_name = self._entry(self._name_table(real_user), name, MAX_TRACKED_NAMES, create=False)
            if by_name is not None and key not in by_name.known:
                wait = by_name.wait(now)
                if wait > 0:
                    return wait, "user"
        return 0.0, None

    def failed(self, address: str, name: str, real_user: bool) -> None:
        """Count a wrong password (or unknown name) for ``name`` from ``address``."""
        now = self._clock()
        with self._lock:
            by_address = self._entry(self._addresses, address_key(address), MAX_TRACKED_ADDRESSES, create=True)
            assert by_address is not None
            by_address.fail(now)
            by_name = self._entry(self._name_table(real_user), name, MAX_TRACKED_NAMES, create=True)
            assert by_name is not None
            by_name.fail(now)

    def succeeded(self, address: str, name: str) -> None:
        """A good login: the address's and the user's failures are cleared, and the address is
        remembered as one this user logs in from."""
        key = address_key(address)
        with self._lock:
            self._addresses.pop(key, None)
            user = self._entry(self._users, name, MAX_TRACKED_NAMES, create=True)
            assert user is not None
            user.failures = 0
            if key in user.known:
                user.known.remove(key)
            user.known.append(key)
            del user.known[:-KNOWN_ADDRESSES_PER_USER]

    def tracked(self) -> dict[str, int]:
        """Table sizes (for tests and the system page)."""
        with self._lock:
            return {"addresses": len(self._addresses), "users": len(self._users), "others": len(self._others)}


class Sessions:
    """Server-side sessions with idle and absolute expiry, and login throttling (:attr:`throttle`)."""

    def __init__(
        self,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_age_s: float = MAX_AGE_S,
        throttle: LoginThrottle | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self.throttle = throttle or LoginThrottle(clock)
        self._clock = clock  # a monotonic clock; tests move a fake one instead of sleeping
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: User) -> Session:
        """A new session with fresh random cookie and CSRF tokens (never reused after login: no fixation)."""
        now = self._clock()
        s = Session(secrets.token_urlsafe(32), user.name, user.role, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._sessions[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        """The live session for a cookie token, refreshing its idle timer; None if unknown or expired."""
        if not token:
            return None
        now = self._clock()
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


def csrf_ok(session: Session, header_value: str | None) -> bool:
    """Constant-time comparison of the request's CSRF header with the session's token."""
    return bool(header_value) and hmac.compare_digest(session.csrf.encode(), str(header_value).encode())
