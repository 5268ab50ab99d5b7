"""What the Edge Node keeps about its sessions: the bdSeq across restarts, and the Primary Host's STATE.

* :class:`BdSeqFile`: the bdSeq of the node's last MQTT CONNECT, in a small JSON file under the
  daemon's storage (``<storage.data>/sparkplug/bdseq.json``), so a restarted daemon's Will and
  NBIRTH carry the next number (spec 3.0: bdSeq increments by one on every new CONNECT) instead of
  starting at 0 again, which a host could take for the death of an older session.
* :class:`PrimaryHost`: the Sparkplug 3.0 STATE of the configured Primary Host Application
  (``spBv1.0/STATE/<host_id>``, JSON ``{"online": bool, "timestamp": ms}``, retained). A STATE older
  than the last one taken is stale and ignored, so a delayed or replayed "offline" cannot end a
  session the host has since come back to.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pysparkplug import MessageType, State, Topic

from anomalygpt_edge.atomic_files import atomic_write_bytes

log = logging.getLogger(__name__)

#: What a STATE message meant to the node.
HostChange = Literal["online", "offline", "stale", "invalid"]


class BdSeqFile:
    """The bdSeq of the node's last CONNECT, kept across restarts (``path`` None: in memory only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def first(self) -> int:
        """The bdSeq of this process's first CONNECT: the kept one + 1 (0-255), or 0 without a usable file."""
        if self.path is None:
            return 0
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            log.info("Sparkplug bdSeq file %s not found: bdSeq starts at 0", self.path)
            return 0
        except OSError as exc:
            log.warning("Sparkplug bdSeq file %s unreadable (%s): bdSeq starts at 0", self.path, exc)
            return 0
        try:
            kept = json.loads(raw)["bd_seq"]
            if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= 255:
                raise ValueError(f"bd_seq {kept!r} is not a number 0-255")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("Sparkplug bdSeq file %s is corrupt (%s): bdSeq starts at 0", self.path, exc)
            return 0
        return (kept + 1) % 256

    def save(self, bd_seq: int) -> str | None:
        """Keep ``bd_seq`` (crash-safe write); the problem in words if it could not be written."""
        if self.path is None:
            return None
        try:
            atomic_write_bytes(self.path, json.dumps({"bd_seq": bd_seq}).encode())
        except OSError as exc:  # a full or read-only disk must not stop the node: the next start says 0
            log.warning("Sparkplug bdSeq file %s not written: %s", self.path, exc)
            return f"sparkplug: bdSeq file {self.path} not written: {exc}"
        return None


class PrimaryHost:
    """The configured Primary Host Application's STATE as the node last took it."""

    def __init__(self, host_id: str):
        self.host_id = host_id
        self.topic = str(Topic(message_type=MessageType.STATE, sparkplug_host_id=host_id))
        self.online = False  # taken from a STATE received in the current MQTT session only
        self.timestamp: int | float | None = None  # of the last STATE taken, across sessions

    def new_session(self) -> None:
        """A new MQTT session: wait for the (retained) STATE again before trusting the host is online."""
        self.online = False

    def update(self, raw: bytes) -> HostChange:
        """Take a STATE payload: ``online``/``offline`` when taken, ``stale`` (older) or ``invalid`` when not."""
        try:
            state = State.decode(raw)
        except (ValueError, KeyError, TypeError):
            return "invalid"
        stamp = state.timestamp
        if not isinstance(state.online, bool) or isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
            return "invalid"
        # Spec 3.0: a STATE counts only if its timestamp is not older than the previous one's (the
        # first one received always counts); an offline STATE older than the online one is stale.
        if self.timestamp is not None and stamp < self.timestamp:
            return "stale"
        self.timestamp, self.online = stamp, state.online
        return "online" if state.online else "offline"


__all__ = ["BdSeqFile", "HostChange", "PrimaryHost"]
