"""The gate every MQTT command passes before the daemon acts on it.

In order, for one received message:

1. **Topic allow-list**: only ``<prefix>/<device>/cmd/<command>`` with ``<command>`` among the
   configured commands; anything else (another device's topic, a typo, a wildcard the
   subscription let through) is rejected.
2. **Size**: payloads over ``max_payload_bytes`` are rejected before being parsed, so a huge
   message costs neither memory nor CPU in the JSON parser.
3. **Shape**: UTF-8 JSON object, no NaN/Infinity, bounded nesting.
4. **Authorisation** for privileged commands (enrollment, recipe changes and labels by default):
   if ``allowed_client_ids`` is set, the sender's client id (MQTT 5 user property ``client_id``,
   else a ``client_id`` field) must be in it; if ``token`` is set, the shared token (user property
   ``token``, else a ``token`` field) must match, compared in constant time. Both set → both
   required. The token is removed from the body before the daemon sees it (never logged).
   With **neither** set, privileged commands are refused unless ``allow_anonymous`` is true
   (the config's ``commands.allow_anonymous_control``); only their read-only actions
   (:data:`READ_ONLY_ACTIONS`: ``recipe`` list/show/versions/pending) stay open, as triggers do.

MQTT does not tell a subscriber who published a message, so a client id in a user property is a
*claim*: it is only trustworthy when the broker's ACL lets only that client publish to the
command topics (mosquitto ``acl_file`` with ``pattern write anomalygpt/%c/...`` or per-user
``topic write`` lines). The shared token does not depend on the broker; prefer it, over TLS.

Every message gets a :class:`CommandRequest` or a :class:`Rejection` (with the reply to send);
rejections are counted by reason for the status topic. :meth:`CommandGate.check` never raises.
"""

from __future__ import annotations

import hmac
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COMMANDS = ("trigger", "enroll", "recipe", "ask", "label")
PRIVILEGED = ("enroll", "recipe", "label")
#: Actions of privileged commands that change nothing: open without credentials even when
#: anonymous control is off (an HMI may list recipes; it may not create or switch them).
READ_ONLY_ACTIONS: dict[str, frozenset[str]] = {"recipe": frozenset({"list", "show", "versions", "pending"})}
DEFAULT_MAX_PAYLOAD = 64 * 1024
MAX_DEPTH = 32
MAX_TOPIC_LEN = 1024

#: Reasons a command is rejected; each is counted separately.
REJECTION_CODES = (
    "topic_not_allowed",
    "payload_too_large",
    "bad_payload",
    "malformed_json",
    "not_an_object",
    "too_deep",
    "unauthorized",
)


@dataclass(frozen=True)
class CommandPolicy:
    """What commands are accepted, how big, and from whom."""

    prefix: str
    device: str
    commands: frozenset[str] = frozenset(COMMANDS)
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    privileged: frozenset[str] = frozenset(PRIVILEGED)
    allowed_client_ids: frozenset[str] | None = None  # None: no client-id restriction
    token: str | None = None  # None: no token required
    # With neither a token nor client ids: False refuses privileged commands (the safe default),
    # True accepts them from anyone who can publish to the broker (an isolated test bench).
    allow_anonymous: bool = False

    def __post_init__(self) -> None:
        for name in ("prefix", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c in value for c in "+#\0"):
                raise ValueError(f"command policy: {name} must be a non-empty topic level, got {value!r}")
        if self.max_payload_bytes < 2:
            raise ValueError(f"command policy: max_payload_bytes must be >= 2, got {self.max_payload_bytes}")
        if self.token is not None and not self.token:
            raise ValueError("command policy: an empty token would accept anyone; leave it unset instead")

    @property
    def command_root(self) -> str:
        return f"{self.prefix}/{self.device}/cmd/"

    def command_topics(self) -> list[str]:
        """The exact topics to subscribe to (no wildcard: the allow-list starts at the subscription)."""
        return [self.command_root + c for c in sorted(self.commands)]

    def reply_topic(self, command: str) -> str:
        return f"{self.prefix}/{self.device}/reply/{command}"

    @property
    def restricted(self) -> bool:
        return self.allowed_client_ids is not None or self.token is not None


@dataclass
class CommandRequest:
    """An accepted command: what to do, and where the answer goes."""

    command: str
    body: dict[str, Any]
    reply_topic: str
    correlation_data: bytes | None = None
    client_id: str | None = None


@dataclass
class Rejection:
    """A refused command, with the error reply the sender gets."""

    code: str
    message: str
    command: str | None
    reply_topic: str | None
    correlation_data: bytes | None = None

    def reply(self) -> dict[str, Any]:
        """The JSON reply body (the daemon adds its own fields such as a timestamp)."""
        return {"ok": False, "command": self.command, "error": self.code, "message": self.message}

    def reply_payload(self) -> bytes:
        return json.dumps(self.reply(), separators=(",", ":")).encode()


@dataclass
class GateStats:
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
        }


class CommandGate:
    """Applies a :class:`CommandPolicy` to received messages and counts the outcome."""

    def __init__(self, policy: CommandPolicy):
        self.policy = policy
        self.stats = GateStats()

    def check(
        self,
        topic: Any,
        payload: Any,
        user_properties: Iterable[tuple[str, str]] | None = None,
        response_topic: Any = None,
        correlation_data: Any = None,
    ) -> CommandRequest | Rejection:
        """Classify one received message; never raises, whatever the types of its arguments."""
        try:
            return self._check(topic, payload, user_properties, response_topic, correlation_data)
        except Exception as exc:  # a gate that raises would take the MQTT callback thread with it
            return self._reject("bad_payload", f"unreadable command: {type(exc).__name__}", None, None, None)

    def _check(
        self,
        topic: Any,
        payload: Any,
        user_properties: Iterable[tuple[str, str]] | None,
        response_topic: Any,
        correlation_data: Any,
    ) -> CommandRequest | Rejection:
        corr = bytes(correlation_data) if isinstance(correlation_data, (bytes, bytearray, memoryview)) else None
        command = self._command_of(topic)
        if command is None:
            shown = topic if isinstance(topic, str) else type(topic).__name__
            # Only configured command topics are answered: no reply topic for a foreign one.
            return self._reject("topic_not_allowed", f"not a command topic: {shown!r:.200}", None, None, corr)
        reply_to = self._reply_topic(command, response_topic)
        decoded = self._decode(payload)
        if isinstance(decoded, tuple):
            return self._reject(*decoded, command, reply_to, corr)
        body = decoded
        props = _props(user_properties)
        client_id = props.get("client_id", body.get("client_id"))
        client_id = client_id if isinstance(client_id, str) else None
        presented = props.get("token", body.get("token"))
        body.pop("token", None)  # never passed on, logged or echoed
        refused = self._authorize(command, body, client_id, presented)
        if refused is not None:
            return self._reject("unauthorized", refused, command, reply_to, corr)
        self.stats.accepted[command] += 1
        return CommandRequest(command, body, reply_to, corr, client_id)

    def _command_of(self, topic: Any) -> str | None:
        """The configured command a topic names, or None for any other topic."""
        root = self.policy.command_root
        if isinstance(topic, str) and topic.startswith(root) and topic[len(root) :] in self.policy.commands:
            return topic[len(root) :]
        return None

    def _decode(self, payload: Any) -> dict[str, Any] | tuple[str, str]:
        """The payload as a JSON object, bounded in size and depth before and after parsing, or the
        ``(reason, detail)`` of its refusal."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogatepass")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            return ("bad_payload", "payload must be bytes")
        limit = self.policy.max_payload_bytes
        if len(payload) > limit:
            return ("payload_too_large", f"payload is {len(payload)} bytes, the limit is {limit}")
        try:
            body = json.loads(bytes(payload).decode("utf-8"), parse_constant=_refuse_constant)
        except RecursionError:
            return ("too_deep", f"JSON nested deeper than {MAX_DEPTH}")
        except (UnicodeDecodeError, ValueError) as exc:
            return ("malformed_json", f"payload is not JSON: {exc}"[:200])
        if not isinstance(body, dict):
            return ("not_an_object", f"payload must be a JSON object, got {type(body).__name__}")
        if _depth(body) > MAX_DEPTH:
            return ("too_deep", f"JSON nested deeper than {MAX_DEPTH}")
        return body

    def _authorize(self, command: str, body: dict[str, Any], client_id: str | None, presented: Any) -> str | None:
        """Why ``command`` from this client may not run, or None when it may."""
        p = self.policy
        if command not in p.privileged:
            return None
        if not p.restricted and not p.allow_anonymous:
            action = body.get("action")
            if isinstance(action, str) and action in READ_ONLY_ACTIONS.get(command, ()):
                return None
            return (
                f"{command} needs credentials, and none are configured: set commands.token_file (or "
                "$ANOMALYGPT_EDGE_COMMANDS_TOKEN) or commands.allowed_client_ids; "
                "commands.allow_anonymous_control: true accepts anyone"
            )
        if not p.restricted:
            return None
        if p.allowed_client_ids is not None and client_id not in p.allowed_client_ids:
            return f"client id {client_id!r:.80} may not send {command}"
        if p.token is not None and not (
            isinstance(presented, str) and hmac.compare_digest(presented.encode(), p.token.encode())
        ):
            return f"{command} needs a valid token"
        return None

    def _reply_topic(self, command: str, response_topic: Any) -> str:
        """The MQTT 5 response topic when it is safe to publish to, else ``<prefix>/<device>/reply/<cmd>``.

        A response topic is refused when it has wildcards (paho would raise) or points inside this
        device's own namespace other than ``reply/`` — otherwise anyone allowed to send a command
        could make the daemon publish forged verdicts or status.
        """
        if isinstance(response_topic, str) and 0 < len(response_topic) <= MAX_TOPIC_LEN:
            own = f"{self.policy.prefix}/{self.policy.device}/"
            inside = response_topic.startswith(own) and not response_topic.startswith(own + "reply/")
            if not any(c in response_topic for c in "+#\0") and not inside:
                return response_topic
        return self.policy.reply_topic(command)

    def _reject(
        self, code: str, message: str, command: str | None, reply_to: str | None, corr: bytes | None
    ) -> Rejection:
        self.stats.rejected[code] += 1
        return Rejection(code, message, command, reply_to, corr)


def policy_from_config(
    section: Mapping[str, Any] | None, prefix: str, device: str, token: str | None = None
) -> CommandPolicy:
    """A policy from the config's ``commands`` section (``max_payload_bytes``, ``allowed_client_ids``,
    ``privileged``, ``allow_anonymous_control``); the token comes from :mod:`secrets`, never from
    this section."""
    section = dict(section or {})
    ids = section.get("allowed_client_ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise ValueError("commands.allowed_client_ids must be a list of client id strings")
    privileged = section.get("privileged", list(PRIVILEGED))
    if not isinstance(privileged, list) or not set(privileged) <= set(COMMANDS):
        raise ValueError(f"commands.privileged must be a list drawn from {list(COMMANDS)}")
    limit = section.get("max_payload_bytes", DEFAULT_MAX_PAYLOAD)
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise ValueError("commands.max_payload_bytes must be an integer")
    anonymous = section.get("allow_anonymous_control", False)
    if not isinstance(anonymous, bool):
        raise ValueError("commands.allow_anonymous_control must be true or false")
    return CommandPolicy(
        prefix=prefix,
        device=device,
        max_payload_bytes=limit,
        privileged=frozenset(privileged),
        allowed_client_ids=frozenset(ids) if ids is not None else None,
        token=token,
        allow_anonymous=anonymous,
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _props(user_properties: Iterable[tuple[str, str]] | None) -> dict[str, str]:
    """MQTT 5 user properties (paho gives a list of (name, value) pairs) as a dict of strings."""
    out: dict[str, str] = {}
    if not user_properties:
        return out
    for item in user_properties:
        if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, str) for v in item):
            out.setdefault(item[0], item[1])
    return out
